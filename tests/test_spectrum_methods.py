"""σmax by every method (exact periodic, F4, Fourier, power on the running layer) against dense operators built
from basis vectors, on random and real kernels; the `spectrum --method/--all-methods` CLI contract."""

from __future__ import annotations

import json

import pytest
import torch
from reference import dense_singular_values, operator_matrix, periodic_matrix
from torch import nn
from typer.testing import CliRunner

from ttcompress import archs
from ttcompress.errors import UserError
from ttcompress.spectral.methods import METHODS, layer_methods, network_methods, parse_methods
from ttcompress.spectral.network import layer_input_sizes
from ttcompress.tt import TTConv2d, conv_layers

ALL = ("exact", "f4", "fourier", "power")


pytestmark = pytest.mark.usefixtures("one_thread")


def linear_part(layer: nn.Module):
    """The layer's map without its bias (what every method measures)."""
    def apply(x):
        out = layer(x)
        bias = getattr(layer, "bias", None)
        return out if bias is None else out - bias.view(1, -1, 1, 1)

    return apply


def dense_norm(layer: nn.Module, cin: int, n: int) -> float:
    """σmax of the layer as it runs (its padding), from its explicit matrix."""
    return float(dense_singular_values(operator_matrix(linear_part(layer), (cin, n, n)))[0])


def check_layer(layer: nn.Module, cin: int, n: int, periodic_kernel: torch.Tensor, stride: int, dilation: int):
    got = layer_methods("layer", layer, (n, n), ALL, dtype=torch.float64)
    periodic = dense_singular_values(periodic_matrix(periodic_kernel, (n, n), (stride,) * 2, (dilation,) * 2))
    zero = dense_norm(layer, cin, n)
    assert got.sigma_max == pytest.approx(float(periodic[0]), rel=1e-9)
    assert got.spectrum.count == periodic.numel()
    torch.testing.assert_close(got.spectrum.values, periodic, rtol=0, atol=1e-9 * max(float(periodic[0]), 1.0))
    assert abs(got.power_zero_padding - zero) <= 1e-4 * zero and got.power_converged
    for bound in (got.f4_bound, got.fourier_bound):
        assert bound >= got.sigma_max * (1 - 1e-12) and bound >= zero * (1 - 1e-12)
    assert set(got.seconds) == set(ALL) and all(t >= 0 for t in got.seconds.values())
    return got, zero


CONVS = [
    # (Cout, Cin, k, n, stride, padding, dilation)
    (4, 3, 3, 6, 1, 1, 1),
    (6, 4, 3, 8, 2, 1, 1),  # stride 2
    (3, 6, 3, 6, 2, 1, 1),  # non-square, Cout < Cin
    (9, 2, 3, 6, 2, 1, 1),  # Cout > s²·Cin
    (3, 3, 5, 4, 1, 2, 1),  # kernel larger than the input (taps wrap in the periodic operator)
    (4, 2, 5, 4, 2, 2, 1),  # ... and strided
    (3, 3, 3, 8, 1, 2, 2),  # dilation
    (4, 4, 1, 6, 2, 0, 1),  # strided 1×1 (a shortcut)
]


@pytest.mark.parametrize("cout,cin,k,n,stride,padding,dilation", CONVS)
def test_methods_against_dense_operators(cout, cin, k, n, stride, padding, dilation):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation).double()
    check_layer(conv, cin, n, conv.weight.detach(), stride, dilation)


@pytest.mark.parametrize("stride", [1, 2])
def test_tt_layer_methods_against_dense_operators(stride):
    torch.manual_seed(1)
    tt = TTConv2d(5, 7, 3, ranks=(3, 4), stride=stride, padding=1).double()  # frames not orthonormal
    got, zero = check_layer(tt, 5, 6, tt.dense_weight().detach(), stride, 1)
    assert got.kind == "tt"
    # the effective kernel (the QR-folded core) is what carries the layer's norm: F4 of it is not F4 of the
    # dense kernel, and both bound the layer
    assert got.f4_bound >= zero


def test_grouped_conv_is_handled_group_by_group():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2, bias=False).double()
    w = conv.weight.detach()
    dense = torch.zeros(6, 4, 3, 3, dtype=torch.float64)  # the block-diagonal kernel of the same map
    dense[:3, :2], dense[3:, 2:] = w[:3], w[3:]
    check_layer(conv, 4, 6, dense, 2, 1)


