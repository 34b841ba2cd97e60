"""1-D and 3-D convolutions: exact periodic spectra, TT layers, decompose, checkpoints and the CLI — against dense
operators built by applying the layers to basis vectors."""

from __future__ import annotations

import json
import math
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import dense_singular_values, operator_matrix, periodic_conv_nd, periodic_matrix_nd
from ttcompress.errors import UserError
from ttcompress import kernel as K
from ttcompress.spectral.ndim import half_grid, singular_values_nd
from ttcompress.spectral.network import layer_input_sizes, layer_spectrum, network_spectrum
from ttcompress.tt import (
    TTConv,
    TTConv1d,
    TTConv2d,
    TTConv3d,
    conv_layers,
    decompose,
    orthonormal_factors,
    tt_class,
    tt_from_conv,
    tt_svd,
)

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


pytestmark = pytest.mark.usefixtures("one_thread")


def _random(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# --- the reference itself ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims,stride,dilation", [(1, 3, 2), (1, 1, 1), (3, 1, 1), (3, 2, 1), (3, 1, 2)])
def test_reference_is_torch_conv_on_a_circularly_padded_input(dims, stride, dilation):
    """The tap-by-tap circular conv of tests/reference.py equals PyTorch's conv of the circularly padded input."""
    n = (12,) if dims == 1 else (6, 8, 4)
    x, w = _random(2, 2, *n), _random(3, 2, *(3,) * dims)
    reach = dilation * 2  # the kernel reaches d·(k − 1) pixels beyond the last output position
    padded = F.pad(x, (0, reach) * dims, mode="circular")
    expected = CONV[dims](padded, w, stride=stride, dilation=dilation)
    size = tuple(math.ceil(v / stride) for v in n)
    got = periodic_conv_nd(x, w, (stride,) * dims, (dilation,) * dims)
    torch.testing.assert_close(got, expected[(..., *(slice(0, s) for s in size))])


# --- exact periodic spectra ----------------------------------------------------------------------------------------

SPECTRA_1D = [  # cin, cout, k, n, stride, dilation
    (3, 5, 3, 8, 1, 1),  # Cout > Cin
    (4, 3, 3, 8, 2, 1),  # stride 2, Cout < s·Cin
    (2, 3, 5, 4, 1, 1),  # kernel longer than the input: taps wrap
    (3, 3, 3, 12, 2, 3),  # stride and dilation
    (2, 4, 7, 4, 2, 1),  # longer than the input, strided: wrapped taps add up
    (2, 3, 1, 6, 2, 1),  # strided 1-tap conv: one phase idle
]
SPECTRA_3D = [  # cin, cout, k, n, stride, dilation
    (2, 3, (3, 3, 3), (4, 4, 4), (1, 1, 1), (1, 1, 1)),
    (3, 2, (3, 3, 3), (4, 4, 6), (2, 2, 2), (1, 1, 1)),  # stride 2, non-cubic input
    (2, 3, (3, 2, 3), (2, 4, 4), (1, 2, 1), (1, 1, 2)),  # mixed strides, dilation, kernel deeper than input
    (3, 2, (5, 3, 3), (3, 4, 4), (1, 2, 2), (1, 1, 1)),  # kernel larger than the input in depth, odd depth
    (2, 5, (1, 1, 1), (4, 4, 4), (2, 2, 2), (1, 1, 1)),  # strided 1×1×1 conv: seven idle phases
]


def _check_against_dense(w, n, stride, dilation):
    ref = dense_singular_values(periodic_matrix_nd(w, n, stride, dilation))
    got = singular_values_nd(w, n, stride, dilation, dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-10 * float(ref[0]), rtol=0)
    got32 = singular_values_nd(w.float(), n, stride, dilation, dtype=torch.float32)
    assert got32.dtype == torch.float32 and got32.shape == ref.shape
    torch.testing.assert_close(got32.double(), ref, atol=1e-5 * float(ref[0]), rtol=0)


@pytest.mark.parametrize("cin,cout,k,n,stride,dilation", SPECTRA_1D)
def test_1d_spectrum_equals_dense_operator(cin, cout, k, n, stride, dilation):
    _check_against_dense(_random(cout, cin, k), (n,), (stride,), (dilation,))


@pytest.mark.parametrize("cin,cout,k,n,stride,dilation", SPECTRA_3D)
def test_3d_spectrum_equals_dense_operator(cin, cout, k, n, stride, dilation):
    _check_against_dense(_random(cout, cin, *k), n, stride, dilation)


def test_2d_spectrum_goes_through_unchanged():
    _check_against_dense(_random(3, 2, 3, 3), (6, 4), (2, 1), (1, 2))


def test_3d_spectrum_chunked_and_int_arguments():
    w = _random(3, 2, 3, 3, 3)
    whole = singular_values_nd(w, (4, 4, 4), 2, 1, dtype=torch.float64)
    one_by_one = singular_values_nd(w, [4, 4, 4], (2, 2, 2), dtype=torch.float64, chunk=1)
    torch.testing.assert_close(whole, one_by_one, atol=1e-13, rtol=0)
    torch.set_num_threads(2)  # chunks on two worker threads (the fixture restores the count)
    threaded = singular_values_nd(w, (4, 4, 4), 2, dtype=torch.float64)
    assert torch.get_num_threads() == 2
    torch.testing.assert_close(threaded, whole, atol=1e-13, rtol=0)


def test_half_grid_represents_every_frequency_once():
    for grid in [(4, 4, 4), (3, 5, 6), (2, 1, 7), (5,), (6,)]:
        freqs, weight = half_grid(grid)
        m = torch.tensor(grid)
        covered = [tuple(f.tolist()) for f in freqs]
        covered += [tuple(((-f) % m).tolist()) for f, w in zip(freqs, weight) if w == 2]
        expected = [tuple(f) for f in torch.cartesian_prod(*[torch.arange(v) for v in grid]).reshape(-1, len(grid))
                    .tolist()]
        assert sorted(covered) == sorted(expected)  # each frequency exactly once, with its mirror


def test_spectrum_rejects_bad_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        singular_values_nd(_random(2, 2, 3, 3, 3), (4, 5, 4), 2)
    with pytest.raises(ValueError, match="integer"):
        singular_values_nd(_random(2, 2, 3), (4, 4), 1)
    with pytest.raises(ValueError, match="1, 2 or 3"):
        singular_values_nd(_random(2, 2, 3, 3, 3, 3), (4, 4, 4, 4))


# --- TT layers -----------------------------------------------------------------------------------------------------

def reference_tt_svd(w: torch.Tensor, r1: int, r2: int) -> torch.Tensor:
    """Plain TT-SVD (two truncated SVDs) written with explicit reshapes, any number of spatial dims."""
    cout, cin, taps = w.shape[0], w.shape[1], math.prod(w.shape[2:])
    m1 = w.reshape(cout, cin, taps).permute(1, 2, 0).reshape(cin, taps * cout)
    u, s, vt = torch.linalg.svd(m1, full_matrices=False)
    rest = (torch.diag(s[:r1]) @ vt[:r1]).reshape(r1 * taps, cout)
    u2, s2, vt2 = torch.linalg.svd(rest, full_matrices=False)
    approx = u[:, :r1] @ (u2[:, :r2] @ torch.diag(s2[:r2]) @ vt2[:r2]).reshape(r1, taps * cout)
    return approx.reshape(cin, taps, cout).permute(2, 0, 1).reshape(w.shape)


@pytest.mark.parametrize("shape,rank", [((8, 6, 3), 3), ((5, 7, 5), 4), ((6, 4, 3, 3, 3), 3), ((4, 5, 1, 3, 2), 2)])
def test_tt_svd_in_1d_and_3d(shape, rank):
    w = _random(*shape)
    f = tt_svd(w, rank=rank)
    r1, r2 = f.ranks
    assert (r1, r2) == (min(rank, shape[1]), min(rank, shape[0])) and f.core.shape == (r2, r1, *shape[2:])
    torch.testing.assert_close(f.first @ f.first.T, torch.eye(r1, dtype=torch.float64))
    torch.testing.assert_close(f.last.T @ f.last, torch.eye(r2, dtype=torch.float64))
    ref_err = torch.linalg.norm(reference_tt_svd(w, r1, r2) - w)
    torch.testing.assert_close(torch.linalg.norm(tt_svd(w, rank=rank, refine=0).dense() - w), ref_err)
    assert torch.linalg.norm(f.dense() - w) <= ref_err * (1 + 1e-10)
    torch.testing.assert_close(tt_svd(w, rank=100).dense(), w)  # full rank: exact


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_tt_layer_forward_equals_dense_conv_of_composed_kernel(dims, stride, padding, dilation):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](5, 7, 3, stride=stride, padding=padding,
                                                           dilation=dilation).double()
    layer = tt_from_conv(conv, tt_svd(conv.weight, rank=3))
    assert type(layer) is tt_class(dims) and isinstance(layer, TTConv) and layer.dims == dims
    assert set(layer.state_dict()) == {"first.weight", "core.weight", "last.weight", "last.bias"}
    assert layer.first.weight.shape == (3, 5, *(1,) * dims) and layer.core.weight.shape == (3, 3, *(3,) * dims)
    x = _random(2, 5, *(9, 8, 7)[:dims])
    dense = CONV[dims](x, layer.dense_weight(), layer.bias, stride, padding, dilation)
    torch.testing.assert_close(layer(x), dense)
    assert layer.stride == (stride,) * dims and layer.core.dilation == (dilation,) * dims


