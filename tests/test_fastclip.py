"""FastClip against brute force: the dense matrix of each layer as it runs (zero padding, stride, dilation, TT, BN)."""

from __future__ import annotations

import pytest
import torch
from reference import dense_singular_values, operator_matrix
from torch import nn

from ttcompress.control import Controller
from ttcompress.errors import UserError
from ttcompress.fastclip import fastclip, following_batchnorms, layer_sigma
from ttcompress.tt import TTConv2d


def linear_part(fn, shape) -> torch.Tensor:
    """Dense matrix of the linear part of an affine map (bias and BatchNorm shift removed)."""
    with torch.no_grad():
        zero = fn(torch.zeros(1, *shape, dtype=torch.float64))
    return operator_matrix(lambda x: fn(x) - zero, shape)


def dense_sigma(fn, shape) -> float:
    return float(dense_singular_values(linear_part(fn, shape))[0])


def make_bn(channels: int, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels).double().eval()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=g, dtype=torch.float64) * 1.5)
        bn.running_var.copy_(torch.rand(channels, generator=g, dtype=torch.float64) * 2 + 0.2)
        bn.running_mean.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
        bn.bias.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
    return bn


LAYERS = {
    "stride1-nonsquare": (lambda: nn.Conv2d(5, 7, 3, padding=1), (6, 6)),
    "stride2": (lambda: nn.Conv2d(6, 4, 3, stride=2, padding=1), (8, 8)),
    "stride2-valid-odd": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=0), (7, 7)),  # no periodic counterpart
    "dilated": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2), (6, 6)),
    "tt-stride2": (lambda: TTConv2d(6, 8, 3, (4, 5), stride=2, padding=1), (8, 8)),
    "tt-stride1": (lambda: TTConv2d(8, 6, 3, (3, 4), padding=1), (4, 4)),
}


def make_layer(name: str, scale: float = 3.0) -> tuple[nn.Module, tuple[int, int]]:
    factory, hw = LAYERS[name]
    torch.manual_seed(0)
    layer = factory().double()
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    return layer, hw


