"""Singular-value control against dense references: orthogonal loss, clip, division, BN, linear, verification."""

from __future__ import annotations

import pytest
import torch
from reference import dense_singular_values, operator_matrix, periodic_matrix
from torch import nn

from ttcompress import kernel as K
from ttcompress.control import Controller, orthogonal_loss
from ttcompress.errors import UserError
from ttcompress.tt import TTConv2d, orthonormal_factors


class Tiny(nn.Module):
    """A dense conv, a strided dense conv, a strided TT conv and a stride-1 TT conv, BN and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.tt_down = TTConv2d(8, 8, 3, (4, 5), stride=2, padding=1)
        self.tt = TTConv2d(8, 6, 3, (3, 3), padding=1, bias=False)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.down(x))
        x = self.tt(torch.relu(self.tt_down(x)))
        return self.fc(x.mean((2, 3)))


SIZES = {"conv1": (8, 8), "down": (8, 8), "tt_down": (4, 4), "tt": (2, 2)}
CONVS = ["conv1", "down", "tt_down", "tt"]


def make_net(scale: float = 3.0) -> Tiny:
    torch.manual_seed(0)
    net = Tiny().double()
    with torch.no_grad():
        for name in CONVS:
            layer = net.get_submodule(name)
            for p in layer.parameters():
                if p.dim() > 1:
                    p.mul_(scale)
    return net


def layer_matrix(layer: nn.Module, size, periodic: bool = True) -> torch.Tensor:
    """Dense matrix of the layer: periodic (for clipping) from its full dense kernel, or as it runs (zero padded)."""
    weight = layer.dense_weight() if isinstance(layer, TTConv2d) else layer.weight
    if periodic:
        return periodic_matrix(weight.detach(), size, K.pair(layer.stride), K.pair(layer.dilation))
    bias_free = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                          padding=layer.padding, bias=False).double()
    bias_free.weight.data.copy_(weight.detach())
    return operator_matrix(bias_free, (layer.in_channels, *size))


def sigma(layer, size, periodic=True) -> float:
    return float(dense_singular_values(layer_matrix(layer, size, periodic))[0])


# --- orthogonal loss ----------------------------------------------------------------------------------------------------

def test_orthogonal_loss_hand_computed():
    net = nn.Sequential(TTConv2d(3, 4, 3, (2, 2)), nn.Conv2d(4, 4, 1), TTConv2d(4, 2, 1, (1, 2)))
    a, b, c = net[0], net[1], net[2]
    with torch.no_grad():
        a.first.weight.copy_(K.as_1x1(torch.tensor([[1.0, 0, 0], [0, 2, 0]])))  # F Fᵀ = diag(1, 4): (4-1)² = 9
        a.last.weight.copy_(K.as_1x1(torch.tensor([[1.0, 1], [0, 1], [0, 0], [0, 0]])))  # LᵀL = [[1,1],[1,2]]: 1+1+1
        c.first.weight.copy_(K.as_1x1(torch.tensor([[0.0, 0, 3, 0]])))  # r1 = 1: (9-1)² = 64
        c.last.weight.copy_(K.as_1x1(torch.eye(2)))  # orthonormal: 0
        b.weight.mul_(100)  # dense convs do not count
    # entries: a: 2² + 2², c: 1² + 2²  →  (9 + 3 + 64 + 0) / 13
    assert orthogonal_loss(net).item() == pytest.approx(76 / 13, rel=1e-6)


def test_orthogonal_loss_uses_the_smaller_side_and_is_differentiable():
    layer = TTConv2d(2, 2, 3, (3, 3))  # r1 > Cin: the frame can only have orthonormal columns
    with torch.no_grad():
        layer.first.weight.copy_(K.as_1x1(torch.tensor([[1.0, 0], [0, 1], [0, 0]])))
        layer.last.weight.copy_(K.as_1x1(torch.tensor([[1.0, 0, 0], [0, 1, 0]])))
    assert orthogonal_loss(layer).item() == 0.0
    with torch.no_grad():
        layer.first.weight.mul_(2)
    loss = orthogonal_loss(layer)
    assert loss.item() == pytest.approx(2 * 9 / 8)  # FᵀF = 4I₂: 2·3² over 2² + 2² entries
    loss.backward()
    assert layer.first.weight.grad.abs().sum() > 0 and layer.core.weight.grad is None


def test_orthogonal_loss_takes_other_framed_layers_by_protocol():
    class Framed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor(2.0))

        def orthogonal_terms(self):
            return self.w ** 2, 4  # (squared deviations, entries)

    net = nn.Sequential(TTConv2d(3, 4, 3, (2, 2)), Framed())
    with torch.no_grad():
        net[0].first.weight.copy_(K.as_1x1(torch.tensor([[1.0, 0, 0], [0, 2, 0]])))  # 9 over 4 entries
        net[0].last.weight.copy_(K.as_1x1(torch.eye(4)[:, :2]))  # 0 over 4 entries
    assert orthogonal_loss(net).item() == pytest.approx((9 + 4) / (4 + 4 + 4))


def test_orthogonal_loss_zero_without_tt_layers():
    assert orthogonal_loss(nn.Conv2d(3, 3, 3)).item() == 0.0


# --- clipping -------------------------------------------------------------------------------------------------------------

def test_one_clip_projection_against_dense_reference():
    net = make_net()
    before = {n: sigma(net.get_submodule(n), SIZES[n]) for n in CONVS}
    assert min(before.values()) > 2.0
    ctl = Controller(net, SIZES, clip_to=1.0, clip_every=2, clip_dtype=torch.float64)
    ctl.after_step(1)  # not a clip step
    assert sigma(net.down, SIZES["down"]) == pytest.approx(before["down"])
    ctl.after_step(2)
    for name in CONVS:
        layer = net.get_submodule(name)
        after = sigma(layer, SIZES[name])
        # a single projection with the crop is approximate, but brings σmax most of the way down
        assert after < 0.6 * before[name] and after < 1.6, name
        if isinstance(layer, TTConv2d):  # frames exactly orthonormal, operator = the clipped core's
            f, ell = layer.frames()
            torch.testing.assert_close(f @ f.T, torch.eye(f.shape[0], dtype=f.dtype))
            torch.testing.assert_close(ell.T @ ell, torch.eye(ell.shape[1], dtype=ell.dtype))
            core_sigma = float(dense_singular_values(periodic_matrix(layer.core.weight.detach(), SIZES[name],
                                                                     K.pair(layer.stride)))[0])
            assert core_sigma == pytest.approx(after, rel=1e-9)


def test_clip_of_a_tt_layer_is_sedghi_projection_of_its_core():
    net = make_net()
    layer = net.tt_down
    qf, core, ql = orthonormal_factors(layer)
    from ttcompress.spectral.periodic import clip

    expected = K.compose_tt(qf, clip(core, SIZES["tt_down"], 1.0, K.Geometry((2, 2)), dtype=torch.float64), ql)
    Controller(net, SIZES, clip_to=1.0, clip_every=1, clip_dtype=torch.float64)["clip"].apply()
    torch.testing.assert_close(layer.dense_weight(), expected.to(layer.dense_weight().dtype))


def test_control_keeps_orthonormal_frames_as_they_are():
    """No QR sign flips: rewriting a layer whose frames are already orthonormal must not negate frame rows (the
    optimizer's momentum would then push them the wrong way)."""
    from ttcompress.tt import tt_from_conv, tt_svd

    torch.manual_seed(1)
    conv = nn.Conv2d(6, 8, 3, padding=1, bias=False).double()
    net = nn.Sequential(tt_from_conv(conv, tt_svd(conv.weight, rank=4)))
    f0, l0 = (t.detach().clone() for t in net[0].frames())
    ctl = Controller(net, {"0": (6, 6)}, clip_to=1e6, divide_to=1e6, clip_every=1)
    ctl.after_step(1)
    f1, l1 = net[0].frames()
    torch.testing.assert_close(f1.detach(), f0, rtol=0, atol=1e-12)
    torch.testing.assert_close(l1.detach(), l0, rtol=0, atol=1e-12)
    _, r = torch.linalg.qr(f0.T)
    assert (torch.diagonal(r) < 0).any()  # plain Householder QR would have flipped some of them


@pytest.mark.parametrize("max_reprojections", [3, 0])
def test_enforce_bounds_meets_the_bound_on_the_dense_operator(max_reprojections):
    net = make_net()
    ctl = Controller(net, SIZES, clip_to=1.0, max_reprojections=max_reprojections)
    ctl["clip"].apply()
    reports = {r.name: r for r in ctl.enforce_bounds()}
    assert set(reports) == set(CONVS)
    for name in CONVS:
        dense = sigma(net.get_submodule(name), SIZES[name])
        r = reports[name]
        assert dense <= 1.01 and r.sigma_after == pytest.approx(dense, rel=1e-6)
        assert r.reprojections <= max_reprojections
        if max_reprojections == 0 and r.sigma_before > 1.01:
            assert r.rescale == pytest.approx(1.0 / r.sigma_before) and "rescaled" in r.action
    # one projection was not enough for the 8×8 layers: verification had work to do
    assert reports["conv1"].sigma_before > 1.01 and reports["down"].sigma_before > 1.01
    assert any(r.reprojections for r in reports.values()) == (max_reprojections > 0)


def test_enforce_bounds_leaves_compliant_layers_alone():
    net = make_net(scale=0.05)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    reports = Controller(net, SIZES, clip_to=1.0).enforce_bounds()
    assert all(r.action == "ok" for r in reports)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=1e-6 * max(1.0, float(weights[k].abs().max())))


