"""`ttcompress init`: a freshly initialised network to train from scratch, then finetune and certify it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ttcompress.cli.evaluate  # noqa: F401  (registers the commands)
import ttcompress.cli.finetune  # noqa: F401
import ttcompress.cli.init  # noqa: F401
from ttcompress import checkpoint as ck
from ttcompress.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_initialize_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = ck.initialize("resnet20", seed=1)
    after = torch.rand(3)
    torch.testing.assert_close(before, after)  # the caller's random stream is untouched
    b = ck.initialize("resnet20", seed=1)
    c = ck.initialize("resnet20", seed=2)
    sa, sb, sc = (m.net.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])
    assert a.meta.arch == "resnet20" and a.meta.num_classes == 10 and a.meta.input_size == [3, 32, 32]
    assert ck.initialize("resnet20", num_classes=100).meta.num_classes == 100


def test_init_then_finetune_then_certify(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, train_x=rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), train_y=rng.integers(0, 10, 32),
             test_x=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), test_y=rng.integers(0, 10, 16))
    init = tmp_path / "lip.safetensors"
    res = run("init", "lipconvnet-5-tt128", "-o", init, "--seed", "3", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["arch"] == "lipconvnet-5-tt128" and doc["num_classes"] == 10 and doc["params"] > 0
    loaded = ck.load(init)
    assert loaded.meta.arch == "lipconvnet-5-tt128" and loaded.meta.history[-1]["command"] == "init"
    trained = tmp_path / "lip-ft.safetensors"
    res = run("finetune", init, "--data", data, "--steps", "2", "--batch-size", "16", "--device", "cpu",
              "-o", trained, "--json")
    assert res.exit_code == 0, res.output
    res = run("eval", trained, "--data", data, "--metrics", "accuracy,certified", "--n", "16", "--json")
    assert res.exit_code == 0, res.output
    cert = json.loads(res.stdout)["certified"]
    assert 0.0 <= cert["certified_accuracy"] <= cert["clean_accuracy"] <= 1.0 and cert["lipschitz"] > 0


@pytest.mark.parametrize("args,needle", [
    (["no-such-arch", "-o", "x.safetensors"], "no-such-arch"),
    (["resnet20", "-o", "x.safetensors", "--num-classes", "0"], "--num-classes"),
    (["resnet20", "-o", "x.safetensors", "--mean", "a,b"], "--mean"),
])
def test_init_user_errors_are_one_line(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    res = run("init", *args)
    assert res.exit_code == 2
    lines = [l for l in res.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output
    assert not (tmp_path / "x.safetensors").exists()
