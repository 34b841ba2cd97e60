"""MAC counts against hand counts: dense, strided, grouped, 1-D, TT and linear layers."""

from __future__ import annotations

import torch
from torch import nn

from ttcompress.macs import layer_sites, network_macs
from ttcompress.tt import decompose, tt_like


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)  # 10×10 → 10×10
        self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1)  # 10×10 → 5×5
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)  # 5×5 → 5×5
        self.fc = nn.Linear(16 * 25, 10)

    def forward(self, x):
        return self.fc(self.g(self.b(self.a(x))).flatten(1))


def test_dense_strided_grouped_and_linear_against_hand_counts():
    macs = network_macs(Small(), (3, 10, 10))
    assert macs == {
        "a": 8 * 3 * 9 * 100,
        "b": 16 * 8 * 9 * 25,
        "g": 16 * (16 // 4) * 9 * 25,
        "fc": 400 * 10,
    }


def test_tt_layer_first_runs_at_the_input_resolution():
    net = Small()
    decompose(net, ranks={"b": (2, 3)})
    macs = network_macs(net, (3, 10, 10))
    # first 1×1: 2·8 on 10×10; core 3×2×3×3 with stride 2 on 5×5; last 1×1: 16·3 on 5×5
    assert macs["b"] == 2 * 8 * 100 + 3 * 2 * 9 * 25 + 16 * 3 * 25
    assert macs["a"] == 8 * 3 * 9 * 100  # untouched


def test_macs_of_a_tt_layer_equal_its_three_convs_counted_as_dense():
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    tt = tt_like(conv, (4, 5))
    sites = layer_sites(nn.Sequential(tt.first, tt.core, tt.last), (6, 12, 12))
    by_parts = sum(network_macs(nn.Sequential(tt.first, tt.core, tt.last), (6, 12, 12)).values())
    assert len(sites) == 3
    assert network_macs(nn.Sequential(tt), (6, 12, 12)) == {"0": by_parts}


def test_conv1d_linear_on_positions_and_a_module_called_twice():
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv1d(4, 6, 3)  # length 20 → 18
            self.fc = nn.Linear(6, 5)  # on 18 positions
            self.shared = nn.Conv1d(4, 4, 1)

        def forward(self, x):
            x2 = self.shared(self.shared(x))  # called twice on 20 positions
            return self.fc(self.c(x2).transpose(1, 2))

    macs = network_macs(Seq(), (4, 20))
    assert macs == {"c": 6 * 4 * 3 * 18, "shared": 2 * 4 * 4 * 20, "fc": 6 * 5 * 18}


def test_sites_record_the_input_shape_for_timing():
    sites = layer_sites(Small(), (3, 10, 10))
    assert sites["b"].in_shape == (8, 10, 10) and sites["b"].in_points == 100 and sites["b"].out_points == 25
    assert sites["fc"].in_shape == (400,) and sites["fc"].in_points == 1
    assert torch.is_grad_enabled()
