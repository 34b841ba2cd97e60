"""Issue 12, tried as a hostile user would: files never run code, outputs never destroy inputs, non-finite numbers and
malformed files end in one line with exit 2, untrusted text is printed as itself.

Every test builds its own hostile fixture: a marker file that must never be created, or inputs whose bytes must be
unchanged after the command.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from ttcompress import archs
from ttcompress import checkpoint as ck
from ttcompress.cli import app
from ttcompress.errors import CheckpointError, UserError
from ttcompress.outputs import atomic_write, guard

runner = CliRunner()


def run(*args):
    import ttcompress.cli.decompose  # noqa: F401
    import ttcompress.cli.evaluate  # noqa: F401
    import ttcompress.cli.init  # noqa: F401
    import ttcompress.cli.spectrum  # noqa: F401

    return runner.invoke(app, [str(a) for a in args])


def one_line_exit_2(res, needle: str | None = None) -> None:
    text = res.output.strip()
    assert res.exit_code == 2, res.output
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    if needle is not None:
        assert needle in text, text


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


EVIL = """
from pathlib import Path
Path({marker!r}).write_text("ran")
import torch
class Evil(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 10)
    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))
"""


def evil_file(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER-code-ran"
    source = tmp_path / "evil.py"
    source.write_text(EVIL.format(marker=str(marker)))
    return source, marker


def write_meta_file(path: Path, meta: dict, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    state = tensors if tensors is not None else {k: v.contiguous() for k, v in Tiny().state_dict().items()}
    save_file(state, str(path), metadata={"ttcompress": json.dumps(meta)})
    return path


def good_meta(**changes) -> dict:
    meta = {"arch": "resnet20", "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}, "input_size": [3, 32, 32],
            "num_classes": 10, "tt_ranks": {}, "history": [], "format_version": 1}
    meta.update(changes)
    return meta


@pytest.fixture
def r20_file(tmp_path) -> Path:
    torch.manual_seed(0)
    loaded = ck.initialize("resnet20")
    path = tmp_path / "r20.safetensors"
    ck.save(loaded, path)
    return path


# --- 1. code is named only by the person at the keyboard ------------------------------------------------------------

@pytest.mark.parametrize("relative", [False, True])
def test_metadata_naming_a_python_file_never_runs_it(tmp_path, monkeypatch, relative):
    source, marker = evil_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    spec = f"{source.name if relative else source}:Evil"
    path = write_meta_file(tmp_path / "m.safetensors", good_meta(arch=spec, normalization=None))
    for args in (["spectrum", path], ["decompose", path, "--rank", "2", "-o", tmp_path / "o.safetensors"],
                 ["eval", path, "--data", "cifar10"]):
        res = run(*args)
        one_line_exit_2(res, f"pass --arch {spec}")
        assert not marker.exists()
    with pytest.raises(UserError, match="never makes ttcompress run code"):
        ck.load(path)
    assert not marker.exists()
    # named by the person at the keyboard, the same file is used
    loaded = ck.load(path, arch=spec)
    assert marker.exists() and type(loaded.net).__name__ == "Evil"


def test_metadata_naming_a_standard_library_module_is_refused(tmp_path):
    import json as stdlib_json

    spec = f"{stdlib_json.__file__}:JSONDecoder"
    path = write_meta_file(tmp_path / "m.safetensors", good_meta(arch=spec))
    one_line_exit_2(run("spectrum", path), "--arch")


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"arch": 3}, "arch"),
        ({"arch": ""}, "arch"),
        ({"input_size": "3x32x32"}, "input_size"),
        ({"input_size": [3, -32, 32]}, "input_size"),
        ({"input_size": [3, 10**9, 10**9]}, "input_size"),
        ({"num_classes": -1}, "num_classes"),
        ({"num_classes": "ten"}, "num_classes"),
        ({"normalization": {"mean": [0.5, 0.5, 0.5]}}, "normalization"),
        ({"normalization": {"mean": [0.5] * 3, "std": ["NaN"] * 3}}, "normalization"),
        ({"normalization": {"mean": [0.5] * 3, "std": [0, 1, 1]}}, "std"),
        ({"tt_ranks": {"conv1": [-4, 2]}}, "TT rank"),
        ({"tt_ranks": {"conv1": [200_000, 200_000]}}, "conv1"),
        ({"tt_ranks": {"conv1": [2, 2]}}, "conv1"),
        ({"tt_ranks": []}, "tt_ranks"),
        ({"history": "yesterday"}, "history"),
        ({"format_version": "1"}, "format_version"),
    ],
)
def test_malformed_metadata_is_one_line(tmp_path, change, needle):
    state = {k: v.contiguous() for k, v in archs.build("resnet20").net.state_dict().items()}
    path = write_meta_file(tmp_path / "m.safetensors", good_meta(**change), state)
    one_line_exit_2(run("spectrum", path), needle)


def test_nan_in_stored_normalisation_is_refused(tmp_path):
    # json.dumps writes NaN as the bare token NaN, which Python's json reads back: the schema must still refuse it
    state = {k: v.contiguous() for k, v in archs.build("resnet20").net.state_dict().items()}
    path = write_meta_file(tmp_path / "m.safetensors", good_meta(normalization={"mean": [float("nan")] * 3,
                                                                                "std": [1.0] * 3}), state)
    with pytest.raises(CheckpointError, match="finite"):
        ck.load(path)


def test_huge_metadata_ranks_allocate_nothing(tmp_path):
    """Ranks must agree with the tensors present before any layer is built (200 000² would need terabytes)."""
    state = {k: v.contiguous() for k, v in archs.build("resnet20").net.state_dict().items()}
    path = write_meta_file(tmp_path / "m.safetensors", good_meta(tt_ranks={"layer1.0.conv1": [200_000, 200_000]}),
                           state)
    with pytest.raises(CheckpointError, match="layer1.0.conv1"):
        ck.load(path)


# --- 2. outputs never destroy inputs ---------------------------------------------------------------------------------

def test_output_over_the_arch_file_or_data_is_refused(tmp_path):
    source = tmp_path / "tiny.py"
    source.write_text("from test_security import Tiny\n")
    raw = tmp_path / "tiny.pt"
    torch.save(Tiny().state_dict(), raw)
    before = digest(source)
    one_line_exit_2(run("decompose", raw, "--arch", f"{source}:Tiny", "--rank", "2", "-o", source), "over the input")
    assert digest(source) == before
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(4, np.int64))
    before = digest(data)
    (tmp_path / "out").mkdir()
    os.symlink(data, tmp_path / "out" / "eval.json")  # eval.json → the data file: refused
    one_line_exit_2(run("eval", raw, "--arch", f"{source}:Tiny", "--data", data, "--out", tmp_path / "out"),
                    "over the input")
    victim = tmp_path / "victim.json"
    victim.write_text("keep")
    (tmp_path / "out" / "eval.json").unlink()
    os.symlink(victim, tmp_path / "out" / "eval.json")  # → a file nobody reads: replaced, never written through
    res = run("eval", raw, "--arch", f"{source}:Tiny", "--data", data, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert digest(data) == before and victim.read_text() == "keep"
    assert not (tmp_path / "out" / "eval.json").is_symlink()
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["n"] == 4
    one_line_exit_2(run("eval", raw, "--arch", f"{source}:Tiny", "--data", data, "--out", data), "--out")
    assert digest(data) == before


def test_output_reaching_the_input_through_links_is_refused(tmp_path, r20_file):
    before = digest(r20_file)
    link = tmp_path / "link.safetensors"
    os.symlink(r20_file, link)
    hard = tmp_path / "hard.safetensors"
    os.link(r20_file, hard)
    sub = tmp_path / "sub"
    sub.mkdir()
    for out in (link, hard, sub / ".." / r20_file.name):
        one_line_exit_2(run("decompose", r20_file, "--rank", "4", "-o", out), "over the input")
    one_line_exit_2(run("decompose", link, "--rank", "4", "-o", r20_file), "over the input")
    assert digest(r20_file) == before


def test_output_that_is_not_a_regular_file_is_refused(tmp_path, r20_file):
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null")
    before = os.stat("/dev/null")
    one_line_exit_2(run("decompose", r20_file, "--rank", "4", "-o", "/dev/null"), "not a regular file")
    after = os.stat("/dev/null")
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    one_line_exit_2(run("spectrum", r20_file, "--plot", fifo), "not a regular file")
    one_line_exit_2(run("spectrum", r20_file, "--values", tmp_path), "directory")


def test_outputs_of_one_command_must_differ(tmp_path, r20_file):
    same = tmp_path / "x.out"
    one_line_exit_2(run("spectrum", r20_file, "--values", same, "--plot", same), "different paths")
    assert not same.exists()


def test_longest_valid_output_name_is_written(tmp_path, r20_file):
    name = "m" * (255 - len(".safetensors")) + ".safetensors"
    res = run("decompose", r20_file, "--rank", "4", "-o", tmp_path / name)
    assert res.exit_code == 0, res.output
    assert ck.load(tmp_path / name).meta.tt_ranks
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, r20_file.name])  # no temp or lock left


def test_symlink_output_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "out.txt"
    os.symlink(victim, link)
    atomic_write(link, lambda tmp: Path(tmp).write_text("new"))
    assert victim.read_text() == "keep me" and not link.is_symlink() and link.read_text() == "new"


def test_failed_write_leaves_the_previous_output(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")

    def boom(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_second_writer_of_the_same_output_is_refused(tmp_path, r20_file):
    out = tmp_path / "busy.safetensors"
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with guard([("-o", out)], inputs=[r20_file]):
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert entered.wait(10)
        one_line_exit_2(run("decompose", r20_file, "--rank", "4", "-o", out), "another ttcompress run")
        assert not out.exists()
    finally:
        release.set()
        holder.join()
    assert run("decompose", r20_file, "--rank", "4", "-o", out).exit_code == 0  # free again once the first is done


def test_output_inside_a_missing_folder_is_created(tmp_path, r20_file):
    out = tmp_path / "new" / "deeper" / "x.safetensors"
    assert run("decompose", r20_file, "--rank", "4", "-o", out).exit_code == 0 and out.exists()


# --- 3. finite numbers only -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--std", "nan,nan,nan"), ("--mean", "0,inf,0"), ("--std", "1,1,-inf")])
def test_non_finite_normalisation_flags_are_refused(tmp_path, r20_file, flag, value):
    one_line_exit_2(run("spectrum", r20_file, flag, value, "--mean" if flag == "--std" else "--std", "1,1,1"), flag)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("command", ["spectrum", "decompose", "eval"])
def test_non_finite_weights_name_the_first_tensor(tmp_path, bad, command):
    net = archs.build("resnet20").net
    with torch.no_grad():
        net.layer2[0].conv1.weight[0, 0, 0, 0] = bad
    raw = tmp_path / "bad.pt"
    torch.save(net.state_dict(), raw)
    args = {"spectrum": [], "decompose": ["--rank", "4", "-o", tmp_path / "o.safetensors"],
            "eval": ["--data", "cifar10"]}[command]
    one_line_exit_2(run(command, raw, "--arch", "resnet20", *args), "layer2.0.conv1.weight")
    assert not (tmp_path / "o.safetensors").exists()


def test_non_finite_eval_radius_is_refused(tmp_path, r20_file):
    one_line_exit_2(run("eval", r20_file, "--data", "cifar10", "--radius", "nan"), "--radius")


# --- 5. untrusted text is printed as itself ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["x[/red].pt", "model[v2].pt", ":x: [bold]b[/bold].pt"])
def test_markup_in_paths_is_printed_literally(tmp_path, name):
    res = run("spectrum", tmp_path / name, "--arch", "resnet20")
    one_line_exit_2(res, name)


def test_markup_in_layer_names_and_titles(tmp_path, r20_file):
    target = tmp_path / "model[v2] :x:.safetensors"
    target.write_bytes(r20_file.read_bytes())
    res = run("spectrum", target)
    assert res.exit_code == 0, res.output
    assert "model[v2] :x:.safetensors" in res.stdout and "❌" not in res.stdout


def test_library_warnings_stay_out_of_a_normal_run(tmp_path):
    """A file a warning-raising library reads (here: a legacy torch file that makes torch warn) prints only our
    output; ``--debug`` shows everything."""
    script = (
        "import warnings, sys\n"
        "import ttcompress.cli as cli\n"
        "cli._route_warnings()\n"
        "warnings.warn('third-party noise', UserWarning)\n"
        "import ttcompress.control as c\n"
        "exec(compile(\"import warnings\\nwarnings.warn('ours', UserWarning)\", c.__file__, 'exec'))\n"
    )
    env = {**os.environ, "TTCOMPRESS_DEBUG": ""}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "third-party noise" not in out.stderr
    assert out.stderr.strip().splitlines() == ["warning: ours"]
    env["TTCOMPRESS_DEBUG"] = "1"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert "third-party noise" in out.stderr


# --- 6. malformed data ------------------------------------------------------------------------------------------------

def test_decompression_bomb_image_is_one_line(tmp_path, r20_file):
    from PIL import Image

    from ttcompress.data import MAX_IMAGE_PIXELS

    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    side = int(MAX_IMAGE_PIXELS**0.5) + 64
    Image.new("1", (side, side)).save(folder / "bomb.png", optimize=True)  # a few kB on disk, 33 M pixels
    assert (folder / "bomb.png").stat().st_size < 1_000_000
    one_line_exit_2(run("eval", r20_file, "--data", tmp_path / "imgs"), "refusing to decode")


# --- finetune: every file it writes, against every file it reads -------------------------------------------------------

@pytest.fixture
def ft_inputs(tmp_path):
    torch.manual_seed(0)
    model = tmp_path / "m.state.pt"  # named like the side file of the output m.safetensors
    ck.save(ck.initialize("resnet20"), model)
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, train_x=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), train_y=rng.integers(0, 10, 8))
    return model, data


def finetune_args(model, data, out, *extra):
    import ttcompress.cli.finetune  # noqa: F401

    return ["finetune", model, "--data", data, "--steps", "1", "--batch-size", "8", "--device", "cpu", "-o", out,
            *extra]


def test_finetune_outputs_never_replace_its_inputs(tmp_path, ft_inputs):
    model, data = ft_inputs
    before = {p: digest(p) for p in (model, data)}
    one_line_exit_2(run(*finetune_args(model, data, tmp_path / "m.safetensors")), "state file")  # m.state.pt
    one_line_exit_2(run(*finetune_args(model, data, data)), "over the input")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.01\n")
    before[recipe] = digest(recipe)
    one_line_exit_2(run(*finetune_args(model, data, recipe, "--recipe", recipe)), "over the input")
    teacher = tmp_path / "t.log.csv"  # a teacher named like the output's log
    teacher.write_bytes(model.read_bytes())
    before[teacher] = digest(teacher)
    one_line_exit_2(run(*finetune_args(model, data, tmp_path / "t.safetensors", "--teacher", teacher)), "its log")
    assert {p: digest(p) for p in before} == before
    assert run(*finetune_args(model, data, tmp_path / "ok.safetensors")).exit_code == 0


def test_finetune_refuses_a_second_writer(tmp_path, ft_inputs):
    model, data = ft_inputs
    out = tmp_path / "busy.safetensors"
    with guard([("-o", out)], inputs=[]):
        one_line_exit_2(run(*finetune_args(model, data, out)), "another ttcompress run")
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["decompose", "{ck}", "--energy", "nan", "-o", "{tmp}/o.safetensors"], "--energy"),
    (["demo", "--clip-to", "nan", "--out", "{tmp}/d"], "--clip-to"),
    (["demo", "--clip-to", "inf", "--out", "{tmp}/d"], "--clip-to"),
    (["demo", "--steps", "0", "--out", "{tmp}/d"], "--steps"),
    (["demo", "--rank", "-1", "--out", "{tmp}/d"], "--rank"),
])
def test_non_finite_flags_of_every_command(tmp_path, r20_file, args, needle):
    import ttcompress.cli.demo  # noqa: F401

    res = run(*[a.format(ck=r20_file, tmp=tmp_path) for a in args])
    one_line_exit_2(res, needle)
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "d").exists()
