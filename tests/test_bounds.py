"""Kernel-only spectral-norm bounds (Fantastic Four, sampled symbol) against exact spectra and dense operators."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import dense_singular_values, operator_matrix, periodic_matrix
from ttcompress.kernel import Geometry
from ttcompress.spectral.bounds import (
    f4_bound, f4_penalty, f4_reshapings, fourier_bound, layer_bound, polyphase_kernel, tap_bound,
)
from ttcompress.spectral.network import layer_input_sizes, layer_spectrum
from ttcompress.spectral.periodic import singular_values
from ttcompress.tt import TTConv2d, conv_layers, decompose

pytestmark = pytest.mark.usefixtures("one_thread")


CASES = [
    # (Cout, Cin, k, n, stride, dilation)
    (4, 3, 3, 6, 1, 1),
    (5, 3, 3, 8, 2, 1),  # stride 2
    (3, 6, 3, 6, 2, 1),  # non-square, Cout < Cin
    (9, 2, 3, 6, 2, 1),  # Cout > s²Cin
    (3, 4, 5, 8, 1, 1),  # 5×5
    (2, 5, 5, 9, 3, 1),  # stride 3
    (4, 4, 1, 6, 2, 1),  # strided 1×1 (a shortcut)
    (3, 2, 3, 8, 2, 2),  # dilated and strided
    (4, 4, 2, 6, 1, 1),  # even kernel
]


def zero_padded_sigma(w: torch.Tensor, n: int, stride: int, dilation: int, padding: int) -> float:
    """σmax of the conv as a layer runs it (zero padding), from its dense matrix."""
    mat = operator_matrix(lambda x: F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation),
                          (w.shape[1], n, n))
    return float(dense_singular_values(mat)[0])


@pytest.mark.parametrize("cout,cin,k,n,stride,dilation", CASES)
def test_bounds_dominate_periodic_and_zero_padded_sigma_max(cout, cin, k, n, stride, dilation):
    w = torch.randn(cout, cin, k, k, dtype=torch.float64)
    periodic = float(dense_singular_values(periodic_matrix(w, (n, n), (stride, stride), (dilation, dilation)))[0])
    exact = float(singular_values(w, (n, n), Geometry((stride, stride), (dilation, dilation)), dtype=torch.float64)[0])
    assert exact == pytest.approx(periodic, rel=1e-10)
    span = dilation * (k - 1)
    zero = max(zero_padded_sigma(w, n, stride, dilation, p) for p in (0, span // 2, span))
    bounds = [f4_bound(w, stride, dilation), f4_bound(w), fourier_bound(w, stride, dilation), fourier_bound(w),
              tap_bound(w)]
    for bound in bounds:
        assert float(bound) >= max(periodic, zero) * (1 - 1e-12)


def test_f4_is_the_minimum_of_four_reshaping_norms():
    w = torch.randn(5, 3, 3, 2, dtype=torch.float64)  # non-square kernel: R1 and R2 differ
    r1, r2, r3, r4 = f4_reshapings(w)
    assert r1.shape == (15, 6) and r2.shape == (10, 9) and r3.shape == (5, 18) and r4.shape == (3, 30)
    assert r1[2 * 3 + 1, 2 * 2 + 1] == w[2, 2, 1, 1] and r2[4 * 2 + 1, 0 * 3 + 2] == w[4, 0, 2, 1]
    norms = [torch.linalg.matrix_norm(r, 2) for r in (r1, r2, r3, r4)]
    torch.testing.assert_close(f4_bound(w), math.sqrt(6) * min(norms))


def test_f4_exact_for_1x1_and_fourier_exact_for_one_tap():
    w = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(w[:, :, 0, 0], 2)
    torch.testing.assert_close(f4_bound(w), exact)
    torch.testing.assert_close(fourier_bound(w), exact)
    # one nonzero tap: the operator is that tap times a shift, F4 is off by √(k²), the symbol bound is not
    single = torch.zeros(6, 4, 3, 3, dtype=torch.float64)
    single[:, :, 0, 2] = w[:, :, 0, 0]
    torch.testing.assert_close(f4_bound(single), 3 * exact)
    assert exact <= fourier_bound(single) <= exact * 1.01


def test_fourier_bound_is_tight_and_its_correction_is_needed():
    """On a fine periodic grid the exact σmax approaches sup‖K̂‖: the bound is within 1% of it.  On a coarse
    sampling grid the raw sampled maximum falls below the truth and only the Bernstein correction restores it."""
    torch.manual_seed(3)
    below = 0
    for _ in range(20):
        w = torch.randn(3, 3, 3, 3, dtype=torch.float64)
        fine = float(singular_values(w, (60, 60), dtype=torch.float64)[0])
        assert fine <= float(fourier_bound(w)) <= 1.01 * fine
        coarse = float(fourier_bound(w, grid=7))
        slack = 1 - 0.5 * math.pi**2 * (2 / 7) ** 2
        assert coarse >= fine
        below += coarse * slack < fine * (1 - 1e-9)  # the uncorrected sampled maximum
    assert below > 0


def test_polyphase_kernel_carries_the_strided_spectrum():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    for stride, n in ((2, 8), (3, 9)):
        p = polyphase_kernel(w, stride)
        assert p.shape[:2] == (4, 3 * stride * stride)
        a = singular_values(w, (n, n), Geometry((stride, stride)), dtype=torch.float64)
        b = singular_values(p, (n // stride, n // stride), dtype=torch.float64)
        torch.testing.assert_close(a, b)


def test_strided_f4_uses_polyphase_and_is_tighter_here():
    torch.manual_seed(0)
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    exact = float(singular_values(w, (16, 16), Geometry((2, 2)), dtype=torch.float64)[0])
    assert exact <= float(f4_bound(w, 2)) < float(f4_bound(w))


def test_gradients_flow():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f4_bound, (w,))
    assert torch.autograd.gradcheck(lambda x: fourier_bound(x, grid=6), (w,))
    assert torch.autograd.gradcheck(lambda x: f4_bound(x, 2), (w,))


def test_penalty_sums_layer_bounds_and_covers_tt_layers():
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1))
    expected = f4_bound(net[0].weight) + f4_bound(net[2].weight, 2)
    torch.testing.assert_close(f4_penalty(net, 0.5), 0.5 * expected)
    f4_penalty(net, 1.0).backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0
    decompose(net, rank=2)
    tt = net[2]
    assert isinstance(tt, TTConv2d)
    torch.testing.assert_close(layer_bound(tt), f4_bound(tt.dense_weight(), 2))
    exact = layer_spectrum("tt", tt, (8, 8), dtype=torch.float64).sigma_max
    with torch.no_grad():
        assert exact <= float(layer_bound(tt)) and exact <= float(layer_bound(tt, "fourier"))
    assert f4_penalty(nn.Sequential(nn.ReLU()), 1.0) == 0


def test_bounds_hold_on_real_resnet20(resnet20_path):
    from ttcompress.checkpoint import load

    m = load(resnet20_path, arch="resnet20")
    sizes = layer_input_sizes(m.model, (3, 32, 32), m.net)
    picked = {"conv1", "layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1", "layer3.2.conv2"}
    checked = 0
    for name, conv in conv_layers(m.net):
        if name not in picked:
            continue
        w = conv.weight.detach()
        stride = conv.stride
        exact = float(singular_values(w, sizes[name], Geometry(stride))[0]) * (1 - 1e-5)  # float32 accuracy
        assert exact <= float(f4_bound(w, stride)), name
        assert exact <= float(fourier_bound(w, stride)) <= 1.03 * exact, name
        checked += 1
    assert checked == len(picked)
