"""TT-SVD decomposition and TT layers against dense references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reference import dense_singular_values, periodic_matrix
from ttcompress import kernel as K
from ttcompress.spectral.network import layer_spectrum
from ttcompress.tt import TTConv2d, conv_layers, decompose, orthonormal_factors, tt_from_conv, tt_svd


def reference_tt_svd(w: torch.Tensor, r1: int, r2: int) -> torch.Tensor:
    """Plain TT-SVD written directly with numpy-style reshapes, as the reference for the error bound."""
    cout, cin, kh, kw = w.shape
    m1 = w.permute(1, 2, 3, 0).reshape(cin, -1)
    u, s, vt = torch.linalg.svd(m1, full_matrices=False)
    rest = (torch.diag(s[:r1]) @ vt[:r1]).reshape(r1 * kh * kw, cout)
    u2, s2, vt2 = torch.linalg.svd(rest, full_matrices=False)
    approx_rest = u2[:, :r2] @ torch.diag(s2[:r2]) @ vt2[:r2]
    approx_m1 = u[:, :r1] @ approx_rest.reshape(r1, kh * kw * cout)
    return approx_m1.reshape(cin, kh, kw, cout).permute(3, 0, 1, 2)


@pytest.mark.parametrize("shape,rank", [((8, 6, 3, 3), 4), ((5, 7, 3, 3), 3), ((6, 4, 1, 1), 2), ((4, 3, 5, 5), 2)])
def test_tt_svd_frames_orthonormal_and_error_no_worse_than_tt_svd(shape, rank):
    w = torch.randn(*shape, dtype=torch.float64)
    f = tt_svd(w, rank=rank)
    r1, r2 = f.ranks
    assert (r1, r2) == (min(rank, shape[1]), min(rank, shape[0]))
    torch.testing.assert_close(f.first @ f.first.T, torch.eye(r1, dtype=torch.float64))
    torch.testing.assert_close(f.last.T @ f.last, torch.eye(r2, dtype=torch.float64))
    err = torch.linalg.norm(f.dense() - w)
    ref_err = torch.linalg.norm(reference_tt_svd(w, r1, r2) - w)
    assert err <= ref_err * (1 + 1e-10)
    plain = tt_svd(w, rank=rank, refine=0)
    torch.testing.assert_close(torch.linalg.norm(plain.dense() - w), ref_err)


def test_full_rank_is_exact():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    f = tt_svd(w, rank=100)
    torch.testing.assert_close(f.dense(), w)


def test_energy_picks_smallest_ranks():
    # an exactly low-rank kernel: Cin-unfolding of rank 2, Cout-unfolding of rank 3
    a = torch.randn(3, 2, 3, 3, dtype=torch.float64)  # core (r2, r1, kh, kw)
    first = torch.linalg.qr(torch.randn(7, 2, dtype=torch.float64))[0].T
    last = torch.linalg.qr(torch.randn(9, 3, dtype=torch.float64))[0]
    w = K.compose_tt(first, a, last)
    f = tt_svd(w, energy=0.999999)
    assert f.ranks == (2, 3)
    torch.testing.assert_close(f.dense(), w)
    f2 = tt_svd(w, energy=0.5)
    assert f2.ranks[0] <= 2 and f2.ranks[1] <= 3


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
def test_tt_layer_forward_equals_dense_conv_of_composed_kernel(stride, padding, dilation):
    conv = nn.Conv2d(6, 8, 3, stride=stride, padding=padding, dilation=dilation, bias=True).double()
    layer = tt_from_conv(conv, tt_svd(conv.weight, rank=4))
    x = torch.randn(2, 6, 12, 12, dtype=torch.float64)
    dense = nn.functional.conv2d(x, layer.dense_weight(), layer.bias, stride, padding, dilation)
    torch.testing.assert_close(layer(x), dense)
    assert layer.first.weight.shape == (4, 6, 1, 1)
    assert layer.core.weight.shape == (4, 4, 3, 3)
    assert layer.last.weight.shape == (8, 4, 1, 1)
    assert layer.core.stride == (stride, stride) and layer.core.dilation == (dilation, dilation)


def test_orthonormal_factors_fold_r_into_core():
    layer = TTConv2d(5, 7, 3, (3, 4), stride=2, padding=1).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    qf, core, ql = orthonormal_factors(layer)
    torch.testing.assert_close(qf @ qf.T, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(ql.T @ ql, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(K.compose_tt(qf, core, ql), layer.dense_weight().double())


@pytest.mark.parametrize("stride,n", [(1, 6), (2, 6), (2, 8)])
def test_tt_spectrum_equals_dense_operator_with_non_orthonormal_frames(stride, n):
    """Theorem 3.2 with stride: spectrum of the core after QR == spectrum of the full TT operator."""
    layer = TTConv2d(5, 6, 3, (3, 4), stride=stride, padding=1).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()  # frames far from orthonormal
    ref = dense_singular_values(periodic_matrix(layer.dense_weight().detach(), (n, n), (stride, stride)))
    got = layer_spectrum("x", layer, (n, n), dtype=torch.float64).values
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-10 * ref[0], rtol=0)


def test_decompose_replaces_convs_and_keeps_other_params_bit_exact():
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.Flatten(), nn.LazyLinear(10),
    )
    net(torch.randn(1, 3, 8, 8))
    bn_before = {k: v.clone() for k, v in net[1].state_dict().items()}
    lin_before = net[7].weight.clone()
    report = decompose(net, rank=4, skip=["0"])
    assert isinstance(net[3], TTConv2d) and net[3].ranks == (4, 4)
    assert isinstance(net[0], nn.Conv2d)  # skipped
    assert isinstance(net[5], nn.Conv2d) and net[5].groups == 4  # grouped stays dense
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert "skip" in reasons["0"] and "grouped" in reasons["5"]
    for k, v in net[1].state_dict().items():
        assert torch.equal(v, bn_before[k])
    assert torch.equal(net[7].weight, lin_before)
    assert report.params_after < report.params_before
    assert report.params_after == sum(p.numel() for p in net.parameters())
    names = [n for n, _ in conv_layers(net)]
    assert names == ["0", "3", "5"]


def test_decompose_leaves_layers_it_would_not_shrink():
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    report = decompose(net, rank=64)
    assert isinstance(net[0], nn.Conv2d)
    assert report.layers[0].ranks is None and "shrink" in report.layers[0].reason


def test_decompose_rejects_bad_rank_and_energy():
    from ttcompress.errors import UserError

    net = nn.Sequential(nn.Conv2d(8, 8, 3))
    with pytest.raises(UserError):
        decompose(net, rank=0)
    with pytest.raises(UserError):
        decompose(net, energy=1.5)
    with pytest.raises(UserError):
        decompose(net, energy=0.0)


def test_conv_layers_and_tt_structure_in_every_dimension():
    """conv_layers lists Conv1d/2d/3d and TT layers; apply_tt_structure picks the TT class from the dense conv it
    replaces, so {name: [r1, r2]} metadata (the 2-D format) restores 1-D and 3-D layers too."""
    from ttcompress.errors import UserError
    from ttcompress.tt import TTConv1d, TTConv3d, apply_tt_structure, tt_ranks

    def build():
        return nn.ModuleDict({
            "a": nn.Conv1d(4, 6, 3), "b": nn.Conv2d(4, 6, 3, stride=2), "c": nn.Conv3d(4, 6, 3, padding=1),
            "t": nn.ConvTranspose2d(4, 4, 3), "fc": nn.Linear(3, 3),
        })

    net = build()
    assert [n for n, _ in conv_layers(net)] == ["a", "b", "c"]  # transposed convs are not convs here
    decompose(net, rank=2)
    assert [type(net[k]) for k in "abc"] == [TTConv1d, TTConv2d, TTConv3d]
    assert [n for n, _ in conv_layers(net)] == ["a", "b", "c"]  # TT children are not listed
    ranks = tt_ranks(net)
    assert ranks == {"a": [2, 2], "b": [2, 2], "c": [2, 2]}
    fresh = build()
    apply_tt_structure(fresh, ranks)
    assert [type(fresh[k]) for k in "abc"] == [TTConv1d, TTConv2d, TTConv3d]
    assert fresh["b"].stride == (2, 2) and fresh["c"].padding == (1, 1, 1)
    fresh.load_state_dict(net.state_dict())
    with pytest.raises(UserError, match="not a Conv1d/2d/3d"):
        apply_tt_structure(build(), {"fc": [1, 1]})


def test_conv_subclasses_with_their_own_forward_stay_dense():
    """A subclass of nn.Conv2d may compute something else (timm's Conv2dSame pads itself, StdConv2d standardises its
    weight): decomposing its raw weight would silently change the network, so it stays dense and says why."""
    import torch.nn.functional as F

    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    torch.manual_seed(0)
    net = nn.Sequential(StdConv(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(2, 16, 8, 8)
    first = net[0](x)
    report = decompose(net, rank=4)
    reasons = {l.name: l.reason for l in report.layers}
    assert "custom conv class StdConv" in reasons["0"] and isinstance(net[0], StdConv)
    assert isinstance(net[1], TTConv2d)
    assert torch.equal(net[0](x), first)  # the layer computes what it computed
