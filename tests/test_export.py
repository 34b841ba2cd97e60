"""Export: each format, read back the way a user would, reproduces our outputs; strict loading into the user's own
modules (akamaster ResNet-20 names, torchvision names); the stated bound; refusal when the file does not match."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from ttcompress import archs
from ttcompress import export as ex
from ttcompress.checkpoint import LoadedModel, ModelMeta, initialize, load
from ttcompress.cli import app
from ttcompress.data import load_split
from ttcompress.errors import UserError
from ttcompress.spectral import network_spectrum
from ttcompress.tt import decompose, tt_ranks


def tt_resnet20(seed: int = 0, rank: int = 4) -> LoadedModel:
    loaded = initialize("resnet20", seed=seed)
    for m in loaded.net.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    decompose(loaded.net, rank=rank)
    loaded.meta.tt_ranks = tt_ranks(loaded.net)
    return loaded


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return tt_resnet20()


def logits(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(x)


def user_resnet20_with_tt(ranks: dict[str, list[int]]) -> nn.Module:
    """What a user writes from the documented layout: their ResNet-20, each listed conv replaced by three convs."""
    net = archs.build_net(archs.resolve("resnet20"))
    for name, (r1, r2) in ranks.items():
        conv = net.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, nn.Sequential(
            nn.Conv2d(conv.in_channels, r1, 1, bias=False),
            nn.Conv2d(r1, r2, conv.kernel_size, stride=conv.stride, padding=conv.padding, bias=False),
            nn.Conv2d(r2, conv.out_channels, 1, bias=conv.bias is not None)))
    return net


def normalize(x: torch.Tensor, statement: dict) -> torch.Tensor:
    mean = torch.tensor(statement["normalization"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(statement["normalization"]["std"]).view(1, -1, 1, 1)
    return (x - mean) / std


def test_state_dict_tt_layout_loads_strictly_and_reproduces_bit_for_bit(tmp_path, model):
    out = tmp_path / "r20-tt.pt"
    report = ex.export(model, out, "state-dict")
    assert report.checks[0].max_abs_diff == 0.0
    state = torch.load(out, weights_only=True)
    net = user_resnet20_with_tt(model.meta.tt_ranks)
    net.load_state_dict(state, strict=True)
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(logits(net, normalize(x, report.statement)), logits(model.model, x))


def test_dense_state_dict_loads_into_the_plain_architecture(tmp_path, model):
    out = tmp_path / "r20-dense.safetensors"
    report = ex.export(model, out, "state-dict", dense=True)
    from safetensors.torch import load_file

    net = archs.build_net(archs.resolve("resnet20"))  # the akamaster key names, no TT anywhere
    net.load_state_dict(load_file(str(out)), strict=True)
    x = torch.rand(4, 3, 32, 32)
    ours, theirs = logits(model.model, x), logits(net, normalize(x, report.statement))
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()
    assert ex.read_statement(out) == report.statement
    assert report.statement["layout"]["tt_layers"].startswith("folded")
    # our own reader takes the export back as a foreign checkpoint of the same architecture
    again = load(out, arch="resnet20")
    assert torch.equal(logits(again.model, x), logits(net, normalize(x, report.statement)))


def test_dense_folding_keeps_the_spectrum_and_states_the_bound(tmp_path, model):
    worst = max(layer.sigma_max for layer in network_spectrum(model.model, model.input_size, net=model.net))
    for factor, holds in ((1.005, True), (0.9, False)):
        tagged = LoadedModel(model.model, ModelMeta(**{**model.meta.__dict__, "history": [
            {"command": "decompose", "args": {"rank": 4}},
            {"command": "finetune", "args": {"clip_to": worst * factor, "divide_to": None, "bn_to": None}},
        ]}))
        report = ex.export(tagged, tmp_path / f"b{factor}.safetensors", "state-dict", dense=True)
        bound = report.statement["bound"]
        assert bound["flag"] == "clip_to" and bound["holds"] is holds and bound["convs"] == 19
        assert bound["max_sigma"] == pytest.approx(worst, rel=1e-5)


def test_torchvision_resnet18_state_dict_loads_into_torchvision(tmp_path):
    import torchvision

    torch.manual_seed(2)
    src = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), src)
    loaded = load(src, arch="torchvision:resnet18", input_size=(3, 32, 32))
    decompose(loaded.net, rank=16, skip=["layer3*", "layer4*"])
    loaded.meta.tt_ranks = tt_ranks(loaded.net)
    report = ex.export(loaded, tmp_path / "r18.pt", "state-dict", dense=True, inputs=[src])
    net = torchvision.models.resnet18(num_classes=10)
    net.load_state_dict(torch.load(tmp_path / "r18.pt", weights_only=True), strict=True)
    x = torch.rand(2, 3, 32, 32)
    ours, theirs = logits(loaded.model, x), logits(net, normalize(x, report.statement))
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()


def test_torchscript_runs_without_ttcompress(tmp_path, model, one_thread):
    """Bit-equal outputs: both sides on one thread (the child runs with OMP_NUM_THREADS=1; several threads may sum a
    conv in another order)."""
    out = tmp_path / "r20.ts.pt"
    report = ex.export(model, out, "torchscript")
    x = torch.rand(5, 3, 32, 32)  # another batch size than the trace's
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ttcompress":
                    raise ImportError("ttcompress is blocked")
        sys.meta_path.insert(0, Block())
        import torch
        m = torch.jit.load({str(out)!r})
        torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})
        assert not any(k.startswith("ttcompress") for k in sys.modules)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "y.pt"), logits(model.model, x))
    assert report.statement["normalization_inside"] and ex.read_statement(out)["format"] == "torchscript"


def test_onnx_dynamic_batch_normalisation_inside_and_verified(tmp_path, model):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "r20.onnx"
    report = ex.export(model, out, "onnx")
    assert report.opset == ex.ONNX_OPSET and report.checks[0].rel_diff <= ex.TOLERANCE
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.rand(7, 3, 32, 32)
    y = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    ours = logits(model.model, x)
    assert y.shape == ours.shape and (y - ours).abs().max() <= 1e-4 * ours.abs().max()
    assert ex.read_statement(out)["normalization"] == model.meta.normalization


def test_a_file_that_does_not_reproduce_the_model_is_not_written(tmp_path, model, monkeypatch):
    reader = ex._reader
    monkeypatch.setattr(ex, "_reader", lambda *a: (lambda x, run=reader(*a): run(x) * 1.001))
    out = tmp_path / "bad.pt"
    with pytest.raises(ex.VerificationError, match="does not reproduce"):
        ex.export(model, out, "state-dict")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_is_a_one_line_user_error(tmp_path, model, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match=r"pip install 'ttcompress\[export\]'"):
        ex.export(model, tmp_path / "m.onnx", "onnx")


def test_cli_json_contract_and_output_over_input_refused(tmp_path, model):
    import ttcompress.cli.export  # noqa: F401  (registers the command)
    from ttcompress.checkpoint import save

    src = tmp_path / "tt.safetensors"
    save(model, src)
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "m.pt"), "--format", "torchscript", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["format"] == "torchscript" and doc["checks"][0]["max_abs_diff"] == 0.0
    res = runner.invoke(app, ["export", str(src), "-o", str(src), "--format", "state-dict"])
    assert res.exit_code == 2 and "over the input" in res.output
    res = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "x.bin"), "--format", "tflite"])
    assert res.exit_code == 2 and "--format must be one of" in res.output


def test_every_format_reproduces_accuracy_on_the_shared_test_images(tmp_path, resnet20_path, cifar_sample_path):
    """The issue's acceptance check on the shared ResNet-20 (TT rank 8) and the shared CIFAR-10 test images."""
    pytest.importorskip("onnxruntime")
    loaded = load(resnet20_path, arch="resnet20")
    decompose(loaded.net, rank=8)
    loaded.meta.tt_ranks = tt_ranks(loaded.net)
    images = load_split(str(cifar_sample_path), "test")
    for fmt, name, dense in (("state-dict", "sd.pt", False), ("state-dict", "dense.safetensors", True),
                             ("torchscript", "ts.pt", False), ("onnx", "m.onnx", False)):
        check = ex.export(loaded, tmp_path / name, fmt, dense=dense, data=images).checks[1]
        assert check.n == len(images) and check.accuracy_exported == check.accuracy_ours
        if fmt != "onnx" and not dense:
            assert check.max_abs_diff == 0.0
        assert check.rel_diff <= (1e-5 if fmt != "onnx" else ex.TOLERANCE)