@pytest.mark.parametrize("with_bn", [False, True], ids=["alone", "with-bn"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_fastclip_meets_the_bound_on_the_dense_operator(name, with_bn):
    layer, hw = make_layer(name)
    bn = make_bn(layer.out_channels) if with_bn else None
    fn = (lambda x: bn(layer(x))) if with_bn else layer
    shape = (layer.in_channels, *hw)
    before = dense_sigma(fn, shape)
    bn_state = {k: v.clone() for k, v in bn.state_dict().items()} if with_bn else {}
    bound = 0.5 * before
    result = fastclip(layer, hw, bound, bn=bn, rounds=60)
    after = dense_sigma(fn, shape)
    assert result.converged and result.rounds > 0
    assert result.sigma_before == pytest.approx(before, rel=1e-4)
    assert result.sigma_after == pytest.approx(after, rel=1e-3)  # the PowerQR estimate is the real σmax
    # clipped, not over-shrunk: the last step puts ⟨u, A v⟩ exactly at C, so σmax ≥ C
    assert bound * (1 - 1e-6) <= after <= bound * (1 + 1e-3), (before, after, bound)
    if with_bn:  # only the kernel changes
        for k, v in bn.state_dict().items():
            assert torch.equal(v, bn_state[k]), k
    if isinstance(layer, TTConv2d):  # written back with orthonormal frames
        f, ell = layer.frames()
        torch.testing.assert_close(f @ f.T, torch.eye(f.shape[0], dtype=f.dtype))
        torch.testing.assert_close(ell.T @ ell, torch.eye(ell.shape[1], dtype=ell.dtype))


def test_layer_below_the_bound_is_untouched():
    for name in ("stride2", "tt-stride1"):
        layer, hw = make_layer(name, scale=0.1)
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        sigma = dense_sigma(layer, (layer.in_channels, *hw))
        result = fastclip(layer, hw, 1.0)
        assert sigma < 1.0 and result.rounds == 0 and result.change == 0.0
        assert result.sigma_after == pytest.approx(sigma, rel=1e-4)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, state[k]), (name, k)


def test_one_joint_round_is_the_svd_clip_of_a_matrix():
    """A 1×1 conv on a 1×1 input is its matrix: the joint minimum-norm step on the top k = 3 triplets is exactly
    the SVD clip of the three values above C, in one round (the Gram matrix of the u_i v_iᵀ is the identity)."""
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 5, generator=g, dtype=torch.float64))
    s = torch.tensor([5.0, 4.0, 3.0, 0.5, 0.2], dtype=torch.float64)
    conv = nn.Conv2d(6, 5, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(((u * s) @ v.T).reshape(5, 6, 1, 1))
    result = fastclip(conv, (1, 1), 1.0, k=3, rounds=5)
    expected = (u * s.clamp(max=1.0)) @ v.T
    assert result.rounds == 1
    torch.testing.assert_close(conv.weight.detach().reshape(5, 6), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["stride1-nonsquare", "stride2"])
def test_change_is_small(name):
    """A mild clip (C = 0.9 σmax): the operator moves by little more than σmax − C (what the best unstructured
    change needs, Weyl), and the kernel by less than with the periodic clip verified to the same zero-padded bound."""
    layer, hw = make_layer(name)
    shape = (layer.in_channels, *hw)
    w0 = layer.weight.detach().clone()
    a0 = linear_part(layer, shape)
    sigma = float(dense_singular_values(a0)[0])
    bound = 0.9 * sigma
    fastclip(layer, hw, bound, rounds=30)
    moved = float(torch.linalg.matrix_norm(linear_part(layer, shape) - a0, ord=2))
    change = float((layer.weight.detach() - w0).norm())
    assert sigma - bound <= moved * (1 + 1e-9) <= 1.5 * (sigma - bound)

    with torch.no_grad():
        layer.weight.copy_(w0)
    net = nn.Sequential()
    net.add_module("c", layer)
    Controller(net, {"c": hw}, clip_to=bound, tolerance=1e-3, max_reprojections=10).enforce_bounds()
    assert dense_sigma(layer, shape) <= bound * (1 + 1e-3)  # the periodic route also meets the bound here ...
    periodic_change = float((layer.weight.detach() - w0).norm())
    assert change < periodic_change  # ... with a larger change


def test_warm_start_vectors_fit_or_are_ignored():
    layer, hw = make_layer("stride2")
    found = layer_sigma(layer, hw, k=2)
    again = layer_sigma(layer, hw, k=2, start=found.right)
    torch.testing.assert_close(again.values, found.values, rtol=1e-4, atol=0)
    assert bool((again.residuals <= 1e-4 * again.values).all())
    wrong = torch.randn(2, 3, 5, 5, dtype=torch.float64)  # another layer's shape: drawn afresh instead
    torch.testing.assert_close(layer_sigma(layer, hw, k=2, start=wrong).values, found.values, rtol=1e-4, atol=0)


# --- which BatchNorm follows which conv --------------------------------------------------------------------------------

class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))  # found through nesting
        self.conv_relu = nn.Conv2d(4, 4, 3, padding=1)
        self.norm_after_relu = nn.BatchNorm2d(4)  # after an in-place ReLU: not the conv's linear output
        self.tt = TTConv2d(4, 6, 3, (2, 2), padding=1)
        self.odd_name = nn.BatchNorm2d(6)  # names do not matter
        self.head = nn.Conv2d(6, 6, 1)  # no BatchNorm
        self.norm_of_sum = nn.BatchNorm2d(6)  # consumes head(x) + x, a new tensor

    def forward(self, x):
        x = self.stem(x)
        x = self.norm_after_relu(torch.relu_(self.conv_relu(x)))
        x = self.odd_name(self.tt(x))
        return self.norm_of_sum(self.head(x) + x)


def test_following_batchnorms_follows_tensors_not_names():
    net = Mixed()
    assert following_batchnorms(net, (3, 6, 6)) == {"stem.0": "stem.1", "tt": "odd_name"}
    assert net.training  # the pass leaves the mode as it was


def test_a_conv_feeding_two_batchnorms_is_refused():
    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.a, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.a(y) + self.b(y)

    with pytest.raises(UserError, match="several BatchNorms"):
        following_batchnorms(Fork(), (3, 6, 6))
