"""Skew orthogonal convolutions, SOC-TT and MaxMin against dense operators built from basis vectors.

What is true (and tested): with "same" zero padding the conv of a skew kernel is an exactly skew-symmetric
matrix, so exp(J) is exactly orthogonal — no periodic padding needed; the layer deviates from orthogonality only
through the truncated Taylor series (≈1e-9 with the 13 evaluation terms here, visibly with the 6 training terms,
and always within the certified tail bound).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from reference import dense_singular_values, operator_matrix
from ttcompress.soc import MaxMin, SOCConv2d, SOCLayer, SOCTTConv2d, series_tail, skew_symmetric, transpose_flip
from ttcompress.spectral.bounds import f4_bound, f4_reshapings


pytestmark = pytest.mark.usefixtures("one_thread")


def dense(module, in_shape):
    return operator_matrix(lambda x: module(x), in_shape)


def test_transpose_flip_is_the_adjoint_kernel():
    w = torch.randn(3, 5, 3, 3, dtype=torch.float64)
    x, y = torch.randn(2, 5, 6, 7, dtype=torch.float64), torch.randn(2, 3, 6, 7, dtype=torch.float64)
    lhs = (F.conv2d(x, w, padding=1) * y).sum()
    rhs = (x * F.conv2d(y, transpose_flip(w), padding=1)).sum()
    torch.testing.assert_close(lhs, rhs)


@pytest.mark.parametrize("k", [3, 5])
def test_zero_padded_skew_conv_is_exactly_skew_symmetric(k):
    a = skew_symmetric(torch.randn(4, 4, k, k, dtype=torch.float64))
    j = operator_matrix(lambda x: F.conv2d(x, a, padding=k // 2), (4, 5, 6))
    assert torch.equal(j, -j.T)


def test_soc_eval_is_orthogonal_and_equals_matrix_exponential():
    m = SOCConv2d(4, 3).double().eval()
    op = dense(m, (4, 5, 6))
    sv = dense_singular_values(op)
    assert (sv - 1).abs().max() < 1e-4
    j = operator_matrix(lambda x: F.conv2d(x, m.normalized_kernel(), padding=1), (4, 5, 6))
    torch.testing.assert_close(op, torch.matrix_exp(j), atol=1e-6, rtol=0)
    x = torch.randn(16, 4, 8, 8, dtype=torch.float64)
    ratio = m(x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert (ratio - 1).abs().max() < 1e-4


def test_training_series_is_within_its_certified_tail():
    torch.manual_seed(1)
    m = SOCConv2d(4, 3, terms=6).double()
    m.train()
    op = dense(m, (4, 5, 5))  # the six-term series the layer trains with
    sv = dense_singular_values(op)
    m.eval()
    bound = m.lipschitz_bound(terms=6)
    tail = bound - 1
    assert sv.max() <= bound and sv.min() >= 1 - tail
    assert (sv - 1).abs().max() > 1e-6  # six terms are visibly not orthogonal
    assert 1 <= m.lipschitz_bound() < 1 + 1e-3  # thirteen terms


def test_series_tail():
    assert series_tail(1.0, 3) == pytest.approx(torch.e - 2.5, rel=1e-12)
    assert series_tail(0.0, 4) == 0.0


def test_scale_follows_fantastic_four():
    m = SOCConv2d(6, 3, correction=0.7).double().eval()
    k = m.normalized_kernel().detach()  # init_iters (50) power iterations first
    skew = skew_symmetric(m.weight.detach())
    exact = min(float(torch.linalg.matrix_norm(r, 2)) for r in f4_reshapings(skew))
    estimate = float(m.sigma().detach())
    # kernel = 0.7·A/σ̂, so its F4 bound is 3·0.7·(exact F4 of A)/σ̂; a Rayleigh quotient never exceeds the norm
    assert float(f4_bound(k)) == pytest.approx(3 * 0.7 * exact / estimate, rel=1e-9)
    assert estimate <= exact * (1 + 1e-12)
    # 50 iterations can stop a few % short on a random kernel (0.955 at worst in 300 seeds); more close the gap
    m.power_iterate(1000)
    assert estimate <= float(m.sigma().detach()) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize(
    "cin,cout,stride,isometry",
    [(3, 8, 1, True), (4, 8, 1, True), (2, 8, 2, True), (2, 12, 2, True), (4, 8, 2, False), (4, 6, 2, False)],
)
def test_soc_layer_channels_and_stride(cin, cout, stride, isometry):
    layer = SOCLayer(cin, cout, 3, stride, bias=False).double().eval()
    op = dense(layer, (cin, 4, 4))
    assert op.shape == (cout * (4 // stride) ** 2, cin * 16)
    sv = dense_singular_values(op)
    assert (sv - 1).abs().max() < 1e-6  # orthonormal columns (isometry) or orthonormal rows (projection)
    x = torch.randn(8, cin, 4, 4, dtype=torch.float64)
    ratio = layer(x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    if isometry:
        assert (ratio - 1).abs().max() < 1e-6
    else:
        assert ratio.max() <= 1 + 1e-6 and ratio.min() < 0.99


def test_bias_and_gradients():
    layer = SOCLayer(4, 4, 3, 1).train()
    x = torch.randn(2, 4, 6, 6)
    core = copy.deepcopy(layer.core)  # a training forward advances the power iteration: compare from the same state
    out = layer(x)
    torch.testing.assert_close(out - layer.bias.view(1, -1, 1, 1), core(x))
    out.square().sum().backward()
    g = layer.core.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_state_dict_roundtrip_evaluates_identically():
    torch.manual_seed(2)
    a = SOCLayer(4, 8, 3, 2).train()
    a(torch.randn(2, 4, 8, 8))  # one training step moves the power-iteration vectors
    a.eval()
    x = torch.randn(3, 4, 8, 8)
    b = SOCLayer(4, 8, 3, 2).eval()
    with torch.no_grad():  # copy tensors as ttcompress.checkpoint does (no load_state_dict hooks)
        for key, t in b.state_dict().items():
            t.copy_(a.state_dict()[key])
    assert b.core.initialized.item() == 1.0
    assert torch.equal(a(x), b(x))
    # a new layer evaluated at once initialises its vectors instead of using random ones
    fresh = SOCConv2d(4, 3).double().eval()
    assert (dense_singular_values(dense(fresh, (4, 4, 4))) - 1).abs().max() < 1e-4


def test_soctt_structure_frames_and_spectrum():
    layer = SOCTTConv2d(8, 12, 4, 3, stride=2, bias=False).double().eval()
    f, ell = layer.frames()
    assert f.shape == (4, 8) and ell.shape == (12, 4) and layer.ranks == (4, 4)
    assert layer.core.core.channels == 16  # r1·s² = 16 > r2 = 4
    assert layer.orthogonal_loss().item() < 1e-12
    op = dense(layer, (8, 4, 4))
    sv = dense_singular_values(op)
    nonzero = sv[sv > 1e-8]
    assert len(nonzero) == 4 * 4 and (nonzero - 1).abs().max() < 1e-6  # r2 channels on the 2×2 grid
    assert layer.lipschitz_bound() == pytest.approx(1, abs=1e-4)
    # frames off orthonormality: the loss is the normalised deviation and the bound follows the frame norms
    with torch.no_grad():  # orthonormal to float64 precision first (they were drawn in float32), then scaled
        layer.frame_in.copy_(torch.linalg.qr(layer.frame_in.T).Q.T)
        layer.frame_out.copy_(torch.linalg.qr(layer.frame_out).Q)
        layer.frame_in.mul_(2.0)
    expected = ((4 * torch.eye(4, dtype=torch.float64) - torch.eye(4, dtype=torch.float64)).square().sum()) / 32
    torch.testing.assert_close(layer.orthogonal_loss(), expected)
    sigma = dense_singular_values(dense(layer, (8, 4, 4)))[0]
    assert sigma <= layer.lipschitz_bound() and layer.lipschitz_bound() == pytest.approx(2, rel=1e-4)


def test_soctt_without_frames_when_rank_covers_channels():
    layer = SOCTTConv2d(4, 8, 8, 3)
    assert not layer.has_frames and layer.frame_in is None
    f, ell = layer.frames()
    assert torch.equal(f, torch.eye(4)) and torch.equal(ell, torch.eye(8))
    assert float(layer.orthogonal_loss()) == 0.0
    assert layer(torch.randn(1, 4, 4, 4)).shape == (1, 8, 4, 4)


def test_soctt_orthogonal_loss_has_gradients():
    layer = SOCTTConv2d(8, 8, 4)
    with torch.no_grad():
        layer.frame_out.add_(0.1 * torch.randn_like(layer.frame_out))
    loss = layer.orthogonal_loss()
    loss.backward()
    assert loss > 0 and layer.frame_out.grad.abs().sum() > 0


def test_maxmin_is_a_pointwise_permutation():
    act = MaxMin()
    x = torch.randn(64, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    y = act(x)
    torch.testing.assert_close(y[:, :3], torch.minimum(x[:, :3], x[:, 3:]))
    torch.testing.assert_close(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    # 1-Lipschitz
    x2 = torch.randn_like(x)
    assert ((act(x2) - y).flatten(1).norm(dim=1) <= (x2 - x).flatten(1).norm(dim=1) + 1e-12).all()
    # gradient-norm-preserving: ‖∂(gᵀ act(x))/∂x‖ = ‖g‖ per sample
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad((y * g).sum(), x)
    torch.testing.assert_close(grad.flatten(1).norm(dim=1), g.flatten(1).norm(dim=1))
    with pytest.raises(ValueError, match="even"):
        act(torch.randn(1, 3, 2, 2))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="odd"):
        SOCConv2d(4, 2)
    with pytest.raises(ValueError, match="rank"):
        SOCTTConv2d(4, 4, 0)
