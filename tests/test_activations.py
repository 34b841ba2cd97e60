"""Data-aware truncation: input second moments of each conv, and TT-SVD that minimises the error on those inputs.

References are brute force: the moments from the inputs captured by hand, and the output error from the explicit
dense matrix of each layer (applied to basis vectors) on sampled inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reference import TwoConvNet as _Net
from reference import operator_matrix
from reference import random_images as _images
from ttcompress.activations import input_moments
from ttcompress.tt import decompose, input_whitening, tt_from_conv, tt_svd, unfolding_energies


def test_input_moments_match_the_inputs_captured_by_hand():
    torch.manual_seed(0)
    net, images = _Net().eval(), _images()
    moments = input_moments(net, net, images, batch_size=5)
    x = images.images.float() / 255
    with torch.no_grad():
        hidden = torch.relu(net.a(x))
    for name, inp in (("a", x), ("b", hidden)):
        flat = inp.double().transpose(0, 1).reshape(inp.shape[1], -1)
        torch.testing.assert_close(moments[name], flat @ flat.T / flat.shape[1], rtol=1e-6, atol=1e-9)
    assert set(input_moments(net, net, images, ["b"])) == {"b"}


def _inputs_with_few_directions(cin: int, n: int, size: int, seed: int) -> torch.Tensor:
    """Inputs whose channels live mostly in a 2-dimensional subspace (plus a little noise)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cin, 2, generator=g, dtype=torch.float64)
    z = torch.randn(n, 2, size, size, generator=g, dtype=torch.float64)
    return torch.einsum("ck,nkhw->nchw", mix, z) + 0.01 * torch.randn(n, cin, size, size, generator=g,
                                                                        dtype=torch.float64)


@pytest.mark.parametrize("stride, cin, cout, kernel, size", [(1, 6, 4, 3, 5), (2, 5, 7, 3, 6), (1, 4, 6, 5, 3)])
def test_data_aware_tt_makes_a_smaller_error_on_the_inputs_it_was_given(stride, cin, cout, kernel, size):
    """Against the dense matrices of the conv and of both TT layers (stride 2, non-square channels, a kernel larger
    than the input): on inputs whose channels live in 2 directions, r1 = 2 is nearly exact for the data-aware form
    (far below plain TT-SVD's error at the same ranks), and its frames are orthonormal."""
    torch.manual_seed(1)
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False).double()
    x = _inputs_with_few_directions(cin, 64, size, seed=2)
    flat = x.transpose(0, 1).reshape(cin, -1)
    moment = flat @ flat.T / flat.shape[1]
    shape = (cin, size, size)
    dense = operator_matrix(conv, shape)
    errors = {}
    for label, m in (("plain", None), ("aware", moment)):
        factors = tt_svd(conv.weight, ranks=(2, cout), input_moment=m)
        torch.testing.assert_close(factors.first @ factors.first.T, torch.eye(2, dtype=torch.float64))
        torch.testing.assert_close(factors.last.T @ factors.last, torch.eye(cout, dtype=torch.float64))
        tt = tt_from_conv(conv, factors).double()
        diff = (dense - operator_matrix(tt, shape)) @ x.reshape(x.shape[0], -1).T
        errors[label] = float((diff ** 2).sum() / ((dense @ x.reshape(x.shape[0], -1).T) ** 2).sum())
    assert errors["aware"] < 1e-3 < 0.05 < errors["plain"], errors


def test_data_aware_tt_is_exact_at_full_rank_and_plain_for_white_inputs():
    torch.manual_seed(3)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    g = torch.randn(4, 4, dtype=torch.float64)
    moment = g @ g.T + 0.1 * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(tt_svd(w, ranks=(4, 5), input_moment=moment).dense(), w)
    plain, white = tt_svd(w, ranks=(2, 3)), tt_svd(w, ranks=(2, 3), input_moment=2.5 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(white.dense(), plain.dense())
    s_in, s_out = unfolding_energies(w, 2.5 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(s_in, 2.5 * unfolding_energies(w)[0])


def test_input_whitening_is_a_square_root_with_a_floor():
    g = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    moment = g @ g.T  # rank 3 of 5: two zero eigenvalues
    half, inverse = input_whitening(moment, floor=1e-6)
    torch.testing.assert_close(half @ inverse, torch.eye(5, dtype=torch.float64))
    top = torch.linalg.eigvalsh(moment).max()
    torch.testing.assert_close(torch.linalg.eigvalsh(half @ half).min(), 1e-6 * top, rtol=1e-6, atol=0)
    with pytest.raises(Exception, match="zero everywhere"):
        input_whitening(torch.zeros(3, 3))


def test_decompose_uses_the_moments_of_the_layers_it_is_given():
    torch.manual_seed(5)
    net = _Net()
    moments = input_moments(net, net, _images())
    plain, aware = _Net(), _Net()
    aware.load_state_dict(net.state_dict())
    plain.load_state_dict(net.state_dict())
    decompose(plain, rank=2)
    decompose(aware, rank=2, input_moments={"b": moments["b"]})
    torch.testing.assert_close(aware.a.dense_weight(), plain.a.dense_weight())  # no moment: truncated as before
    assert not torch.allclose(aware.b.dense_weight(), plain.b.dense_weight())