def test_tt_conv2d_keeps_its_constructor_and_the_base_is_abstract():
    layer = TTConv2d(4, 6, 3, (2, 3), stride=2, padding=1)
    assert layer.kernel_size == (3, 3) and layer.ranks == (2, 3) and isinstance(layer.core, nn.Conv2d)
    assert isinstance(TTConv1d(4, 6, 3, (2, 3)).core, nn.Conv1d)
    assert isinstance(TTConv3d(4, 6, (3, 1, 3), (2, 3)).core, nn.Conv3d)
    with pytest.raises(TypeError):
        TTConv(4, 6, 3, (2, 3))
    with pytest.raises(ValueError):
        tt_class(4)


def _tt_operator(layer: TTConv, n) -> torch.Tensor:
    """The periodic TT layer applied factor by factor (1×1, circular core, 1×1) to basis vectors."""
    first, last = (f.detach().double() for f in layer.frames())
    core = layer.core.weight.detach().double()

    def apply(x):
        y = torch.einsum("rc,nc...->nr...", first, x)
        y = periodic_conv_nd(y, core, layer.stride, layer.dilation)
        return torch.einsum("or,nr...->no...", last, y)

    return operator_matrix(apply, (layer.in_channels, *n))


@pytest.mark.parametrize("dims,n,stride", [(1, (8,), 1), (1, (8,), 2), (3, (4, 4, 4), 1), (3, (4, 4, 2), 2)])
def test_tt_spectrum_equals_dense_operator_with_non_orthonormal_frames(dims, n, stride):
    """Theorem 3.2 in 1-D and 3-D: the core after QR of the frames has the TT operator's nonzero singular values."""
    layer = tt_class(dims)(5, 6, 3, (3, 4), stride=stride, padding=1).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()  # frames far from orthonormal
    ref = dense_singular_values(_tt_operator(layer, n))
    spec = layer_spectrum("x", layer, n, dtype=torch.float64)
    assert spec.kind == "tt" and spec.input_size == n and spec.stride == (stride,) * dims
    assert spec.values.shape == ref.shape  # padded with the full operator's zeros
    torch.testing.assert_close(spec.values, ref, atol=1e-10 * float(ref[0]), rtol=0)
    qf, core, ql = orthonormal_factors(layer)
    torch.testing.assert_close(K.compose_tt(qf, core, ql), layer.dense_weight().double())
    json.dumps(spec.to_json())