# --- division ----------------------------------------------------------------------------------------------------------------

def test_division_against_dense_sigma_of_the_running_layer():
    net = make_net()
    ctl = Controller(net, SIZES, divide_to=1.5, power_iters=40)
    zero_padded = {n: sigma(net.get_submodule(n), SIZES[n], periodic=False) for n in CONVS}
    periodic = {n: sigma(net.get_submodule(n), SIZES[n]) for n in CONVS}
    assert min(zero_padded.values()) > 1.5
    assert any(abs(zero_padded[n] - periodic[n]) > 0.05 * periodic[n] for n in CONVS)  # the two differ here
    for step in range(1, 4):
        ctl.after_step(step)
    for name in CONVS:
        # σ̂ is a lower bound of the layer's σmax, so the result sits at D or a hair above it
        got = sigma(net.get_submodule(name), SIZES[name], periodic=False)
        assert 1.5 * (1 - 1e-6) <= got <= 1.5 * (1 + 2e-3), (name, got)
    assert ctl.timings["divide"] > 0 and ctl.timings["clip"] == 0


def test_division_leaves_small_layers_unchanged():
    net = make_net(scale=0.05)
    before = net.down.weight.detach().clone()
    Controller(net, SIZES, divide_to=1.0).after_step(1)
    assert torch.equal(net.down.weight.detach(), before)


