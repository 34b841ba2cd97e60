"""The checkpoint files people already have: Lightning, EMA copies, timm's checkpoint-N.pth.tar, torchvision
weights, and the --key-prefix override when the weights' place in the file is ambiguous."""

from __future__ import annotations

import argparse

import pytest
import torch
from typer.testing import CliRunner

from ttcompress import archs
from ttcompress.checkpoint import extract_state_dict, load
from ttcompress.cli import app
from ttcompress.errors import CheckpointError


def r20_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = archs.build("resnet20").net
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
    return net.state_dict()


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def assert_loads(path, state, **kwargs):
    loaded = load(path, arch="resnet20", **kwargs)
    got = loaded.net.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())


def lightning(weights: dict, **extra) -> dict:
    return {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.5.0", "state_dict": weights,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": []}]}],
            "lr_schedulers": [], "callbacks": {}, "hyper_parameters": {"lr": 0.1, "arch": "resnet20"}, **extra}


def test_lightning_checkpoint_strips_model_prefix(tmp_path):
    state = r20_state(1)
    path = tmp_path / "epoch=3-step=120.ckpt"
    torch.save(lightning(prefixed(state, "model.")), path)
    assert_loads(path, state)


def test_lightning_with_an_ema_copy_is_ambiguous_until_key_prefix_chooses(tmp_path):
    state, ema = r20_state(1), r20_state(2)
    path = tmp_path / "last.ckpt"
    torch.save(lightning({**prefixed(state, "model."), **prefixed(ema, "model_ema.module.")}), path)
    with pytest.raises(CheckpointError, match=r"--key-prefix state_dict\.model\. or --key-prefix "
                                              r"state_dict\.model_ema\.module\."):
        load(path, arch="resnet20")
    assert_loads(path, state, key_prefix="state_dict.model.")
    assert_loads(path, ema, key_prefix="state_dict.model_ema.module.")


def test_ema_only_state_dict(tmp_path):
    state = r20_state(4)
    path = tmp_path / "ema.pth"
    torch.save({"state_dict_ema": state, "epoch": 9}, path)
    assert_loads(path, state)


def test_timm_checkpoint_with_args_and_ema(tmp_path):
    """timm's CheckpointSaver: the argparse Namespace of the run, the optimizer, the weights and their EMA copy."""
    state, ema = r20_state(5), r20_state(6)
    path = tmp_path / "checkpoint-12.pth.tar"
    torch.save({"epoch": 12, "arch": "resnet20", "state_dict": state, "state_dict_ema": ema, "version": 2,
                "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]},
                "args": argparse.Namespace(model="resnet20", lr=0.1, epochs=100, model_ema=True), "metric": 91.2},
               path)
    with pytest.raises(CheckpointError, match=r"--key-prefix state_dict\. or --key-prefix state_dict_ema\."):
        load(path, arch="resnet20")
    assert_loads(path, state, key_prefix="state_dict.")
    assert_loads(path, ema, key_prefix="state_dict_ema.")


def test_torchvision_weights_file_legacy_format(tmp_path):
    import torchvision

    torch.manual_seed(7)
    net = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=False)
    loaded = load(path, arch="torchvision:resnet18")
    assert loaded.meta.num_classes == 10
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ours = loaded.net(x)
        assert torch.equal(ours, net(x))


def test_key_prefix_is_exact_and_empty_keeps_keys():
    state = r20_state(8)
    wrapped = {"net": prefixed(state, "module.")}
    got, _ = extract_state_dict(wrapped)  # guessed: net container, module. wrapper
    assert set(got) == set(state)
    got, _ = extract_state_dict(wrapped, key_prefix="net.")  # exact: module. stays
    assert all(k.startswith("module.") for k in got)
    got, _ = extract_state_dict(prefixed(state, "model."), key_prefix="")
    assert all(k.startswith("model.") for k in got)
    with pytest.raises(CheckpointError, match="no key starts with --key-prefix 'backbone.'"):
        extract_state_dict(wrapped, key_prefix="backbone.")


def test_a_bare_state_dict_with_a_submodule_named_model_is_left_alone():
    state = {"model.weight": torch.ones(2), "head.weight": torch.ones(2)}
    got, _ = extract_state_dict(state)
    assert set(got) == set(state)


def test_cli_ambiguity_is_one_line_exit_2_and_key_prefix_resolves_it(tmp_path):
    import ttcompress.cli.spectrum  # noqa: F401  (registers the command)

    state, ema = r20_state(1), r20_state(2)
    path = tmp_path / "checkpoint-3.pth.tar"
    torch.save({"state_dict": state, "state_dict_ema": ema}, path)
    runner = CliRunner()
    res = runner.invoke(app, ["spectrum", str(path), "--arch", "resnet20", "--json"])
    assert res.exit_code == 2
    assert "--key-prefix state_dict_ema." in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["spectrum", str(path), "--arch", "resnet20", "--key-prefix", "state_dict_ema.",
                              "--method", "f4", "--json"])
    assert res.exit_code == 0, res.output


def test_finetune_takes_key_prefix_too(tmp_path):
    import numpy as np

    import ttcompress.cli.finetune  # noqa: F401

    path = tmp_path / "checkpoint-1.pth.tar"
    torch.save({"state_dict": r20_state(1), "state_dict_ema": r20_state(2)}, path)
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 8))
    res = CliRunner().invoke(app, ["finetune", str(path), "--arch", "resnet20", "--key-prefix", "state_dict_ema.",
                                   "--data", str(data), "--steps", "1", "--batch-size", "8",
                                   "-o", str(tmp_path / "o.safetensors"), "--json"])
    assert res.exit_code == 0, res.output


def test_our_own_files_keep_their_keys_even_under_one_wrapper_name(tmp_path):
    """A user's module whose parameters all sit under ``self.model`` round-trips through a ttcompress file."""
    (tmp_path / "wrap.py").write_text(
        "import torch\n"
        "class Wrap(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.model = torch.nn.Sequential(\n"
        "            torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(3600, 2))\n"
        "    def forward(self, x):\n"
        "        return self.model(x)\n")
    from ttcompress.checkpoint import initialize, save

    spec = f"{tmp_path / 'wrap.py'}:Wrap"
    loaded = initialize(spec)
    save(loaded, tmp_path / "w.safetensors")
    again = load(tmp_path / "w.safetensors", arch=spec)
    assert set(again.net.state_dict()) == {"model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"}
