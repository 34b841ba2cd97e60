"""BatchNorm statistics moved by what a decomposition changed (:mod:`ttcompress.batchnorm`).

References are computed by hand: the channel statistics of the captured inputs of each BatchNorm in the dense and the
decomposed network, corrected in forward order.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reference import random_images
from ttcompress.batchnorm import batchnorm_inputs, channel_stats, correct_batchnorm
from ttcompress.tt import decompose


class _Net(nn.Module):
    """conv → BN → ReLU → strided conv → BN → pool → linear, with BatchNorm statistics that are not the defaults."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.b, self.bn_b = nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5)
        self.unused = nn.BatchNorm2d(5)
        self.head = nn.Linear(5, 4)
        g = torch.Generator().manual_seed(1)
        for bn in (self.bn_a, self.bn_b, self.unused):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)

    def forward(self, x):
        h = torch.relu(self.bn_a(self.a(x)))
        return self.head(self.bn_b(self.b(h)).mean((2, 3)))


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=False)


def _match(bn: nn.BatchNorm2d, m0, v0, m1, v1) -> None:
    """The statistics that give ``bn`` the same output mean and variance on inputs of moments (m1, v1) as the
    current ones on (m0, v0): (m1 − μ')/s' = (m0 − μ)/s and v1/s'² = v0/s²."""
    s = (bn.running_var.double() + bn.eps).sqrt()
    s_new = s * (v1 / v0).sqrt()
    bn.running_mean.copy_((m1 - (m0 - bn.running_mean.double()) * s_new / s).float())
    bn.running_var.copy_((s_new ** 2 - bn.eps).float())


def test_channel_stats_match_the_captured_inputs():
    torch.manual_seed(0)
    net, images = _Net().eval(), random_images(n=20)
    stats = channel_stats(net, ["bn_a", "bn_b", "unused"], images, batch_size=7)
    x = images.float_images()
    with torch.no_grad():
        pre_a = net.a(x)
        pre_b = net.b(torch.relu(net.bn_a(pre_a)))
    assert set(stats) == {"bn_a", "bn_b"}  # the forward pass never reaches `unused`
    for name, inp in (("bn_a", pre_a), ("bn_b", pre_b)):
        mean, var = _stats(inp)
        torch.testing.assert_close(stats[name][0], mean, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(stats[name][1], var, rtol=1e-6, atol=1e-9)
    stopped = channel_stats(net, ["bn_a"], images, batch_size=7, stop=True)
    torch.testing.assert_close(stopped["bn_a"][0], stats["bn_a"][0])


def test_an_unchanged_network_keeps_its_statistics():
    torch.manual_seed(0)
    net = _Net().eval()
    model = copy.deepcopy(net)
    images = random_images(n=20)
    done = correct_batchnorm(model, batchnorm_inputs(net, images), images)
    assert [c.name for c in done] == ["bn_a", "bn_b"]
    for name in ("bn_a", "bn_b", "unused"):
        torch.testing.assert_close(model.get_submodule(name).running_mean, net.get_submodule(name).running_mean,
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(model.get_submodule(name).running_var, net.get_submodule(name).running_var,
                                   rtol=1e-6, atol=0)
    assert all(c.mean_shift < 1e-5 and abs(c.var_ratio_max - 1) < 1e-5 for c in done)


def test_correction_follows_the_forward_order():
    """Each BatchNorm is corrected for the change of its input statistics, the later one measured with the earlier
    one already corrected (a reference that corrected both from the uncorrected network would differ), and its
    output on the images has the dense network's per-channel mean and variance."""
    torch.manual_seed(0)
    dense, images = _Net().eval(), random_images(n=20)
    model = copy.deepcopy(dense)
    decompose(model, rank=2)
    expected = copy.deepcopy(model)
    x = images.float_images()
    with torch.no_grad():
        m0, v0 = _stats(dense.a(x))
        m1, v1 = _stats(expected.a(x))
        bn = expected.bn_a
        stale_b = _stats(expected.b(torch.relu(bn(expected.a(x)))))
        _match(bn, m0, v0, m1, v1)
        m0, v0 = _stats(dense.b(torch.relu(dense.bn_a(dense.a(x)))))
        m1, v1 = _stats(expected.b(torch.relu(bn(expected.a(x)))))
        _match(expected.bn_b, m0, v0, m1, v1)
    assert not torch.allclose(stale_b[0], m1, atol=1e-3)
    done = correct_batchnorm(model, batchnorm_inputs(dense, images, batch_size=7), images, batch_size=6)
    for name in ("bn_a", "bn_b"):
        torch.testing.assert_close(model.get_submodule(name).running_mean,
                                   expected.get_submodule(name).running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.get_submodule(name).running_var,
                                   expected.get_submodule(name).running_var, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.unused.running_mean, dense.unused.running_mean)
    assert all(c.mean_shift > 0 for c in done)
    with torch.no_grad():
        outputs = [model.bn_a(model.a(x)), dense.bn_a(dense.a(x))]
        outputs += [model.bn_b(model.b(torch.relu(outputs[0]))), dense.bn_b(dense.b(torch.relu(outputs[1])))]
    for got, want in (outputs[:2], outputs[2:]):
        (mean, var), (ref_mean, ref_var) = _stats(got), _stats(want)
        torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-4)
        torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-6)


def test_layers_missing_from_the_original_are_left_alone():
    torch.manual_seed(0)
    dense = _Net().eval()
    model = copy.deepcopy(dense)
    decompose(model, rank=2)
    dense.bn_b = nn.Identity()
    before = model.bn_b.running_mean.clone()
    images = random_images(n=20)
    assert [c.name for c in correct_batchnorm(model, batchnorm_inputs(dense, images), images)] == ["bn_a"]
    assert torch.equal(model.bn_b.running_mean, before)


@pytest.mark.parametrize("bn_correct", [True, False])
def test_compress_with_calibration_corrects_batchnorm(bn_correct):
    from ttcompress.compress import CompressSettings, compress

    torch.manual_seed(0)
    dense, images = _Net().eval(), random_images(n=20)
    model = copy.deepcopy(dense)
    result = compress(model, model, (3, 8, 8), CompressSettings(rank=2, calibrate=images, bn_correct=bn_correct))
    assert result.calibrate["batchnorm"] == (2 if bn_correct else None)
    assert torch.equal(model.bn_a.running_var, dense.bn_a.running_var) is not bn_correct