def test_orthogonal_loss_counts_1d_and_3d_frames():
    from ttcompress.control import orthogonal_loss

    net = nn.Sequential(TTConv1d(3, 4, 3, (2, 2)), TTConv3d(2, 2, 1, (1, 2)))
    a, b = net
    with torch.no_grad():
        a.first.weight.copy_(K.as_1x1(torch.tensor([[1.0, 0, 0], [0, 2, 0]]), 1))  # F Fᵀ = diag(1, 4): 9
        a.last.weight.copy_(K.as_1x1(torch.tensor([[1.0, 1], [0, 1], [0, 0], [0, 0]]), 1))  # LᵀL = [[1,1],[1,2]]: 3
        b.first.weight.copy_(K.as_1x1(torch.tensor([[0.0, 3]]), 3))  # (9 − 1)² = 64
        b.last.weight.copy_(K.as_1x1(torch.eye(2), 3))  # 0
    assert float(orthogonal_loss(net).detach()) == pytest.approx((9 + 3 + 64 + 0) / (4 + 4 + 1 + 4))


# --- whole networks ------------------------------------------------------------------------------------------------

def _net1d():
    return nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 12, 5, stride=2, padding=2, bias=False),
        nn.ReLU(), nn.Conv1d(12, 12, 3, padding=1, groups=3),
    )