def test_kernel_bounds_are_skipped_for_copying_paddings():
    # a 1×1 identity with reflect padding 1: the pixel diagonal to a corner appears 2×2 times in the padded image,
    # so the layer's norm is 2 while the kernel bounds (which assume zero or circular padding) give 1
    conv = nn.Conv2d(1, 1, 1, padding=1, padding_mode="reflect", bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)
    assert dense_norm(conv, 1, 4) == pytest.approx(2.0)
    got = layer_methods("r", conv, (4, 4), ALL, dtype=torch.float64)
    assert got.f4_bound is None and got.fourier_bound is None and set(got.skipped) == {"f4", "fourier"}
    assert got.power_zero_padding == pytest.approx(2.0, rel=1e-4)
    conv3 = nn.Conv2d(2, 3, 3, padding=1, padding_mode="replicate").double()
    zero = dense_norm(conv3, 2, 5)
    assert layer_methods("p", conv3, (5, 5), ["power"]).power_zero_padding == pytest.approx(zero, rel=1e-4)


def test_zero_padded_norm_can_exceed_the_periodic_one():
    """The two operators differ in both directions: [1, 0, −1] across a 2-pixel-wide input cancels itself when the
    taps wrap (periodic σmax 0) but shifts the image when zero-padded (σmax 1); the bounds hold for both."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 0], conv.weight[0, 0, 1, 2] = 1.0, -1.0
    got, zero = check_layer(conv, 1, 2, conv.weight.detach(), 1, 1)
    assert got.sigma_max == pytest.approx(0.0, abs=1e-12) and zero == pytest.approx(1.0)
    assert got.ratio("power") is None  # no ratio to a zero exact value


def test_top_k_are_the_dense_operators_top_singular_values():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False).double()
    got = layer_methods("c", conv, (6, 6), ["power"], top_k=4)
    ref = dense_singular_values(operator_matrix(linear_part(conv), (3, 6, 6)))[:4]
    torch.testing.assert_close(torch.tensor(got.power_top_k, dtype=torch.float64), ref, rtol=1e-4, atol=0)
    assert got.power_zero_padding == got.power_top_k[0]
    assert got.spectrum is None and got.f4_bound is None and set(got.seconds) == {"power"}


def test_parse_methods():
    assert parse_methods(None) == ("exact",)
    assert parse_methods(["power,exact", "f4"]) == ("exact", "f4", "power")
    assert parse_methods("ALL") == METHODS == parse_methods(["fourier", "all"])
    with pytest.raises(UserError, match="unknown spectrum method 'svd'"):
        parse_methods(["exact,svd"])


def test_methods_on_real_resnet20(resnet20_path):
    """Real kernels: both bounds above the exact periodic σmax at the true sizes and above the power estimate
    (a lower bound of the zero-padded σmax); and, at a small input where the dense operator is affordable, above
    the zero-padded σmax itself, which power iteration reproduces."""
    from ttcompress.checkpoint import load

    m = load(resnet20_path, arch="resnet20")
    results = network_methods(m.model, (3, 32, 32), ALL, net=m.net)
    assert len(results) == 19
    for r in results:
        exact = r.sigma_max * (1 - 1e-5)  # float32 accuracy of the exact spectrum
        assert r.f4_bound >= exact and r.fourier_bound >= exact, r.name
        assert r.f4_bound >= r.power_zero_padding and r.fourier_bound >= r.power_zero_padding, r.name
        assert r.power_converged, r.name
    layers = dict(conv_layers(m.net))
    for name in ("conv1", "layer1.2.conv2", "layer2.0.conv1", "layer3.0.conv1", "layer3.2.conv2"):
        conv = layers[name].double()
        n = 4
        zero = dense_norm(conv, conv.in_channels, n)
        got = layer_methods(name, conv, (n, n), ("f4", "fourier", "power"), dtype=torch.float64)
        assert got.f4_bound >= zero and got.fourier_bound >= zero, name
        assert abs(got.power_zero_padding - zero) <= 1e-4 * zero, name


def test_exact_method_matches_the_dense_periodic_operator():
    """Every singular value of each conv's periodic operator, against the dense matrix built column by column."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2, padding=1))
    found = network_methods(net, (3, 8, 8), dtype=torch.float64)
    assert [r.name for r in found] == ["0", "2"]
    for r, (layer, size, stride) in zip(found, ((net[0], (8, 8), (1, 1)), (net[2], (8, 8), (2, 2)))):
        dense = dense_singular_values(periodic_matrix(layer.weight.detach(), size, stride))
        torch.testing.assert_close(r.spectrum.values, dense, rtol=1e-9, atol=1e-10)
        doc = r.to_json()
        assert doc["sigma_max"] == pytest.approx(float(dense[0])) and doc["count"] == dense.numel()
    assert layer_input_sizes(net, (3, 8, 8))["2"] == (8, 8)