def test_a_trusted_pickled_module_exports_too(tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 4)), src)
    loaded = load(src, trust_pickle=True)
    decompose(loaded.net, rank=2)
    loaded.meta.tt_ranks = tt_ranks(loaded.net)
    report = ex.export(loaded, tmp_path / "out.pt", "state-dict", inputs=[src])
    assert report.checks[0].max_abs_diff == 0.0 and set(torch.load(tmp_path / "out.pt")) == {
        "0.0.weight", "0.1.weight", "0.2.weight", "0.2.bias", "4.weight", "4.bias"}


def test_the_bound_comes_from_the_last_finetune_only():
    clip = {"command": "finetune", "args": {"clip_to": 1.0, "clip_every": 100}}
    plain = {"command": "finetune", "args": {"clip_to": None, "lr": 0.01}}
    assert ex.finetune_bound([{"command": "decompose", "args": {}}]) is None
    assert ex.finetune_bound([clip])["measure"] == "exact periodic σmax"
    assert ex.finetune_bound([clip, plain]) is None  # a later unconstrained run voids the earlier bound
    fast = ex.finetune_bound([{"command": "finetune", "args": {"fastclip_to": 2, "clip_with_bn": True}}])
    assert fast["flag"] == "fastclip_to" and "BatchNorm" in fast["measure"]
    assert ex.measure_bound(nn.Identity(), nn.Identity(), (3, 8, 8), fast)["holds"] is None


def test_the_bound_is_measured_on_whole_layers_in_the_tt_layout_too(tmp_path, model):
    worst = max(layer.sigma_max for layer in network_spectrum(model.model, model.input_size, net=model.net))
    tagged = LoadedModel(model.model, ModelMeta(**{**model.meta.__dict__, "history": [
        {"command": "finetune", "args": {"clip_to": worst}}]}))
    bound = ex.export(tagged, tmp_path / "tt.safetensors", "state-dict").statement["bound"]
    assert bound["convs"] == 19 and bound["max_sigma"] == pytest.approx(worst, rel=1e-5)