# a tiny volumetric classifier, as source: written to a file for the checkpoint and CLI tests, and run here
VOL3D_SOURCE = '''import torch
from torch import nn


class Vol3d(nn.Module):
    input_size = (2, 4, 8, 8)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(2, 8, 3, padding=1)
        self.down = nn.Conv3d(8, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.down(torch.relu(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3, 4)))
'''


_vol3d_namespace: dict = {}
exec(VOL3D_SOURCE, _vol3d_namespace)
Vol3d = _vol3d_namespace["Vol3d"]


def test_decompose_1d_and_3d_networks():
    net = _net1d().double()
    weights = {name: m.weight.detach().clone() for name, m in conv_layers(net)}
    report = decompose(net, rank=4)
    assert [n for n, _ in conv_layers(net)] == ["0", "2", "4"]
    assert isinstance(net[2], TTConv1d) and net[2].ranks == (4, 4) and net[2].stride == (2,)
    assert isinstance(net[4], nn.Conv1d) and "grouped" in report.layers[2].reason
    assert report.layers[1].shape == [12, 8, 5]
    assert "shrink" in report.layers[0].reason  # 3 → 8 channels, k = 3: TT would not be smaller
    w = weights["2"]
    err = float(torch.linalg.norm(net[2].dense_weight().detach() - w) / torch.linalg.norm(w))
    assert report.layers[1].rel_error == pytest.approx(err) and 0 < err < 1
    assert report.params_after == sum(p.numel() for p in net.parameters()) < report.params_before

    vol = Vol3d().double()
    approx = Vol3d().double()
    approx.load_state_dict(vol.state_dict())
    report = decompose(vol, rank=4)
    assert isinstance(vol.down, TTConv3d) and vol.down.ranks == (4, 4) and vol.down.stride == (2, 2, 2)
    assert isinstance(vol.stem, TTConv3d) and vol.stem.ranks == (2, 4)  # r1 ≤ Cin = 2
    assert report.layers[1].shape == [12, 8, 3, 3, 3]
    # the decomposed network is the dense one with each kernel replaced by its TT approximation
    with torch.no_grad():
        approx.stem.weight.copy_(vol.stem.dense_weight())
        approx.down.weight.copy_(vol.down.dense_weight())
    x = _random(2, *Vol3d.input_size)
    torch.testing.assert_close(vol(x), approx(x))


