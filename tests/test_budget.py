"""The budget allocation: targets met within ±2 %, exact predictions, damage spent where it hurts least, and
calibration, keep-faster and the CLI contract."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from ttcompress import archs
from ttcompress.budget import allocate, budget_layers
from ttcompress.compress import CompressSettings, compress
from ttcompress.data import ImageSet
from ttcompress.errors import UserError
from ttcompress.macs import layer_sites, network_macs
from ttcompress.tt import TTConv, decompose, tt_ranks
from test_cli import r20, tiny_npz  # noqa: F401  (fixtures)
from test_cli import run as cli_run


def params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.fixture(scope="module")
def r20_model():
    torch.manual_seed(0)
    return archs.build("resnet20")


@pytest.mark.parametrize("metric,target", [("params", 2), ("params", 4), ("params", 8), ("macs", 2), ("macs", 4)])
def test_targets_land_within_two_percent_and_the_prediction_is_exact(r20_model, metric, target):
    model = copy.deepcopy(r20_model)
    sites = layer_sites(model, (3, 32, 32), model.net)
    layers, reasons = budget_layers(model.net, sites)
    assert len(layers) == 19 and reasons == {}
    macs = network_macs(model, (3, 32, 32), model.net)
    before = params(model.net) if metric == "params" else sum(macs.values())
    alloc = allocate(layers, metric, target, before, max_rank=20)
    assert abs(alloc.ratio / target - 1) <= 0.02
    assert all(max(r) <= 20 for r in alloc.ranks.values())
    decompose(model.net, ranks=alloc.ranks)
    after = params(model.net) if metric == "params" else sum(network_macs(model, (3, 32, 32), model.net).values())
    assert after == alloc.cost_after
    assert {n: tuple(r) for n, r in tt_ranks(model.net).items()} == alloc.ranks


def test_unreachable_target_and_bad_values_are_one_line_user_errors(r20_model):
    sites = layer_sites(r20_model, (3, 32, 32), r20_model.net)
    layers, _ = budget_layers(r20_model.net, sites)
    with pytest.raises(UserError, match=r"--target-ratio 1000 cannot be reached: .*ranks 1, 1.*×"):
        allocate(layers, "params", 1000, params(r20_model.net))
    with pytest.raises(UserError, match="greater than 1"):
        allocate(layers, "macs", 0.5, 10**9)
    with pytest.raises(UserError, match="no conv can be decomposed"):
        allocate([], "params", 2, 100)


def low_rank_kernel(cout: int, cin: int, rank: int) -> torch.Tensor:
    f = torch.linalg.qr(torch.randn(cin, rank))[0].T  # (rank, cin)
    last = torch.linalg.qr(torch.randn(cout, rank))[0]
    core = torch.randn(rank, rank, 3, 3)
    return torch.einsum("ob,bahw,ac->ochw", last, core, f)


class Pair(nn.Module):
    def __init__(self, scale_b: float = 1.0) -> None:
        super().__init__()
        self.a = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.b = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.scale_b = scale_b
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        y = self.a(x)
        return self.head((y + self.scale_b * self.b(y)).mean((2, 3)))


def test_the_layer_that_is_low_rank_takes_the_cut():
    torch.manual_seed(1)
    net = Pair()
    with torch.no_grad():
        net.a.weight.copy_(low_rank_kernel(32, 32, 6))
    sites = layer_sites(net, (32, 8, 8))
    layers, _ = budget_layers(net, sites)
    alloc = allocate(layers, "params", 1.5, params(net))
    assert set(alloc.ranks) == {"a"} and min(alloc.ranks["a"]) >= 6 and alloc.damage < 1e-9  # b stays dense
    report = decompose(net, ranks=alloc.ranks)
    assert {l.name: l.rel_error for l in report.layers}["a"] < 1e-6


def test_calibration_weights_a_dead_branch_down_and_cuts_it_first():
    torch.manual_seed(2)
    net = Pair(scale_b=0.0)  # b's output never reaches the logits
    model = archs.Normalized(net, None, None)
    images = ImageSet(torch.randint(0, 256, (16, 32, 8, 8), dtype=torch.uint8), torch.randint(0, 3, (16,)), 3)
    sites = layer_sites(model, (32, 8, 8), net)
    layers, _ = budget_layers(net, sites)
    from ttcompress.sensitivity import calibrate

    report = calibrate(model, net, layers, images, {"a": (4, 4)}, batch_size=8)
    weights = {l.name: l.weight for l in layers}
    assert weights == pytest.approx({"a": 1.5, "b": 0.5})  # gains (g_a, 0), mean g_a / 2, shrunk half-way to 1
    assert [(r.layer, r.ranks) for r in report.rows] == [("a", (4, 4)), ("b", (16, 16))]
    assert all(r.output_change == pytest.approx(0, abs=1e-12) for r in report.rows if r.layer == "b")
    alloc = allocate(layers, "params", 1.8, params(net))
    ranks = {n: alloc.ranks.get(n, (32, 32)) for n in ("a", "b")}
    assert ranks["b"][0] * ranks["b"][1] < ranks["a"][0] * ranks["a"][1]  # the cut goes to the dead branch


def test_compress_keep_faster_leaves_slow_layers_dense_and_still_meets_the_target(monkeypatch):
    import ttcompress.compress as C

    def fake_ms(modules, input_shape, device, repeats, warmup=2):
        slow = input_shape[1] == 64  # every TT layer of stage 3 "is slower"
        if len(modules) == 2 and isinstance(modules[1], TTConv):
            return [1.0, 2.0 if slow else 0.5]
        return [1.0 for _ in modules]

    monkeypatch.setattr(C, "modules_ms", fake_ms)
    torch.manual_seed(0)
    model = archs.build("resnet20")
    before = params(model.net)
    result = compress(model, model.net, (3, 32, 32), CompressSettings(target_macs=1.5, keep_faster=True))
    doc = result.to_json()
    assert abs(doc["macs_ratio"] / 1.5 - 1) <= 0.02
    stage3 = [l for l in doc["layers"] if l["name"].startswith("layer3") and l["shape"][1] == 64]
    assert stage3 and all(l["ranks"] is None and "not faster" in l["reason"] for l in stage3)
    assert all(l["latency_tt_ms"] == 2.0 and l["latency_dense_ms"] == 1.0 for l in stage3)
    assert doc["target"]["metric"] == "macs" and doc["target"]["keep_faster"] is True
    assert doc["params_before"] == before and {"latency_before_ms", "latency_after_ms"} <= set(doc)

    torch.manual_seed(0)
    model = archs.build("resnet20")
    result = compress(model, model.net, (3, 32, 32), CompressSettings(rank=8, keep_faster=True))
    kept = [l for l in result.decomposition.layers if l.reason and "not faster" in l.reason]
    assert kept and all(l.name.startswith("layer3") for l in kept)
    assert not any(isinstance(model.net.get_submodule(l.name), TTConv) for l in kept)
    assert result.decomposition.params_after == params(model.net)


def run(*args):
    import ttcompress.cli.sensitivity  # noqa: F401

    return cli_run(*args)


def test_decompose_target_json_contract(tmp_path, r20):
    out = tmp_path / "o.safetensors"
    res = run("decompose", r20, "--arch", "resnet20", "--target-macs", "3", "--max-rank", "24", "-o", out, "--json",
              "--latency", "--repeats", "1")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert {"layers", "params_before", "params_after", "compression", "macs_before", "macs_after", "macs_ratio",
            "target", "calibrate", "latency_before_ms", "latency_after_ms"} == set(doc)
    assert doc["calibrate"] is None
    assert doc["target"]["metric"] == "macs" and doc["target"]["ratio"] == 3 and doc["target"]["max_rank"] == 24
    assert abs(doc["macs_ratio"] / 3 - 1) <= 0.02 and doc["macs_before"] == 40_551_040  # ResNet-20 at 32×32 (+fc)
    for layer in doc["layers"]:
        assert {"macs_before", "macs_after", "latency_dense_ms", "latency_tt_ms"} <= set(layer)
        assert (layer["latency_tt_ms"] is None) == (layer["ranks"] is None)
    assert sum(l["macs_after"] for l in doc["layers"]) + 64 * 10 == doc["macs_after"]


@pytest.mark.parametrize("extra,needle", [
    (["--rank", "8", "--target-ratio", "2"], "exactly one of"),
    (["--rank", "8", "--max-rank", "4"], "--max-rank"),
    (["--rank", "8", "--calibrate", "x.npz"], "not found"),
    (["--target-ratio", "500"], "cannot be reached"),
    (["--target-ratio", "1"], "greater than 1"),
])
def test_decompose_target_user_errors(tmp_path, r20, extra, needle):
    res = run("decompose", r20, "--arch", "resnet20", "-o", tmp_path / "o.safetensors", *extra)
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert len([line for line in res.output.strip().splitlines() if line.strip()]) == 1


def test_decompose_rank_with_calibrate_is_data_aware(tmp_path, r20, tiny_npz):
    """--calibrate with one rank: the same ranks, different (data-aware) factors, and the images in the JSON."""
    from ttcompress import checkpoint as ck
    from ttcompress.tt import tt_ranks

    plain, aware = tmp_path / "p.safetensors", tmp_path / "a.safetensors"
    assert run("decompose", r20, "--arch", "resnet20", "--rank", "8", "-o", plain).exit_code == 0
    res = run("decompose", r20, "--arch", "resnet20", "--rank", "8", "--calibrate", tiny_npz, "--calibrate-n", "6",
              "-o", aware, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["calibrate"] == {"source": doc["calibrate"]["source"], "n": 6, "data_aware": True, "batchnorm": 19}
    assert doc["target"] is None
    a, p = ck.load(aware), ck.load(plain)
    moved = [n for n, bn in a.net.named_modules() if isinstance(bn, torch.nn.BatchNorm2d)
             and not torch.equal(bn.running_mean, p.net.get_submodule(n).running_mean)]
    assert moved and moved[0].startswith("bn1")  # the first BatchNorm follows the decomposed stem
    kept = tmp_path / "k.safetensors"
    res = run("decompose", r20, "--arch", "resnet20", "--rank", "8", "--calibrate", tiny_npz, "--calibrate-n", "6",
              "--no-bn-correct", "-o", kept, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["calibrate"]["batchnorm"] is None
    k = ck.load(kept)
    assert all(torch.equal(bn.running_var, p.net.get_submodule(n).running_var)
               for n, bn in k.net.named_modules() if isinstance(bn, torch.nn.BatchNorm2d))
    assert tt_ranks(a.net) == tt_ranks(p.net)
    wa, wp = a.net.get_submodule("layer2.0.conv2"), p.net.get_submodule("layer2.0.conv2")
    assert wa.ranks == wp.ranks == (8, 8)
    assert not torch.allclose(wa.dense_weight(), wp.dense_weight(), atol=1e-4)


def test_sensitivity_json_and_plot(tmp_path, r20, tiny_npz):
    plot = tmp_path / "s.png"
    res = run("sensitivity", r20, "--arch", "resnet20", "--data", tiny_npz, "--ranks", "4,32", "--n", "4",
              "--skip", "layer[12]*", "--json", "--plot", plot, "--device", "cpu")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    rows = doc["rows"]
    assert doc["n"] == 4 and {r["layer"] for r in rows} == {"conv1"} | {f"layer3.{i}.conv{j}" for i in range(3)
                                                                          for j in (1, 2)}
    conv1 = [r for r in rows if r["layer"] == "conv1"]
    assert [r["ranks"] for r in conv1] == [[3, 4], [3, 16]] and [r["rank"] for r in conv1] == [4, 32]
    r = [r for r in rows if r["layer"] == "layer3.1.conv1" and r["rank"] == 4][0]
    assert r["params_after"] == 4 * 64 + 4 * 4 * 9 + 64 * 4 and r["macs_after"] == r["params_after"] * 64
    assert 0 < r["rel_error"] < 1 and r["output_change"] > 0 and 0 <= r["accuracy"] <= 1
    assert doc["skipped"]["layer1.0.conv1"] == "skipped by --skip"
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert doc["data_aware"] is True  # the truncation decompose --calibrate makes
    res = run("sensitivity", r20, "--arch", "resnet20", "--data", tiny_npz, "--ranks", "4", "--n", "4",
              "--skip", "layer[12]*", "--skip", "conv1", "--json", "--device", "cpu", "--plain")
    plain = json.loads(res.stdout)
    assert res.exit_code == 0 and plain["data_aware"] is False
    again = {p["layer"]: p for p in plain["rows"]}
    aware = {q["layer"]: q for q in rows if q["rank"] == 4 and q["layer"] != "conv1"}
    assert set(again) == set(aware)
    assert all(again[k]["ranks"] == aware[k]["ranks"] for k in again)
    # the data-aware factors trade error on the kernel for error on the inputs: other factors, a larger kernel error
    assert any(again[k]["rel_error"] < aware[k]["rel_error"] - 1e-4 for k in again)
    assert any(abs(again[k]["output_change"] - aware[k]["output_change"]) > 1e-6 for k in again)
    res = run("sensitivity", r20, "--arch", "resnet20", "--data", tiny_npz, "--plot", r20)
    assert res.exit_code == 2 and "over the input" in res.output


def test_help_shows_examples():
    for cmd, needle in (("sensitivity", "Example: ttcompress sensitivity"), ("decompose", "--target-macs 4")):
        res = run(cmd, "--help")
        assert res.exit_code == 0 and needle in res.output
