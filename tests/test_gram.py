"""Gram-iteration bounds (periodic and zero padding) against dense operators built from basis vectors: stride 1 and
2, non-square channels, TT layers, kernels larger than the input; the regulariser's gradient; the CLI options."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from reference import (
    dense_singular_values,
    operator_matrix,
    periodic_conv,
    periodic_matrix,
    periodic_matrix_nd,
)
from torch import nn

from ttcompress.kernel import Geometry
from ttcompress.spectral.gram import (
    DEFAULT_ITERS,
    gram_bound,
    gram_penalty,
    gram_search,
    gram_zero_padding_bound,
    layer_gram_bound,
    zero_padding_grid,
)
from ttcompress.spectral.methods import layer_methods
from ttcompress.spectral.network import layer_input_sizes
from ttcompress.spectral.periodic import singular_values
from ttcompress.tt import TTConv1d, TTConv2d

pytestmark = pytest.mark.usefixtures("one_thread")

# (Cout, Cin, k, n, stride, dilation)
PERIODIC = [
    (4, 3, 3, 6, 1, 1),
    (6, 4, 3, 8, 2, 1),  # stride 2
    (3, 6, 3, 6, 2, 1),  # non-square, Cout < Cin
    (9, 2, 3, 6, 2, 1),  # Cout > s²·Cin
    (3, 3, 5, 4, 1, 1),  # kernel larger than the input (taps wrap)
    (4, 2, 5, 4, 2, 1),  # ... and strided
    (3, 3, 3, 8, 1, 2),  # dilation
    (4, 4, 1, 6, 2, 1),  # strided 1×1 (three idle phases)
    (5, 3, (1, 3), (4, 6), (1, 2), 1),  # rectangular kernel, input and stride
]


def periodic_norm(kernel: torch.Tensor, n, stride, dilation=1) -> float:
    size = (n, n) if isinstance(n, int) else n
    s = (stride, stride) if isinstance(stride, int) else stride
    return float(dense_singular_values(periodic_matrix(kernel, size, s, (dilation,) * 2))[0])


def schatten(values: torch.Tensor, p: float) -> float:
    top = float(values[0])
    return top * float(((values / top) ** p).sum()) ** (1 / p) if top > 0 else 0.0


@pytest.mark.parametrize("cout,cin,k,n,stride,dilation", PERIODIC)
def test_gram_bound_against_the_dense_periodic_operator(cout, cin, k, n, stride, dilation):
    torch.manual_seed(3)
    ks = (k, k) if isinstance(k, int) else k
    kernel = torch.randn(cout, cin, *ks, dtype=torch.float64)
    geometry = Geometry((stride,) * 2 if isinstance(stride, int) else stride, (dilation, dilation))
    size = (n, n) if isinstance(n, int) else n
    values = dense_singular_values(periodic_matrix(kernel, size, geometry.stride, geometry.dilation))
    exact = float(values[0])
    for iters in (1, 2, 3, 5, DEFAULT_ITERS):
        bound = float(gram_bound(kernel, size, geometry, iters=iters))
        # an upper bound at every t, and never above the Gram bound of the whole operator (whose blocks' Schatten
        # norms it takes the largest of): ‖A‖_{S_p}, p = 2^{t+1}
        assert bound >= exact, iters
        assert bound <= schatten(values, 2.0 ** (iters + 1)) * (1 + 1e-9), iters
    assert float(gram_bound(kernel, size, geometry)) <= exact * (1 + 1e-3)  # the default is tight


def test_gram_bound_is_the_exact_norm_for_rank_one_blocks_and_zero_for_zero():
    torch.manual_seed(0)
    kernel = torch.randn(1, 3, 3, 3, dtype=torch.float64)  # 1×3 transfer matrices: σ1 = ‖row‖, nothing else
    exact = periodic_norm(kernel, 6, 1)
    for iters in (1, 4):
        bound = float(gram_bound(kernel, (6, 6), iters=iters))
        assert exact <= bound <= exact * (1 + 1e-9)
    zero = gram_search(torch.zeros(2, 2, 3, 3), (4, 4))
    assert zero.bound == 0.0 and zero.frequency is None


def test_flat_maximum_over_frequencies():
    """A random 16-channel layer on a 16×16 grid: σ1 is nearly flat over the frequencies, so the Cholesky
    certificates hold with little room (exact σmax from the exact spectrum: the dense operator would be
    4096×4096)."""
    torch.manual_seed(5)
    kernel = torch.randn(16, 16, 3, 3, dtype=torch.float64)
    exact = float(singular_values(kernel, (16, 16), dtype=torch.float64)[0])
    bound = float(gram_bound(kernel, (16, 16)))
    assert exact <= bound <= exact * (1 + 1e-3)


def test_a_block_that_fails_its_certificate_is_iterated(monkeypatch):
    """Two frequencies with transfer matrices A = diag(1, 0.9, …, 0.9) and B = diag(0.97, 0, …): B has the larger
    first-level lower bound (‖G‖_F/√tr G is tight for rank one, loose for A) and is iterated first, but σ1(A) = 1
    is above B's bound, so A fails its Cholesky certificate and must be iterated too; the result is A's bound."""
    import ttcompress.spectral.gram as gram

    a = torch.diag(torch.tensor([1.0, 0.9, 0.9, 0.9, 0.9, 0.9], dtype=torch.float64))
    b = torch.diag(torch.tensor([0.97, 0, 0, 0, 0, 0], dtype=torch.float64))
    kernel = torch.stack([(a + b) / 2, (a - b) / 2], -1).unsqueeze(2)  # (6, 6, 1, 2): P̂(0) = A, P̂(1) = B on 1×2
    iterated = []
    spy = gram._log_gram
    monkeypatch.setattr(gram, "_log_gram", lambda g, iters, floor=-math.inf: iterated.append(len(g))
                        or spy(g, iters, floor))
    for iters in (2, 4):
        iterated.clear()
        found = gram_search(kernel, (1, 2), iters=iters)
        assert len(iterated) == 2 and found.frequency == (0, 0)
        assert found.bound == pytest.approx(schatten(torch.diagonal(a), 2.0 ** (iters + 1)), rel=1e-9)
    assert float(gram_bound(kernel, (1, 2))) >= periodic_norm(kernel, (1, 2), 1) == pytest.approx(1.0)


def test_chunks_and_threads_do_not_change_the_value():
    torch.manual_seed(6)
    kernel = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    ref = gram_search(kernel, (8, 8), Geometry((2, 2)), iters=4)
    small = gram_search(kernel, (8, 8), Geometry((2, 2)), iters=4, chunk=3)
    assert small.bound == pytest.approx(ref.bound, rel=1e-12)
    torch.set_num_threads(2)
    assert gram_search(kernel, (8, 8), Geometry((2, 2)), iters=4, chunk=2).bound == pytest.approx(ref.bound, rel=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
def test_tt_layers_through_the_core(stride):
    torch.manual_seed(1)
    tt = TTConv2d(5, 7, 3, ranks=(3, 4), stride=stride, padding=1).double()  # frames not orthonormal
    exact = periodic_norm(tt.dense_weight().detach(), 6, stride)
    bound = float(layer_gram_bound(tt, (6, 6)))
    assert exact <= bound <= exact * (1 + 1e-3)
    zero = float(dense_singular_values(operator_matrix(lambda x: tt(x) - tt.bias.view(1, -1, 1, 1), (5, 6, 6)))[0])
    assert float(layer_gram_bound(tt, (6, 6), zero_padding=True)) >= zero


def test_one_dimensional_and_grouped_convs():
    torch.manual_seed(2)
    conv = nn.Conv1d(3, 5, 5, stride=2, padding=2, bias=False).double()
    exact = float(dense_singular_values(periodic_matrix_nd(conv.weight.detach(), (10,), (2,)))[0])
    assert exact <= float(layer_gram_bound(conv, (10,))) <= exact * (1 + 1e-3)
    zero = float(dense_singular_values(operator_matrix(conv, (3, 9)))[0])  # 9: not a multiple of the stride
    assert float(layer_gram_bound(conv, (9,), zero_padding=True)) >= zero
    tt = TTConv1d(4, 6, 3, ranks=(2, 3), padding=1).double()
    exact = float(dense_singular_values(periodic_matrix_nd(tt.dense_weight().detach(), (8,)))[0])
    assert exact <= float(layer_gram_bound(tt, (8,))) <= exact * (1 + 1e-3)
    grouped = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2, bias=False).double()
    zero = float(dense_singular_values(operator_matrix(grouped, (4, 6, 6)))[0])
    w = grouped.weight.detach()
    block = torch.zeros(6, 4, 3, 3, dtype=torch.float64)
    block[:3, :2], block[3:, 2:] = w[:3], w[3:]
    exact = periodic_norm(block, 6, 2)
    assert exact <= float(layer_gram_bound(grouped, (6, 6))) <= exact * (1 + 1e-3)
    assert float(layer_gram_bound(grouped, (6, 6), zero_padding=True)) >= zero


# --- zero padding ------------------------------------------------------------------------------------------------

# (Cout, Cin, k, n, stride, padding, dilation)
ZERO = [
    (4, 3, 3, 6, 1, 1, 1),
    (6, 4, 3, 8, 2, 1, 1),  # stride 2
    (3, 5, 3, 7, 2, 1, 1),  # odd input, stride 2, Cout < Cin
    (9, 2, 3, 6, 2, 1, 1),  # Cout > s²·Cin
    (3, 3, 5, 4, 1, 2, 1),  # kernel larger than the input
    (4, 2, 5, 3, 2, 2, 1),  # ... strided, odd
    (3, 3, 3, 8, 1, 2, 2),  # dilation
    (4, 4, 1, 6, 2, 0, 1),  # strided 1×1
    (3, 2, 3, 6, 1, 0, 1),  # no padding ("valid")
    (2, 3, 4, 5, 1, "same", 1),  # even kernel, asymmetric "same" padding
    (3, 2, 3, 5, 1, 3, 1),  # padding wider than the kernel's reach
]


def zero_padded(cout, cin, k, n, stride, padding, dilation):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=False).double()
    return conv, float(dense_singular_values(operator_matrix(conv, (cin, n, n)))[0])


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("cout,cin,k,n,stride,padding,dilation", ZERO)
def test_zero_padded_layer_is_a_submatrix_of_the_periodic_one_on_the_grid(cout, cin, k, n, stride, padding, dilation):
    """The construction itself: zero-extend the input to the grid, run the periodic conv shifted by the left
    padding, keep the first outputs — the zero-padded layer's exact output."""
    torch.manual_seed(4)
    conv, _ = zero_padded(cout, cin, k, n, stride, padding, dilation)
    geometry = Geometry((stride, stride), (dilation, dilation))
    grid = zero_padding_grid((k, k), (n, n), geometry, padding)
    assert all(g % stride == 0 and g >= n for g in grid)
    left = (dilation * (k - 1)) // 2 if padding == "same" else padding
    x = torch.randn(2, cin, n, n, dtype=torch.float64)
    y = conv(x)
    big = F.pad(x, (0, grid[1] - n, 0, grid[0] - n))
    z = periodic_conv(big, conv.weight.detach(), (stride,) * 2, (dilation,) * 2, (left, left))
    torch.testing.assert_close(z[..., : y.shape[2], : y.shape[3]], y, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("cout,cin,k,n,stride,padding,dilation", ZERO)
def test_gram_zero_padding_bound_against_the_dense_operator(cout, cin, k, n, stride, padding, dilation):
    torch.manual_seed(4)
    conv, zero = zero_padded(cout, cin, k, n, stride, padding, dilation)
    got = layer_methods("c", conv, (n, n), ["gram-zero", "power"])
    assert got.gram_zero_padding_bound >= zero
    assert got.gram_zero_padding_bound >= got.power_zero_padding  # PowerQR: a lower estimate of the same norm
    direct = gram_zero_padding_bound(conv.weight.detach(), (n, n), Geometry.of(conv), padding)
    assert float(direct) == pytest.approx(got.gram_zero_padding_bound, rel=1e-12)


def test_circular_and_copying_paddings():
    torch.manual_seed(7)
    circular = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular", bias=False).double()
    exact = float(dense_singular_values(operator_matrix(circular, (3, 6, 6)))[0])
    assert exact == pytest.approx(periodic_norm(circular.weight.detach(), 6, 1), rel=1e-12)
    assert exact <= float(layer_gram_bound(circular, (6, 6), zero_padding=True)) <= exact * (1 + 1e-3)
    wide = nn.Conv2d(3, 4, 3, padding=2, padding_mode="circular", bias=False).double()  # 8 outputs from 6 inputs
    with pytest.raises(ValueError, match="circular padding"):
        layer_gram_bound(wide, (6, 6), zero_padding=True)
    reflect = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect").double()
    got = layer_methods("r", reflect, (6, 6), ["gram", "gram-zero"])
    assert got.gram_bound is not None and got.gram_zero_padding_bound is None and set(got.skipped) == {"gram-zero"}
    conv3d = nn.Conv3d(2, 2, 3, padding=1)
    got = layer_methods("v", conv3d, (4, 4, 4), ["gram", "gram-zero", "f4"])
    assert set(got.skipped) == {"gram", "gram-zero"} and got.f4_bound is not None


# --- differentiable bound and regulariser --------------------------------------------------------------------------

def test_gradient_matches_finite_differences():
    torch.manual_seed(8)
    kernel = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    value = gram_bound(kernel, (6, 6), Geometry((2, 2)), iters=6)
    assert float(value.detach()) == gram_search(kernel, (6, 6), Geometry((2, 2)), iters=6).bound
    (grad,) = torch.autograd.grad(value, kernel)
    direction = torch.randn_like(kernel)
    eps = 1e-6
    with torch.no_grad():
        plus = float(gram_bound(kernel + eps * direction, (6, 6), Geometry((2, 2)), iters=6))
        minus = float(gram_bound(kernel - eps * direction, (6, 6), Geometry((2, 2)), iters=6))
    assert float((grad * direction).sum()) == pytest.approx((plus - minus) / (2 * eps), rel=1e-5)


def test_gram_penalty_is_differentiable_and_gradient_steps_lower_it():
    torch.manual_seed(9)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), TTConv2d(6, 8, 3, ranks=(4, 4), stride=2, padding=1),
                        nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2))
    sizes = layer_input_sizes(net, (3, 8, 8))
    penalty = gram_penalty(net, sizes)
    # the grouped conv is left out, as in f4_penalty
    expected = float(layer_gram_bound(net[0], sizes["0"])) + float(layer_gram_bound(net[2], sizes["2"]))
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(gram_penalty(net, sizes, weight=0.5).detach()) == pytest.approx(0.5 * expected, rel=1e-6)
    penalty.backward()
    tt = net[2]
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0
               for p in (net[0].weight, tt.first.weight, tt.core.weight, tt.last.weight))
    assert net[4].weight.grad is None
    opt = torch.optim.SGD(net.parameters(), lr=0.02)
    values = []
    for _ in range(6):
        opt.zero_grad()
        loss = gram_penalty(net, sizes)
        values.append(float(loss.detach()))
        loss.backward()
        opt.step()
    assert values[-1] < 0.8 * values[0] and all(b < a for a, b in zip(values, values[1:])), values
    assert float(gram_penalty(nn.Sequential(nn.ReLU()), {})) == 0.0