def test_controller_state_round_trip_reproduces_division():
    a, b = make_net(), make_net()
    ca = Controller(a, SIZES, divide_to=1.5, seed=3)
    for s in range(1, 4):
        ca.after_step(s)
    b.load_state_dict(a.state_dict())
    cb = Controller(b, SIZES, divide_to=1.5, seed=99)
    cb.load_state_dict(ca.state_dict())
    ca.after_step(4)
    cb.after_step(4)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


# --- BatchNorm and linear ----------------------------------------------------------------------------------------------------

def test_bn_limit_formula():
    net = make_net()
    with torch.no_grad():
        net.bn1.weight.copy_(torch.linspace(-6, 3, 6, dtype=torch.float64))
        net.bn1.running_var.copy_(torch.linspace(0.5, 2.0, 6, dtype=torch.float64))
    gamma = net.bn1.weight.detach().clone()
    lip = (gamma / torch.sqrt(net.bn1.running_var + net.bn1.eps)).abs().max()
    Controller(net, SIZES, bn_to=2.0).after_step(1)
    torch.testing.assert_close(net.bn1.weight.detach(), gamma / (lip / 2.0))
    Controller(net, SIZES, bn_to=100.0).after_step(1)  # already within: unchanged
    torch.testing.assert_close(net.bn1.weight.detach(), gamma / (lip / 2.0))


