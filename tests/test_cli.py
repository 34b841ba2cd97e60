"""The command line as a user meets it: contracts of flags and JSON, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ttcompress import archs
from ttcompress.cli import app, main  # noqa: F401

runner = CliRunner()


def run(*args: str):
    import ttcompress.cli.decompose  # noqa: F401
    import ttcompress.cli.spectrum  # noqa: F401

    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def r20(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "r20.pt"
    torch.save({"state_dict": archs.build("resnet20").net.state_dict()}, path)
    return path


def test_decompose_json_contract(tmp_path, r20):
    out = tmp_path / "tt.safetensors"
    res = run("decompose", r20, "--arch", "resnet20", "--rank", "8", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc) == {"layers", "params_before", "params_after", "compression"}
    layer = {l["name"]: l for l in doc["layers"]}["layer2.0.conv1"]
    assert {"name", "shape", "ranks", "rel_error", "params_before", "params_after"} <= set(layer)
    assert layer["shape"] == [32, 16, 3, 3] and layer["ranks"] == [8, 8]
    assert 0 < layer["rel_error"] < 1 and layer["params_after"] < layer["params_before"]
    assert doc["compression"] == pytest.approx(doc["params_before"] / doc["params_after"])
    assert out.exists()


def test_spectrum_json_values_and_plot(tmp_path, r20):
    out = tmp_path / "tt.safetensors"
    assert run("decompose", r20, "--arch", "resnet20", "--rank", "4", "-o", out).exit_code == 0
    values, plot = tmp_path / "v.npz", tmp_path / "p.png"
    res = run("spectrum", out, "--json", "--values", values, "--plot", plot)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    by_name = {l["name"]: l for l in doc["layers"]}
    l2 = by_name["layer2.0.conv1"]
    assert l2["kind"] == "tt" and l2["input_size"] == [32, 32] and l2["stride"] == [2, 2]
    assert l2["count"] == 16 * 16 * 32 and l2["sigma_max"] >= l2["sigma_min"] >= 0
    arrays = np.load(values)
    assert set(arrays.files) == set(by_name)
    assert arrays["layer2.0.conv1"].shape == (l2["count"],)
    assert arrays["layer2.0.conv1"][0] == pytest.approx(l2["sigma_max"])
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_spectrum_input_size_not_divisible_by_stride(tmp_path, r20):
    res = run("spectrum", r20, "--arch", "resnet20", "--input-size", "31", "31")
    assert res.exit_code == 2
    assert "not divisible" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["decompose", "{ck}", "--arch", "resnet20", "--rank", "0", "-o", "{tmp}/o.safetensors"], "--rank"),
        (["decompose", "{ck}", "--arch", "resnet20", "--energy", "1.5", "-o", "{tmp}/o.safetensors"], "--energy"),
        (["decompose", "{ck}", "--arch", "resnet20", "-o", "{tmp}/o.safetensors"], "--rank"),
        (["decompose", "{ck}", "--arch", "nonet", "--rank", "4", "-o", "{tmp}/o.safetensors"], "unknown architecture"),
        (["decompose", "{ck}", "--arch", "resnet32", "--rank", "4", "-o", "{tmp}/o.safetensors"], "does not match"),
        (["decompose", "{ck}", "--arch", "resnet20", "--rank", "4", "-o", "{ck}"], "over the input"),
        (["decompose", "{tmp}/missing.pt", "--arch", "resnet20", "--rank", "4", "-o", "{tmp}/o.safetensors"], "no such"),
        (["spectrum", "{ck}"], "--arch"),
        (["spectrum", "{ck}", "--arch", "resnet20", "--mean", "a,b"], "--mean"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, r20, args, needle):
    res = run(*[a.format(ck=r20, tmp=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert "Traceback" not in res.output
    assert len([line for line in res.output.strip().splitlines() if line.strip()]) == 1


def test_rank_not_a_number_is_usage_error(tmp_path, r20):
    res = run("decompose", r20, "--arch", "resnet20", "--rank", "abc", "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 2


def test_python_dash_m_and_help_examples():
    out = subprocess.run([sys.executable, "-m", "ttcompress", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "decompose" in out.stdout and "Example" in out.stdout
    for cmd in ("decompose", "spectrum"):
        sub = subprocess.run([sys.executable, "-m", "ttcompress", cmd, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and "Example: ttcompress " + cmd in sub.stdout


def test_debug_shows_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ttcompress", "--debug", "spectrum", str(tmp_path / "none.pt"),
                          "--arch", "resnet20"], capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_real_resnet20_end_to_end(tmp_path, resnet20_path):
    out = tmp_path / "r20-tt.safetensors"
    res = run("decompose", resnet20_path, "--arch", "resnet20", "--rank", "8", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    res = run("spectrum", out, "--json")
    assert res.exit_code == 0, res.output
    layers = json.loads(res.stdout)["layers"]
    assert len(layers) == 19 and all(l["kind"] == "tt" for l in layers)