# --- CLI ---------------------------------------------------------------------------------------------------------

runner = CliRunner()


def run(*args):
    import ttcompress.cli.decompose  # noqa: F401
    import ttcompress.cli.spectrum  # noqa: F401
    from ttcompress.cli import app

    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def small_tt(tmp_path_factory):
    """A random ResNet-20 decomposed at rank 4 (TT and dense layers), run at 8×8 to stay fast."""
    tmp = tmp_path_factory.mktemp("methods")
    torch.manual_seed(0)
    dense = tmp / "r20.pt"
    torch.save({"state_dict": archs.build("resnet20").net.state_dict()}, dense)
    out = tmp / "tt.safetensors"
    res = run("decompose", dense, "--arch", "resnet20", "--rank", "4", "--skip", "conv1", "-o", out)
    assert res.exit_code == 0, res.output
    return out


def test_cli_all_methods_json_contract(small_tt):
    res = run("spectrum", small_tt, "--input-size", "8", "8", "--all-methods", "--top-k", "2", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["methods"] == list(METHODS)
    keys = {"name", "kind", "input_size", "stride", "sigma_max", "sigma_min", "count", "f4_bound", "fourier_bound",
            "gram_bound", "gram_zero_padding_bound", "power_zero_padding", "power_top_k", "power_converged", "seconds"}
    assert len(doc["layers"]) == 19
    assert {l["kind"] for l in doc["layers"]} == {"conv", "tt"}
    for l in doc["layers"]:
        assert set(l) == keys
        assert set(l["seconds"]) == set(METHODS) and all(t >= 0 for t in l["seconds"].values())
        exact = l["sigma_max"] * (1 - 1e-5)
        assert l["f4_bound"] >= exact and l["fourier_bound"] >= exact
        assert l["gram_bound"] >= exact and l["gram_zero_padding_bound"] >= l["power_zero_padding"]
        assert l["power_zero_padding"] <= min(l["f4_bound"], l["fourier_bound"])
        assert len(l["power_top_k"]) == 2 and l["power_top_k"][0] == l["power_zero_padding"]
        assert l["power_top_k"][0] >= l["power_top_k"][1] and l["power_converged"] is True


def test_cli_single_method_leaves_the_others_null(small_tt):
    res = run("spectrum", small_tt, "--input-size", "8", "8", "--method", "f4", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["methods"] == ["f4"]
    for l in doc["layers"]:
        assert l["sigma_max"] is None and l["sigma_min"] is None and l["count"] is None
        assert l["fourier_bound"] is None and l["power_zero_padding"] is None and l["power_top_k"] is None
        assert l["f4_bound"] > 0 and set(l["seconds"]) == {"f4"}


def test_cli_table_shows_ratios_and_times(small_tt):
    res = run("spectrum", small_tt, "--input-size", "8", "8", "-m", "exact,f4", "-m", "power")
    assert res.exit_code == 0, res.output
    for header in ("σmax", "F4/exact", "σmax 0-pad", "0-pad/exact", "time per layer (ms)", "total"):
        assert header in res.stdout, header
    assert "Fourier" not in res.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--method", "exact,svd"], "unknown spectrum method 'svd'"),
        (["--method", "f4", "--values", "{tmp}/v.npz"], "--values needs the exact spectrum"),
        (["--method", "power", "--plot", "{tmp}/p.png"], "--plot needs the exact spectrum"),
        (["--method", "exact", "--top-k", "3"], "--top-k needs the power method"),
        (["--all-methods", "--top-k", "0"], "--top-k must be at least 1"),
    ],
)
def test_cli_method_errors_are_one_line(small_tt, tmp_path, args, needle):
    res = run("spectrum", small_tt, *[a.format(tmp=tmp_path) for a in args])
    assert res.exit_code == 2
    assert needle in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "v.npz").exists() and not (tmp_path / "p.png").exists()