def test_linear_clip_and_divide():
    net = make_net()
    with torch.no_grad():
        net.fc.weight.mul_(20)
    w = net.fc.weight.detach().clone()
    Controller(net, SIZES, linear_to=0.5).after_step(1)  # no conv clipping: linear clipped every step
    s = torch.linalg.svdvals(net.fc.weight.detach())
    ref = torch.linalg.svdvals(w).clamp(max=0.5)
    torch.testing.assert_close(s, ref)
    net2 = make_net()
    with torch.no_grad():
        net2.fc.weight.mul_(20)
    ctl = Controller(net2, SIZES, divide_to=100.0, linear_to=0.5)
    for step in range(1, 30):
        ctl.after_step(step)
    assert float(torch.linalg.matrix_norm(net2.fc.weight.detach(), ord=2)) == pytest.approx(0.5, rel=1e-4)


def test_grouped_conv_is_refused():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(UserError, match="grouped"):
        Controller(net, {"0": (8, 8)}, clip_to=1.0)


def test_stride_must_divide_the_input_size():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2))
    with pytest.raises(UserError, match="divisible"):
        Controller(net, {"0": (7, 7)}, clip_to=1.0)


# --- FastClip ----------------------------------------------------------------------------------------------------------------

def composition_sigma(net: Tiny, name: str, bn_name: str | None) -> float:
    """Dense σmax of the conv as it runs, followed by its BatchNorm's eval-mode linear part when given."""
    layer = net.get_submodule(name)
    bn = net.get_submodule(bn_name) if bn_name else None
    if bn is None:
        return sigma(layer, SIZES[name], periodic=False)
    bn.eval()
    shape = (layer.in_channels, *SIZES[name])

    def fn(x):
        return bn(layer(x))

    with torch.no_grad():
        zero = fn(torch.zeros(1, *shape, dtype=torch.float64))
    return float(dense_singular_values(operator_matrix(lambda x: fn(x) - zero, shape))[0])


@pytest.mark.parametrize("verify_rounds", [3, 60])
@pytest.mark.parametrize("with_bn", [False, True], ids=["alone", "with-bn"])
def test_fastclip_control_and_verification_against_dense_zero_padded(with_bn, verify_rounds):
    from ttcompress.fastclip import following_batchnorms

    net = make_net()
    with torch.no_grad():
        net.bn1.weight.fill_(2.0)
        net.bn1.running_var.fill_(0.5)
    assert following_batchnorms(net, (3, 8, 8)) == {"conv1": "bn1"}  # `down` feeds a ReLU, the TT layers no BN
    pairs = {"conv1": "bn1"} if with_bn else None
    bn_of = {"conv1": "bn1"} if with_bn else {}
    before = {n: composition_sigma(net, n, bn_of.get(n)) for n in CONVS}
    ctl = Controller(net, SIZES, fastclip_to=1.0, fastclip_every=2, fastclip_rounds=3, clip_with_bn=with_bn,
                     batchnorms=pairs, clip_dtype=torch.float64)
    ctl.after_step(1)  # not a FastClip step
    assert composition_sigma(net, "down", None) == pytest.approx(before["down"], rel=1e-12)
    ctl.after_step(2)
    mid = {n: composition_sigma(net, n, bn_of.get(n)) for n in CONVS}
    assert all(mid[n] < before[n] for n in CONVS) and ctl.timings["fastclip"] > 0
    assert set(ctl["fastclip"].vectors) == set(CONVS)
    ctl["fastclip"].rounds = verify_rounds  # few: the verification has to rescale; many: FastClip alone gets there
    reports = {r.name: r for r in ctl.enforce_bounds()}
    for name in CONVS:
        r = reports[name]
        dense = composition_sigma(net, name, bn_of.get(name))
        assert dense <= 1.0 * (1 + 1e-3), (name, dense)
        assert r.sigma_after == pytest.approx(dense, rel=1e-3) and r.sigma_before == pytest.approx(mid[name], rel=1e-3)
        assert r.operator == ("zero-padded+bn" if name in bn_of else "zero-padded")
        assert (r.reprojections > 0 or r.rescale is not None) == (mid[name] > 1.001)
        assert r.to_json()["operator"] == r.operator and (r.reprojections == 0 or "FastClip" in r.action)
        assert (r.rescale is not None) == (verify_rounds == 3), r.action


