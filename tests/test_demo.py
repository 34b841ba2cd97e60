"""The demo end to end: a fast variant on the embedded ResNet-20, the real default behind the slow marker."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ttcompress.demo import DemoSettings, asset, run_demo


def check_result(result, clip_to):
    assert result.decompose["params_after"] < result.decompose["params_before"]
    # every controlled conv meets its bound, verified with exact spectra
    for layer in result.spectrum_after:
        assert layer["sigma_max"] <= clip_to * 1.01, layer
    before = {l["name"]: l["sigma_max"] for l in result.spectrum_before}
    assert max(before.values()) > clip_to  # the bound was active
    for key in ("eval_original", "eval_decomposed", "eval_result"):
        doc = getattr(result, key)
        assert 0 <= doc["accuracy"] <= 1 and 0 <= doc["ece"] <= 1 and doc["cifar_c"]["source"] == "generated"
    for key in ("eval_original", "eval_result"):
        aa = getattr(result, key)["autoattack"]
        assert aa["robust_accuracy"] <= aa["clean_accuracy"]


def test_demo_on_the_embedded_resnet20(tmp_path):
    settings = DemoSettings(
        out_dir=tmp_path / "demo", model=asset("resnet20-cifar10.th"), arch="resnet20", rank=8, steps=3,
        batch_size=16, clip_every=2, eval_images=32, attack_images=4, corruptions=("fog",), severities=(2,),
    )
    result = run_demo(settings)
    check_result(result, 1.0)
    assert result.eval_original["accuracy"] > 0.75  # a real pretrained model on real images
    for path in result.artefacts.values():
        assert (tmp_path / "demo").exists() and __import__("pathlib").Path(path).exists(), path
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert summary["rank"] == 8 and summary["arch"] == "resnet20"
    # it distils from the original it decomposed (the teacher's time is its own line in the finetune's timings)
    assert result.finetune["time_teacher"] > 0


def test_demo_without_distillation(tmp_path):
    settings = DemoSettings(
        out_dir=tmp_path / "demo", model=asset("resnet20-cifar10.th"), arch="resnet20", rank=8, steps=2,
        batch_size=16, clip_every=1, eval_images=16, attack_images=2, corruptions=("fog",), severities=(1,),
        kd_alpha=0.0,
    )
    result = run_demo(settings)
    check_result(result, 1.0)
    assert result.finetune["time_teacher"] == 0


@pytest.mark.slow
def test_demo_command_default(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ttcompress", "demo", "--out", str(tmp_path / "d"), "--json"],
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)
    assert doc["arch"] in ("resnet18-cifar", "resnet20")
    for layer in doc["spectrum_after"]:
        assert layer["sigma_max"] <= 1.01
