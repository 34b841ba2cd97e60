"""Power iteration on layers as they run, against the dense zero-padded operator built from basis vectors."""

from __future__ import annotations

import pytest
import torch
from reference import (
    dense_singular_values,
    operator_matrix,
    periodic_conv,
    periodic_matrix,
)
from torch import nn

from ttcompress.spectral.power import (
    LinearMap,
    PowerIteration,
    conv_operator,
    sigma_max_power,
    top_singular,
)
from ttcompress.tt import TTConv2d, orthonormal_factors

CONVS = [
    # (Cout, Cin, k, n, stride, padding, dilation)
    (4, 3, 3, 8, 1, 1, 1),
    (6, 4, 3, 8, 2, 1, 1),  # stride 2
    (5, 3, 3, 7, 2, 1, 1),  # stride 2 on an odd size: output_padding 0, 1 mixes
    (4, 4, 1, 8, 2, 0, 1),  # 1×1 strided shortcut
    (3, 3, 3, 8, 1, 2, 2),  # dilation
    (4, 2, 5, 6, 1, 0, 1),  # no padding
]


def dense_sigma(layer: nn.Module, in_shape) -> float:
    def apply(x):
        out = layer(x)
        bias = getattr(layer, "bias", None)
        return out if bias is None else out - bias.view(1, -1, 1, 1)

    return float(dense_singular_values(operator_matrix(apply, in_shape))[0])


@pytest.mark.parametrize("cout,cin,k,n,stride,padding,dilation", CONVS)
def test_sigma_max_power_matches_dense_zero_padded_operator(cout, cin, k, n, stride, padding, dilation):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation).double()
    ref = dense_sigma(conv, (cin, n, n))
    got = sigma_max_power(conv, (n, n), tol=1e-6)
    assert abs(got - ref) <= 1e-4 * ref
    # the zero-padded operator is not the periodic one: make sure the test could tell them apart
    if padding:
        periodic = float(dense_singular_values(periodic_matrix(conv.weight.detach(), (n, n), (stride,) * 2,
                                                               (dilation,) * 2))[0])
        assert abs(periodic - ref) > 1e-3 * ref


@pytest.mark.parametrize("cout,cin,k,n,stride,padding,dilation", CONVS)
def test_adjoint_is_exact(cout, cin, k, n, stride, padding, dilation):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=False).double()
    op = conv_operator(conv, (n, n))
    x = torch.randn(2, cin, n, n, dtype=torch.float64)
    y = torch.randn_like(op.forward(x))
    back = op.adjoint(y)
    assert back.shape == x.shape
    torch.testing.assert_close((op.forward(x) * y).sum(), (x * back).sum(), rtol=1e-12, atol=1e-12)


def test_tt_layer_uses_core_after_qr_and_matches_the_actual_layer():
    torch.manual_seed(3)
    layer = TTConv2d(5, 6, 3, (3, 4), stride=2, padding=1).double()
    with torch.no_grad():  # frames far from orthonormal: σ(core) alone would be wrong
        layer.first.weight.mul_(3.0)
        layer.last.weight.mul_(0.5)
    ref = dense_sigma(layer, (5, 8, 8))
    assert abs(sigma_max_power(layer, (5, 8, 8)) - ref) <= 1e-4 * ref
    raw_core = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False).double()
    raw_core.weight.data.copy_(layer.core.weight)
    assert abs(sigma_max_power(raw_core, (8, 8)) - ref) > 1e-2 * ref
    _, core, _ = orthonormal_factors(layer)
    assert conv_operator(layer, (8, 8)).input_shape == (3, 8, 8) and torch.equal(conv_operator(layer, (8, 8)).kernel, core)


def test_circular_padding_uses_the_autograd_adjoint():
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular", bias=False).double()
    k = conv.weight.detach()
    ref = dense_sigma(conv, (3, 6, 6))
    periodic = float(dense_singular_values(operator_matrix(lambda x: periodic_conv(x, k, padding=(1, 1)), (3, 6, 6)))[0])
    assert abs(ref - periodic) <= 1e-10 * ref
    assert conv_operator(conv, (6, 6))._output_padding() is None
    assert abs(sigma_max_power(conv, (6, 6)) - ref) <= 1e-4 * ref


def test_channel_count_is_checked():
    with pytest.raises(ValueError, match="channels"):
        sigma_max_power(nn.Conv2d(3, 4, 3), (4, 8, 8))


def test_linear_layer():
    lin = nn.Linear(7, 5).double()
    ref = float(torch.linalg.matrix_norm(lin.weight.detach(), ord=2))
    assert abs(sigma_max_power(lin) - ref) <= 1e-6 * ref


def test_persistent_vectors_converge_and_round_trip():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False).double()
    op = conv_operator(conv, (8, 8))
    ref = dense_sigma(conv, (4, 8, 8))
    pi = PowerIteration(seed=5)
    first = float(pi.estimate("c", op))
    for _ in range(300):
        last = float(pi.estimate("c", op))
    assert first < last <= ref * (1 + 1e-12)  # σ̂ is a lower bound that improves
    assert ref - last < 1e-3 * ref
    other = PowerIteration()
    other.load_state_dict(pi.state_dict())
    assert torch.equal(other.estimate("c", op), pi.estimate("c", op))
    # same seed, same key: same start on every rank
    assert torch.equal(PowerIteration(seed=5).estimate("c", op), PowerIteration(seed=5).estimate("c", op))
    assert not torch.equal(PowerIteration(seed=5).estimate("c", op), PowerIteration(seed=6).estimate("c", op))