# --- network, CLI --------------------------------------------------------------------------------------------------

def test_gram_on_real_resnet20(resnet20_path):
    """Every conv of the pretrained ResNet-20: gram ≥ exact (float64) and within 1e-3 at the default iterations;
    gram-zero ≥ PowerQR's σmax of the layer as it runs."""
    from ttcompress.checkpoint import load
    from ttcompress.spectral.methods import network_methods

    m = load(resnet20_path, arch="resnet20")
    results = network_methods(m.model, (3, 32, 32), ("exact", "gram", "gram-zero", "power"), net=m.net,
                              dtype=torch.float64)
    assert len(results) == 19
    for r in results:
        assert r.sigma_max <= r.gram_bound <= r.sigma_max * (1 + 1e-3), r.name
        assert r.gram_zero_padding_bound >= r.power_zero_padding, r.name


def test_cli_gram_options(tmp_path):
    from typer.testing import CliRunner

    import ttcompress.cli.spectrum  # noqa: F401
    from ttcompress.cli import app

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1))
    path = tmp_path / "net.pt"
    (tmp_path / "arch.py").write_text(
        "from torch import nn\n"
        "class Net(nn.Sequential):\n"
        "    input_size = (3, 8, 8)\n"
        "    def __init__(self):\n"
        "        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1))\n")
    torch.save(net.state_dict(), path)
    runner = CliRunner()
    arch = f"{tmp_path / 'arch.py'}:Net"
    res = runner.invoke(app, ["spectrum", str(path), "--arch", arch, "--method", "exact,gram,gram-zero",
                              "--gram-iters", "3", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["methods"] == ["exact", "gram", "gram-zero"]
    for layer in doc["layers"]:
        assert layer["gram_bound"] >= layer["sigma_max"] * (1 - 1e-6)
        assert layer["gram_zero_padding_bound"] > 0 and set(layer["seconds"]) == {"exact", "gram", "gram-zero"}
    res = runner.invoke(app, ["spectrum", str(path), "--arch", arch, "-m", "exact,gram", "-m", "gram-zero"])
    assert res.exit_code == 0, res.output
    assert "Gram/exact" in res.stdout and "Gram 0-pad" in res.stdout
    for args, needle in ((["--method", "exact", "--gram-iters", "4"], "--gram-iters needs a Gram method"),
                         (["--method", "gram", "--gram-iters", "0"], "--gram-iters must be at least 1")):
        res = runner.invoke(app, ["spectrum", str(path), "--arch", arch, *args])
        assert res.exit_code == 2 and needle in res.output and len(res.output.strip().splitlines()) == 1, res.output
    res = runner.invoke(app, ["spectrum", "--help"])
    assert f"default {DEFAULT_ITERS}" in " ".join(res.output.split())


def test_iters_must_be_positive():
    with pytest.raises(ValueError, match="positive integer"):
        gram_bound(torch.randn(2, 2, 3, 3), (4, 4), iters=0)
    assert math.isfinite(float(gram_bound(torch.randn(2, 2, 3, 3), (4, 4), iters=1)))
