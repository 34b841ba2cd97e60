"""Checkpoint reading in every supported form, safe loading, metadata round trips."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ttcompress import archs
from ttcompress.checkpoint import ModelMeta, history_entry, load, read, save
from ttcompress.outputs import check_output_path
from ttcompress.errors import CheckpointError, UserError
from ttcompress.tt import TTConv2d, decompose


def resnet20_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    net = archs.build("resnet20").net
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    return net.state_dict()


def same_outputs(a, b, x=None):
    x = torch.rand(2, 3, 32, 32) if x is None else x
    with torch.no_grad():
        return torch.equal(a.model.eval()(x), b.model.eval()(x))


FORMS = ["zip", "legacy", "safetensors", "nested_state_dict", "nested_model", "dataparallel", "no_num_batches"]


@pytest.mark.parametrize("form", FORMS)
def test_every_form_loads_the_same_weights(tmp_path, form):
    state = resnet20_state()
    path = tmp_path / f"ck_{form}.pt"
    if form == "zip":
        torch.save(state, path)
    elif form == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif form == "safetensors":
        path = tmp_path / "ck.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif form == "nested_state_dict":
        torch.save({"state_dict": state, "best_prec1": 91.0, "epoch": 3}, path)
    elif form == "nested_model":
        torch.save({"model": state, "optimizer": {"lr": 0.1}}, path)
    elif form == "dataparallel":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif form == "no_num_batches":
        torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    loaded = load(path, arch="resnet20")
    for k, v in state.items():
        if k.endswith("num_batches_tracked") and form == "no_num_batches":
            continue
        assert torch.equal(loaded.net.state_dict()[k], v), k
    assert loaded.meta.normalization == {"mean": list(archs.IMAGENET_MEAN), "std": list(archs.IMAGENET_STD)}


def test_mismatch_names_the_keys(tmp_path):
    state = resnet20_state()
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    state["linear.bias"] = torch.zeros(7)
    state["linear.weight"] = torch.zeros(7, 64)
    state["conv1.weight"] = torch.zeros(16, 3, 5, 5)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load(path, arch="resnet20")
    msg = str(info.value)
    assert "layer1.0.conv1.weight" in msg and "extra.weight" in msg and "conv1.weight (16, 3, 5, 5)" in msg
    with pytest.raises(CheckpointError, match="resnet32"):
        torch.save(resnet20_state(), path)
        load(path, arch="resnet32")


def test_num_classes_inferred_from_the_head(tmp_path):
    net = archs.build("resnet20", num_classes=100).net
    path = tmp_path / "c100.pt"
    torch.save(net.state_dict(), path)
    loaded = load(path, arch="resnet20")
    assert loaded.meta.num_classes == 100
    assert loaded.model(torch.rand(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, b"PK\x03\x04garbage"]
                         + [np.random.default_rng(seed).bytes(4096) for seed in range(40)])
def test_unreadable_files_are_checkpoint_errors(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load(path, arch="resnet20")
    assert "--trust-pickle" not in str(info.value)  # garbage is not "a pickle you could trust"


def test_truncated_files_are_checkpoint_errors(tmp_path):
    path = tmp_path / "full.pt"
    torch.save(resnet20_state(), path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            load(bad, arch="resnet20")
    st = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in resnet20_state().items()}, str(st))
    (tmp_path / "cut.safetensors").write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load(tmp_path / "cut.safetensors", arch="resnet20")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load(tmp_path / "nope.pt", arch="resnet20")
    with pytest.raises(CheckpointError, match="directory"):
        load(tmp_path, arch="resnet20")


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_code_executing_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": resnet20_state(), "payload": _Evil(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load(path, arch="resnet20")
    assert not marker.exists()


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_whole_module_pickle_needs_opt_in(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(TinyNet(), path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load(path)
    loaded = load(path, trust_pickle=True)
    assert isinstance(loaded.net, TinyNet)
    assert loaded.meta.num_classes == 4


def test_foreign_file_without_arch_is_a_user_error(tmp_path):
    path = tmp_path / "x.pt"
    torch.save(resnet20_state(), path)
    with pytest.raises(UserError, match="--arch"):
        load(path)


def test_unknown_arch(tmp_path):
    path = tmp_path / "x.pt"
    torch.save(resnet20_state(), path)
    with pytest.raises(UserError, match="unknown architecture"):
        load(path, arch="resnet21")


def test_tt_safetensors_round_trip_without_arch(tmp_path):
    path = tmp_path / "x.pt"
    torch.save(resnet20_state(), path)
    loaded = load(path, arch="resnet20", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    decompose(loaded.net, rank=6)
    out = save(loaded, tmp_path / "tt.safetensors", history_entry("decompose", rank=6))
    again = load(out)
    assert isinstance(again.net.get_submodule("layer2.0.conv1"), TTConv2d)
    assert again.meta.tt_ranks == loaded.meta.tt_ranks and again.meta.tt_ranks["layer1.0.conv1"] == [6, 6]
    assert again.meta.normalization == {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    assert again.meta.history[-1]["command"] == "decompose" and again.meta.history[-1]["args"]["rank"] == 6
    assert again.meta.arch == "resnet20" and again.meta.input_size == [3, 32, 32]
    assert same_outputs(loaded, again)
    for k, v in loaded.net.state_dict().items():
        assert torch.equal(again.net.state_dict()[k], v)


def test_metadata_from_the_future_is_refused():
    with pytest.raises(CheckpointError, match="newer"):
        ModelMeta.from_json('{"format_version": 99, "arch": "x"}')


def test_output_path_checks(tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes(b"x")
    with pytest.raises(UserError, match="over the input"):
        check_output_path(src, src)
    created = check_output_path(tmp_path / "new" / "dir" / "out.safetensors", src)
    assert created.parent.is_dir()
    with pytest.raises(UserError, match="directory"):
        check_output_path(tmp_path, src)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(UserError, match="not writable"):
            check_output_path(locked / "out.safetensors", src)
    finally:
        locked.chmod(0o700)


def test_user_module_from_file(tmp_path):
    src = tmp_path / "mynet.py"
    src.write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(3, 4, 3)\n"
        "    def forward(self, x):\n"
        "        return self.conv(x).mean((2, 3))\n"
    )
    net = archs.resolve(f"{src}:Net").factory()
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    loaded = load(path, arch=f"{src}:Net")
    assert torch.equal(loaded.net.conv.weight, net.conv.weight)
    with pytest.raises(UserError, match="no nn.Module subclass"):
        archs.resolve(f"{src}:Missing")


def test_torchvision_arch_builds():
    model = archs.build("torchvision:resnet18", num_classes=10)
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(UserError):
        archs.resolve("torchvision:not_a_model")


@pytest.mark.parametrize("spec,count", [("wrn16-10", 16), ("vgg19", 16), ("resnet20", 19), ("resnet110", 109)])
def test_registry_architectures_have_the_papers_conv_counts(spec, count):
    from ttcompress.tt import conv_layers

    model = archs.build(spec)
    assert len(list(conv_layers(model.net))) == count
    if spec != "resnet110":
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_real_resnet20_accuracy(resnet20_path, cifar_sample_path):
    loaded = load(resnet20_path, arch="resnet20")
    data = np.load(cifar_sample_path)
    x = torch.from_numpy(data["test_x"]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(data["test_y"]).long()
    with torch.no_grad():
        acc = (loaded.model(x).argmax(1) == y).float().mean().item()
    assert abs(acc - 0.912) < 0.005  # an independent forward pass gives 91.2 % on these 512 images


def test_resnet18_from_the_pyautoattack_wheel():
    path = importlib.resources.files("pyautoattack") / "examples" / "model_test.pt"
    if not path.is_file():
        pytest.skip("pyautoattack wheel without its example model")
    loaded = load(Path(str(path)), arch="resnet18-cifar")
    assert loaded.meta.normalization is None
    raw = read(Path(str(path)))
    for k, v in raw.state_dict.items():
        assert torch.equal(loaded.net.state_dict()[k], v)