def test_vector_is_redrawn_when_the_shape_changes():
    pi = PowerIteration()
    pi.estimate("x", LinearMap(torch.randn(3, 4)))
    assert pi.vectors["x"].shape == (1, 4)
    pi.estimate("x", LinearMap(torch.randn(3, 6)))
    assert pi.vectors["x"].shape == (1, 6)


TOPK = [
    # (Cout, Cin, k, n, stride, padding, dilation)
    (4, 3, 3, 8, 1, 1, 1),
    (6, 4, 3, 8, 2, 1, 1),  # stride 2
    (3, 5, 3, 7, 2, 1, 1),  # stride 2, odd size, wide
    (4, 2, 5, 6, 1, 2, 1),  # kernel nearly as large as the input
]


@pytest.mark.parametrize("cout,cin,k,n,stride,padding,dilation", TOPK)
def test_top_singular_matches_dense_zero_padded_operator(cout, cin, k, n, stride, padding, dilation):
    torch.manual_seed(11)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=False).double()
    dense = operator_matrix(conv, (cin, n, n))
    ref = dense_singular_values(dense)
    found = top_singular(conv, (n, n), 5, tol=1e-6)
    assert found.converged
    torch.testing.assert_close(found.values, ref[:5], rtol=1e-5, atol=0)
    # the vectors are singular vectors of the actual operator: A v = σ u, Aᵀ u ≈ σ v, orthonormal
    v = found.right.reshape(5, -1).T
    u = found.left.reshape(5, -1).T
    torch.testing.assert_close(dense @ v, u * found.values, rtol=0, atol=1e-10)
    assert float((dense.T @ u - v * found.values).norm(dim=0).max()) <= 1e-6 * float(ref[0])
    torch.testing.assert_close(v.T @ v, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-10)


def test_top_singular_of_tt_layer_and_warm_start():
    torch.manual_seed(5)
    layer = TTConv2d(5, 6, 3, (3, 4), stride=2, padding=1).double()
    with torch.no_grad():
        layer.first.weight.mul_(2.0)
    ref = dense_singular_values(operator_matrix(lambda x: layer(x) - layer.bias.view(1, -1, 1, 1), (5, 8, 8)))
    cold = top_singular(layer, (5, 8, 8), 3, tol=1e-8)
    torch.testing.assert_close(cold.values, ref[:3], rtol=1e-7, atol=0)
    warm = top_singular(layer, (5, 8, 8), 3, tol=1e-8, start=cold.right)
    assert warm.converged and warm.products < cold.products
    # vectors that are already the answer: one Rayleigh–Ritz step on the start block (block 5: A and Aᵀ per vector)
    assert warm.products == 2 * 5
    torch.testing.assert_close(warm.values, ref[:3], rtol=1e-7, atol=0)
    # a start that is not converged still reaches the answer
    # (a TT layer's operator acts on its core's r1 = 3 channels)
    rough = top_singular(layer, (5, 8, 8), 3, tol=1e-8, start=torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert rough.converged
    torch.testing.assert_close(rough.values, ref[:3], rtol=1e-7, atol=0)
    with pytest.raises(ValueError, match="do not fit"):
        top_singular(layer, (5, 8, 8), 3, start=torch.randn(2, 5, 8, 8, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(3))
def test_top_singular_converges_tightly_when_the_second_value_has_a_close_neighbour(seed):
    # σ₂ and σ₃ 0.4 % apart: once the block is nearly converged the new Krylov directions are the tiny Ritz
    # residuals, and a loose rank cut in the orthonormalisation dropped them, stalling σ₂'s residual near 1e-10
    g = torch.Generator().manual_seed(seed)
    m, n = 256, 192
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.linspace(1.0, 0.05, n, dtype=torch.float64)
    s[:3] = torch.tensor([1.1, 1.004, 1.0], dtype=torch.float64)
    found = top_singular(LinearMap(u @ torch.diag(s) @ v.T), k=2, tol=1e-11)
    assert found.converged
    torch.testing.assert_close(found.values, s[:2], rtol=1e-13, atol=0)
    assert bool((found.residuals <= 1e-11 * found.values).all())


def test_top_singular_of_linear_and_tolerance_is_honoured():
    torch.manual_seed(2)
    lin = nn.Linear(40, 30, bias=False).double()
    ref = torch.linalg.svdvals(lin.weight.detach())
    loose = top_singular(lin, k=4, tol=1e-2, krylov=2)
    assert loose.converged
    # each value is within its residual (and so within tol·σ) of a true singular value
    for value, residual in zip(loose.values, loose.residuals):
        assert float((ref - value).abs().min()) <= float(residual) + 1e-12
        assert float(residual) <= 1e-2 * float(value)
    with pytest.raises(ValueError, match="block"):
        top_singular(lin, k=4, block=2)
