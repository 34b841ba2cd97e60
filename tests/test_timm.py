"""``--arch timm:NAME``: timm models with random weights through decompose → spectrum → finetune → eval → export;
grouped and depthwise convs stay dense and the report says so."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ttcompress import archs
from ttcompress.checkpoint import load
from ttcompress.cli import app
from ttcompress.errors import UserError
from ttcompress.tt import decompose

timm = pytest.importorskip("timm")
if not timm.is_model("test_resnet"):  # timm's tiny test models (test_resnet, test_efficientnet, …) came in 1.0.x
    pytest.skip("this timm has no tiny test models", allow_module_level=True)


def run(*args) -> dict:
    import ttcompress.cli.decompose  # noqa: F401  (register the commands)
    import ttcompress.cli.evaluate  # noqa: F401
    import ttcompress.cli.export  # noqa: F401
    import ttcompress.cli.finetune  # noqa: F401
    import ttcompress.cli.spectrum  # noqa: F401

    res = CliRunner().invoke(app, [str(a) for a in args] + ["--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def tiny_data(path, n_train=32, n_test=16, classes=10):
    rng = np.random.default_rng(0)
    np.savez(path, train_x=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
             train_y=rng.integers(0, classes, n_train),
             test_x=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), test_y=rng.integers(0, classes, n_test))
    return path


def timm_checkpoint(tmp_path, name: str, classes: int = 10):
    torch.manual_seed(0)
    path = tmp_path / f"{name}.pth"
    torch.save(timm.create_model(name, pretrained=False, num_classes=classes).state_dict(), path)
    return path


def pipeline(tmp_path, name: str, rank: int, clip: bool = True) -> dict:
    """decompose → spectrum → finetune (3 steps, with exact clipping if ``clip``) → eval → export, through the CLI."""
    src = timm_checkpoint(tmp_path, name)
    data = tiny_data(tmp_path / "tiny.npz")
    tt, ft, onnx = tmp_path / "tt.safetensors", tmp_path / "ft.safetensors", tmp_path / "ft.onnx"
    report = run("decompose", src, "--arch", f"timm:{name}", "--rank", rank, "-o", tt)
    spectrum = run("spectrum", tt, "--input-size", 32, 32)
    control = ["--clip-to", 1, "--clip-every", 3] if clip else []
    run("finetune", tt, "--data", data, "--steps", 3, "--batch-size", 16, *control, "-o", ft)
    evaluation = run("eval", ft, "--data", data)
    exported = run("export", ft, "-o", onnx, "--format", "onnx", "--dense", "--data", data) \
        if _has_onnxruntime() else None
    return {"decompose": report, "spectrum": spectrum, "eval": evaluation, "export": exported, "ft": ft}


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def test_timm_arch_info_comes_from_timms_config():
    info = archs.resolve("timm:test_efficientnet")
    assert info.input_size == (3, 160, 160) and info.num_classes == 1000
    assert info.mean == pytest.approx(archs.IMAGENET_MEAN)
    with pytest.raises(UserError, match="unknown timm model"):
        archs.resolve("timm:no_such_net")


def test_num_classes_come_from_the_checkpoint(tmp_path):
    loaded = load(timm_checkpoint(tmp_path, "test_resnet", classes=7), arch="timm:test_resnet")
    assert loaded.meta.num_classes == 7


@pytest.mark.parametrize("name", ["test_efficientnet", "test_convnext"])
def test_grouped_and_depthwise_convs_stay_dense_and_the_report_says_so(name):
    torch.manual_seed(0)
    net = archs.build(f"timm:{name}", num_classes=10).net
    grouped = {n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1}
    assert grouped
    report = decompose(net, rank=8)
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert all(reasons[n].startswith("grouped conv (groups=") for n in grouped)
    assert any(layer.ranks and not layer.reason for layer in report.layers)  # the rest did become TT


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_convnext"])
def test_small_timm_models_through_the_whole_pipeline(tmp_path, name):
    """Singular-value control covers groups=1 convs only, so the grouped models finetune without it."""
    clip = name == "test_resnet"
    out = pipeline(tmp_path, name, rank=8, clip=clip)
    assert out["decompose"]["params_after"] < out["decompose"]["params_before"]
    assert all(layer["sigma_max"] > 0 for layer in out["spectrum"]["layers"])
    assert out["eval"]["n"] == 16
    if out["export"] is not None:
        check = out["export"]["checks"][1]
        assert check["accuracy_exported"] == check["accuracy_ours"] and check["rel_diff"] <= 1e-4
        assert (out["export"]["statement"]["bound"] or {}).get("holds", False) is clip


def test_clipping_a_model_with_grouped_convs_is_refused_in_one_line(tmp_path):
    import ttcompress.cli.finetune  # noqa: F401

    src = timm_checkpoint(tmp_path, "test_efficientnet")
    data = tiny_data(tmp_path / "d.npz")
    res = CliRunner().invoke(app, ["finetune", str(src), "--arch", "timm:test_efficientnet", "--data", str(data),
                                   "--steps", "1", "--batch-size", "16", "--clip-to", "1",
                                   "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2 and "grouped conv" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_timm_resnet18_random_weights_through_the_whole_pipeline(tmp_path):
    out = pipeline(tmp_path, "resnet18", rank=16)
    assert out["decompose"]["compression"] > 3
    assert out["export"]["statement"]["bound"]["holds"]