def test_fastclip_vectors_round_trip_through_the_state():
    a, b = make_net(), make_net()
    ca = Controller(a, SIZES, fastclip_to=1.0, fastclip_every=1, fastclip_rounds=2, clip_dtype=torch.float64)
    ca.after_step(1)
    b.load_state_dict(a.state_dict())
    cb = Controller(b, SIZES, fastclip_to=1.0, fastclip_every=1, fastclip_rounds=2, clip_dtype=torch.float64)
    cb.load_state_dict(ca.state_dict())
    assert cb["fastclip"].vectors.keys() == ca["fastclip"].vectors.keys() == set(CONVS)
    ca.after_step(2)
    cb.after_step(2)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    fresh = make_net()
    fresh.load_state_dict(b.state_dict())
    cf = Controller(fresh, SIZES, fastclip_to=1.0, fastclip_every=1, fastclip_rounds=2, clip_dtype=torch.float64)
    cf.after_step(3)  # cold start: other (random) vectors, so another path ...
    cb.after_step(3)
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in b.state_dict().items())  # ... a different result


@pytest.mark.parametrize("kw,message", [
    (dict(clip_to=1.0, fastclip_to=1.0), "fastclip_to and clip_to"),
    (dict(divide_to=1.0, fastclip_to=1.0), "fastclip_to and divide_to"),
    (dict(clip_to=1.0, clip_with_bn=True), "clip_with_bn needs fastclip_to"),
    (dict(fastclip_to=1.0, clip_with_bn=True), "batchnorms="),
    (dict(fastclip_to=-1.0), "fastclip_to must be a positive number"),
    (dict(fastclip_to=float("nan")), "fastclip_to must be a positive number"),
    (dict(fastclip_to=1.0, fastclip_k=0), "fastclip_k must be a positive integer"),
])
def test_fastclip_combinations_are_checked(kw, message):
    with pytest.raises(UserError, match=message):
        Controller(make_net(), SIZES, **kw)


# --- padding modes: the bound holds for the layer as it runs ---------------------------------------------------------

def running_sigma(layer: nn.Module, size) -> float:
    """Dense σmax of the layer exactly as it runs (its own padding mode), bias left out."""
    with torch.no_grad():
        zero = layer(torch.zeros(1, layer.in_channels, *size, dtype=torch.float64))
    return float(dense_singular_values(operator_matrix(lambda x: layer(x) - zero, (layer.in_channels, *size)))[0])


def padded_net(mode: str, tt: bool) -> nn.Sequential:
    torch.manual_seed(0)
    layer = (TTConv2d(3, 5, 3, (3, 3), padding=1, padding_mode=mode) if tt
             else nn.Conv2d(3, 5, 3, padding=1, padding_mode=mode))
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(3)
    return nn.Sequential(layer).double()