def test_network_spectrum_of_1d_and_3d_networks():
    net = _net1d().double()
    decompose(net, rank=4)
    sizes = layer_input_sizes(net, (3, 16))
    assert sizes == {"0": (16,), "2": (16,), "4": (8,)}
    for spec in network_spectrum(net, (3, 16), dtype=torch.float64):
        layer = net.get_submodule(spec.name)
        if isinstance(layer, TTConv):
            ref = dense_singular_values(_tt_operator(layer, sizes[spec.name]))
        else:  # the grouped conv "4": its channels split into independent groups
            w, g = layer.weight.detach(), layer.groups
            cin = layer.in_channels // g

            def apply(x, w=w, g=g, cin=cin, stride=layer.stride):
                return torch.cat([periodic_conv_nd(x[:, i * cin:(i + 1) * cin], part, stride)
                                  for i, part in enumerate(w.chunk(g, dim=0))], 1)

            ref = dense_singular_values(operator_matrix(apply, (layer.in_channels, *sizes[spec.name])))
        torch.testing.assert_close(spec.values, ref, atol=1e-10 * float(ref[0]), rtol=0)
        assert spec.to_json()["input_size"] == list(sizes[spec.name])

    vol = Vol3d().double()
    sizes = layer_input_sizes(vol, Vol3d.input_size)
    assert sizes == {"stem": (4, 8, 8), "down": (4, 8, 8)}
    assert network_spectrum(vol, Vol3d.input_size)[1].count == 2 * 4 * 4 * 12
    spec = layer_spectrum("down", vol.down, (2, 4, 4), dtype=torch.float64)  # smaller: a cheap dense reference
    ref = dense_singular_values(periodic_matrix_nd(vol.down.weight.detach(), (2, 4, 4), (2, 2, 2)))
    assert spec.count == 1 * 2 * 2 * 12
    torch.testing.assert_close(spec.values, ref, atol=1e-10 * float(ref[0]), rtol=0)
    from ttcompress.errors import UserError

    with pytest.raises(UserError, match="not divisible"):
        layer_spectrum("down", vol.down, (4, 8, 7), dtype=torch.float64)


