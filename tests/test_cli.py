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
    assert set(doc) == {"layers", "params_before", "params_after", "compression", "macs_before", "macs_after",
                        "macs_ratio", "target", "calibrate"} and doc["target"] is None and doc["calibrate"] is None
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


@pytest.fixture
def tiny_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, train_x=rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), train_y=rng.integers(0, 10, 32),
             test_x=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), test_y=rng.integers(0, 10, 16))
    return path


def test_eval_json_contract(tmp_path, r20, tiny_npz):
    import ttcompress.cli.evaluate  # noqa: F401

    out_dir = tmp_path / "ev"
    res = run("eval", r20, "--arch", "resnet20", "--data", tiny_npz, "--metrics", "accuracy,ece,cifar-c,autoattack",
              "--n", "8", "--severities", "1,5", "--corruptions", "gaussian_noise,saturate", "--eps", "1/255",
              "--device", "cpu", "--json", "--out", out_dir)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["n"] == 8 and 0 <= doc["accuracy"] <= 1 and 0 <= doc["ece"] <= 1
    c = doc["cifar_c"]
    assert c["source"] == "generated" and set(c["corruptions"]) == {"gaussian_noise", "saturate"}
    assert set(c["corruptions"]["saturate"]) == {"1", "5"}
    assert c["mean"] == pytest.approx(np.mean(list(c["corruptions"]["gaussian_noise"].values())))
    assert c["mean_extra"] == pytest.approx(np.mean(list(c["corruptions"]["saturate"].values())))
    a = doc["autoattack"]
    assert {"norm", "eps", "n", "version", "clean_accuracy", "robust_accuracy", "package"} <= set(a)
    assert a["eps"] == pytest.approx(1 / 255) and a["robust_accuracy"] <= a["clean_accuracy"]
    assert "lipschitz" not in doc
    assert (out_dir / "eval.json").exists()


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--metrics", "accuracy,bogus"], "bogus"),
        (["--eps", "eight"], "--eps"),
        (["--norm", "L3"], "--norm"),
        (["--corruptions", "lava"], "lava"),
        (["--severities", "0,9"], "severit"),
        (["--device", "cuda"], "CUDA"),
    ],
)
def test_eval_user_errors(tmp_path, r20, tiny_npz, extra, needle):
    import ttcompress.cli.evaluate  # noqa: F401

    res = run("eval", r20, "--arch", "resnet20", "--data", tiny_npz, "--n", "4", *extra)
    if needle == "CUDA" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output


def test_eval_data_errors(tmp_path, r20):
    import ttcompress.cli.evaluate  # noqa: F401

    gray = tmp_path / "gray.npz"
    np.savez(gray, x=np.zeros((4, 32, 32, 1), np.uint8), y=np.zeros(4, np.int64))
    res = run("eval", r20, "--arch", "resnet20", "--data", gray)
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = run("eval", r20, "--arch", "resnet20", "--data", tmp_path / "missing.npz")
    assert res.exit_code == 2 and "missing.npz" in res.output