@pytest.mark.parametrize("tt", [False, True], ids=["dense", "tt"])
@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
def test_padding_modes_fastclip_bounds_the_layer_as_it_runs(mode, tt):
    net = padded_net(mode, tt)
    assert running_sigma(net[0], (6, 6)) > 2
    ctl = Controller(net, {"0": (6, 6)}, fastclip_to=1.0, fastclip_every=1, fastclip_rounds=20,
                     clip_dtype=torch.float64)
    ctl.after_step(1)
    (report,) = ctl.enforce_bounds()
    dense = running_sigma(net[0], (6, 6))
    assert dense <= 1.0 * (1 + 1.5e-3) and report.sigma_after == pytest.approx(dense, rel=1e-3)
    assert report.operator == ("zero" if mode == "zeros" else mode) + "-padded"


@pytest.mark.parametrize("method", ["clip_to", "divide_to"])
@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
def test_padding_modes_periodic_control_is_exact_or_refused(mode, method):
    net = padded_net(mode, tt=False)
    if mode in ("reflect", "replicate"):  # the periodic spectrum says nothing about these layers: no claim made
        with pytest.raises(UserError, match=f"padding_mode='{mode}'.*{method}.*fastclip_to"):
            Controller(net, {"0": (6, 6)}, **{method: 1.0})
        return
    ctl = Controller(net, {"0": (6, 6)}, **{method: 1.0})
    (report,) = ctl.enforce_bounds()
    dense = running_sigma(net[0], (6, 6))
    if mode == "circular":  # the layer as it runs is the periodic operator (shifted): the report is exact
        assert report.sigma_after == pytest.approx(dense, rel=1e-9)
    assert dense <= 1.0 * 1.01 and report.sigma_after <= 1.01


# --- plug-in methods ---------------------------------------------------------------------------------------------

@pytest.fixture
def registry():
    """The method registry, restored after the test (a test method must not leak into other tests)."""
    from ttcompress.control import METHODS

    saved = dict(METHODS)
    yield METHODS
    METHODS.clear()
    METHODS.update(saved)


def test_a_new_method_plugs_in_without_touching_the_package(registry):
    """A toy method, written here: it halves the last linear layer's weight every ``halve_every`` steps, verifies
    the Frobenius norm against ``halve_to`` and keeps a count in its state."""
    from ttcompress.control import BoundReport, ControlMethod, register

    @register
    class Halve(ControlMethod):
        name = "halve"
        order = 45
        settings = {"halve_to": None, "halve_every": 2}

        def __init__(self, linear, bound, every):
            self.linear, self.bound, self.every, self.count = linear, bound, every, 0

        @classmethod
        def build(cls, settings, layers, ctx):
            if settings["halve_to"] is None:
                return None
            return cls(layers.linears[-1][1], settings["halve_to"], settings["halve_every"])

        def due(self, step):
            return step % self.every == 0

        def apply(self):
            self.linear.weight.mul_(0.5)
            self.count += 1

        def verify(self):
            norm = float(self.linear.weight.norm())
            return [BoundReport("fc", "linear", self.bound, norm, norm, operator="frobenius")]

        def state_dict(self):
            return {"count": self.count}

        def load_state_dict(self, state):
            self.count = state["count"]

    net = make_net()
    w = net.fc.weight.detach().clone()
    with pytest.raises(UserError, match="halve_every must be a positive integer"):
        Controller(net, SIZES, halve_to=1.0, halve_every=0)
    ctl = Controller(net, SIZES, halve_to=1.0, bn_to=100.0)
    assert [m.name for m in ctl.methods] == ["halve", "bn"]
    for step in range(1, 6):
        ctl.after_step(step)
    torch.testing.assert_close(net.fc.weight.detach(), w / 4)  # steps 2 and 4
    reports = ctl.enforce_bounds()
    assert [r.operator for r in reports] == ["frobenius"] + ["bn"] and ctl.timings["halve"] > 0
    other = Controller(make_net(), SIZES, halve_to=1.0)
    other.load_state_dict(ctl.state_dict())
    assert other["halve"].count == 2
    with pytest.raises(TypeError, match="unknown setting"):
        Controller(net, SIZES, halve_too=1.0)