def test_control_skips_1d_and_3d_convs_with_a_warning():
    from ttcompress.control import Controller

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.seq = TTConv1d(4, 4, 3, (2, 2), padding=1)

        def forward(self, x):
            y = self.conv(x)
            return self.seq(y.flatten(2))

    net = Mixed()
    sizes = layer_input_sizes(net, (3, 4, 4))
    assert sizes == {"conv": (4, 4), "seq": (16,)}
    with pytest.warns(UserWarning, match="seq: 1-D conv"):
        controller = Controller(net, sizes, clip_to=0.5, clip_every=1)
    assert [c.name for c in controller.convs] == ["conv"] and set(controller.skipped) == {"seq"}
    before = net.seq.core.weight.detach().clone()
    controller.after_step(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reports = controller.enforce_bounds()
    assert [r.name for r in reports] == ["conv"] and reports[0].sigma_after <= 0.5 * 1.01
    assert torch.equal(net.seq.core.weight, before)


def test_3d_checkpoint_round_trip_and_cli(tmp_path):
    from typer.testing import CliRunner

    import ttcompress.cli.decompose  # noqa: F401
    import ttcompress.cli.spectrum  # noqa: F401
    from ttcompress import checkpoint as ck
    from ttcompress.cli import app

    source = tmp_path / "vol.py"
    source.write_text(VOL3D_SOURCE)
    spec = f"{source}:Vol3d"
    torch.manual_seed(0)
    dense = Vol3d()
    raw = tmp_path / "vol.pt"
    torch.save(dense.state_dict(), raw)

    runner = CliRunner()
    out = tmp_path / "vol-tt.safetensors"
    res = runner.invoke(app, ["decompose", str(raw), "--arch", spec, "--rank", "3", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    layers = {entry["name"]: entry for entry in doc["layers"]}
    assert layers["down"]["shape"] == [12, 8, 3, 3, 3] and layers["down"]["ranks"] == [3, 3]

    with pytest.raises(UserError, match="pass --arch"):  # the metadata names a Python file: never run from a file
        ck.load(out)
    loaded = ck.load(out, arch=spec)  # the metadata gives its input size and the TT ranks
    assert loaded.input_size == (2, 4, 8, 8) and loaded.meta.tt_ranks == {"stem": [2, 3], "down": [3, 3]}
    assert isinstance(loaded.net.down, TTConv3d) and isinstance(loaded.net.stem, TTConv3d)
    reference = Vol3d()
    reference.load_state_dict(dense.state_dict())
    decompose(reference, rank=3)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[key], value), key
    again = tmp_path / "again.safetensors"
    ck.save(loaded, again)
    reread = ck.load(again, arch=spec)
    x = torch.randn(2, *Vol3d.input_size)
    torch.testing.assert_close(reread.model(x), reference(x), rtol=0, atol=0)

    res = runner.invoke(app, ["spectrum", str(out), "--arch", spec, "--json", "--precision", "float64"])
    assert res.exit_code == 0, res.output
    by_name = {entry["name"]: entry for entry in json.loads(res.stdout)["layers"]}
    assert by_name["down"]["input_size"] == [4, 8, 8] and by_name["down"]["stride"] == [2, 2, 2]
    assert by_name["down"]["count"] == 2 * 4 * 4 * 12
    exact = layer_spectrum("down", loaded.net.down, (4, 8, 8), dtype=torch.float64)
    assert by_name["down"]["sigma_max"] == pytest.approx(exact.sigma_max, rel=1e-12)
    table = runner.invoke(app, ["spectrum", str(out), "--arch", spec])
    assert table.exit_code == 0, table.output
    assert "4×8×8" in table.stdout and "2×2×2" in table.stdout


SEQ1D_SOURCE = '''from torch import nn


class Seq1d(nn.Module):
    input_size = (3, 16)

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 12, 5, stride=2, padding=2, bias=False),
            nn.ReLU(), nn.Conv1d(12, 12, 3, padding=1, groups=3),
        )
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(self.body(x).mean(dim=2))
'''


def test_1d_cli_decompose_and_spectrum(tmp_path):
    from typer.testing import CliRunner

    import ttcompress.cli.decompose  # noqa: F401
    import ttcompress.cli.spectrum  # noqa: F401
    from ttcompress import checkpoint as ck
    from ttcompress.cli import app

    from ttcompress import archs

    source = tmp_path / "seq.py"
    source.write_text(SEQ1D_SOURCE)
    spec = f"{source}:Seq1d"
    raw = tmp_path / "seq.pt"
    torch.save(archs.build(spec).net.state_dict(), raw)
    runner = CliRunner()
    out = tmp_path / "seq-tt.safetensors"
    res = runner.invoke(app, ["decompose", str(raw), "--arch", spec, "--rank", "4", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "12×8×5" in res.stdout and "grouped" in res.stdout
    res = runner.invoke(app, ["spectrum", str(out), "--arch", spec, "--json", "--all-methods"])
    assert res.exit_code == 0, res.output
    by_name = {entry["name"]: entry for entry in json.loads(res.stdout)["layers"]}
    assert set(by_name) == {"body.0", "body.2", "body.4"}
    assert by_name["body.2"]["kind"] == "tt" and by_name["body.2"]["input_size"] == [16]
    assert by_name["body.4"]["stride"] == [1] and by_name["body.4"]["count"] == 8 * 12
    # every method but the (2-D) Fourier bound runs on 1-D layers
    assert all(entry["fourier_bound"] is None for entry in by_name.values())
    assert all(entry["f4_bound"] >= entry["sigma_max"] * (1 - 1e-5) for entry in by_name.values())
    assert all(entry["power_converged"] for entry in by_name.values())
    net = ck.load(out, arch=spec).net.double()
    for name, entry in by_name.items():
        size = (16,) if name != "body.4" else (8,)
        exact = layer_spectrum(name, net.get_submodule(name), size, dtype=torch.float64)
        assert entry["sigma_max"] == pytest.approx(exact.sigma_max, rel=1e-5)  # the CLI computes in float32


# --- F4 bound and zero-padding σmax (PowerQR) of 1-D / 3-D layers against dense operators -------------------------

ND_LAYERS = [
    # (conv class, Cout, Cin, k, n, stride, padding, dilation)
    (nn.Conv1d, 5, 3, 3, 12, 1, 1, 1),
    (nn.Conv1d, 4, 6, 5, 10, 2, 2, 1),  # stride 2, wide
    (nn.Conv1d, 3, 2, 3, 9, 1, 2, 2),  # dilation
    (nn.Conv3d, 4, 3, 3, 4, 1, 1, 1),
    (nn.Conv3d, 5, 2, 3, 4, 2, 1, 1),  # stride 2
    (nn.Conv3d, 2, 3, (1, 3, 2), (3, 4, 4), (1, 2, 1), (0, 1, 1), 1),  # mixed sizes and strides
]


@pytest.mark.parametrize("cls,cout,cin,k,n,stride,padding,dilation", ND_LAYERS)
def test_nd_f4_bound_and_power_against_dense_operators(cls, cout, cin, k, n, stride, padding, dilation):
    from ttcompress.spectral.bounds import f4_bound
    from ttcompress.spectral.power import top_singular

    torch.manual_seed(zlib.crc32(repr((cout, cin, k, n)).encode()) % 1000)  # str hashes vary per process
    conv = cls(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=False).double()
    dims = 1 if cls is nn.Conv1d else 3
    size = K.ntuple(n, dims)
    zero_padded = dense_singular_values(operator_matrix(conv, (cin, *size)))
    found = top_singular(conv, size, 2, tol=1e-8)
    assert found.converged
    torch.testing.assert_close(found.values, zero_padded[:2], rtol=1e-6, atol=0)
    bound = float(f4_bound(conv.weight.detach(), conv.stride, conv.dilation))
    assert bound >= float(zero_padded[0]) * (1 - 1e-9)
    # and for the periodic operator (on a size the stride divides)
    even = tuple(s * max(2, -(-m // s)) for s, m in zip(K.ntuple(stride, dims), size))
    periodic = dense_singular_values(periodic_matrix_nd(conv.weight.detach(), even, conv.stride, conv.dilation))
    assert bound >= float(periodic[0]) * (1 - 1e-9)


def test_nd_f4_reduces_to_the_2d_bound_and_is_differentiable():
    from ttcompress.spectral.bounds import f4_bound

    w = torch.randn(6, 4, 5, dtype=torch.float64, requires_grad=True)
    # a 1-D kernel is the 2-D kernel (Cout, Cin, 1, k): the same four (two distinct) reshapings
    torch.testing.assert_close(f4_bound(w, 2), f4_bound(w.unsqueeze(2), (1, 2)))
    f4_bound(w, 1).backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    # 3-D: all 8 axis splits; the bound is not larger than the plain R3 (Cout × Cin·k³) bound
    w3 = torch.randn(4, 3, 3, 3, 3, dtype=torch.float64)
    r3 = math.sqrt(27) * float(torch.linalg.matrix_norm(w3.reshape(4, -1), ord=2))
    assert float(f4_bound(w3)) <= r3 * (1 + 1e-12)


def test_normalisation_wrapper_works_for_1d_and_3d_inputs():
    from ttcompress.archs import Normalized

    for conv, shape in ((nn.Conv1d(2, 3, 3), (4, 2, 9)), (nn.Conv3d(2, 3, 3), (4, 2, 5, 5, 5))):
        wrapped = Normalized(conv, (0.5, 0.25), (2.0, 4.0))
        x = torch.randn(shape)
        mean = torch.tensor([0.5, 0.25]).reshape(1, 2, *([1] * (x.ndim - 2)))
        std = torch.tensor([2.0, 4.0]).reshape(1, 2, *([1] * (x.ndim - 2)))
        torch.testing.assert_close(wrapped(x), conv((x - mean) / std))
