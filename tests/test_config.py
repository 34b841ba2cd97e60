"""One source of truth per setting: the typed configuration, its CLI flags, recipes (hostile ones included) and
their installation with the package."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ttcompress.errors import SettingError, UserError
from ttcompress.train import FinetuneConfig, find_recipe
from ttcompress.train.config import RECIPE_ONLY, coerce, setting_types

ROOT = Path(__file__).resolve().parent.parent


def finetune_command():
    import typer

    import ttcompress.cli.finetune  # noqa: F401  (registers the command)
    from ttcompress.cli import app

    return typer.main.get_command(app).commands["finetune"]


def run_cli(*args: str):
    import ttcompress.cli.finetune  # noqa: F401
    from ttcompress.cli import app

    return CliRunner().invoke(app, ["finetune", *args])


def test_every_setting_has_a_flag_with_its_default_and_vice_versa():
    options = {p.name: p for p in finetune_command().params}
    cli_only = {"checkpoint", "out", "as_json", "key_prefix"}  # how to read the model, not a training setting
    fields = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    assert set(options) - cli_only == set(fields) - set(RECIPE_ONLY)
    for name in set(fields) - set(RECIPE_ONLY):
        option = options[name]
        assert f"--{name.replace('_', '-')}" in option.opts, name
        assert option.default is None, name  # unset on the command line: the recipe's value, else the config's
        default = fields[name]
        if isinstance(default, bool):
            assert f"[default: {'on' if default else 'off'}]" in option.help, name
        elif default is not None:
            assert f"[default: {default}]" in option.help, name
    # no flag given: exactly the configuration's defaults
    assert FinetuneConfig.from_recipe(None, data="x.npz", steps=1) == FinetuneConfig(data="x.npz", steps=1)


def test_every_control_setting_is_a_config_setting_with_the_same_default():
    from ttcompress.control import method_settings

    fields = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    for name, default in method_settings().items():
        assert name in fields and fields[name] == default, name


def test_coercion_follows_the_type_hints():
    types = setting_types()
    assert (types["lr"], types["steps"], types["nesterov"], types["data"]) == (float, int, bool, str)
    assert coerce("orthogonal_k", "1e5", "recipe") == 1e5  # YAML reads 1e5 (no dot) as a string
    assert coerce("steps", 3.0, "recipe") == 3 and isinstance(coerce("steps", "40", "recipe"), int)
    for name, value in (("steps", 2.5), ("steps", True), ("steps", "inf"), ("nesterov", "yes"), ("lr", [1]),
                        ("lr", True), ("data", {"a": 1})):
        with pytest.raises(SettingError, match=name):
            coerce(name, value, "recipe")


def test_setting_errors_render_as_flags():
    err = SettingError("fastclip_to and clip_to both control the convs; clip_to_x stays", "fastclip_to", "clip_to")
    assert err.render(lambda n: "--" + n.replace("_", "-")) == \
        "--fastclip-to and --clip-to both control the convs; clip_to_x stays"
    assert str(err).startswith("fastclip_to and clip_to")
    from ttcompress.errors import DivergenceError

    diverged = DivergenceError("Lower lr (or orthogonal_k) and re-run with resume", "lr", "orthogonal_k", "resume")
    assert diverged.render(lambda n: "--" + n.replace("_", "-")) == \
        "Lower --lr (or --orthogonal-k) and re-run with --resume" and diverged.exit_code == 1


# --- recipes ------------------------------------------------------------------------------------------------------

@pytest.fixture
def model_file(tmp_path) -> Path:
    """A file that is never read: every run below must stop at the recipe."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not used")
    return path


@pytest.mark.parametrize("content,message", [
    (b"arch: ATTACK.py:Net\ndata: x.npz\nsteps: 1\n", "names a Python file"),
    (b"arch: ./ATTACK\ndata: x.npz\nsteps: 1\n", "names a Python file"),
    (b"teacher: t.pt\nteacher_arch: ATTACK.py:Net\ndata: x.npz\nsteps: 1\n", "names a Python file"),
    (b"\xff\xfe\x00b\x00i\x00n", "not a UTF-8 text file"),
    (b"data: x.npz\x00\x01\x02\n", "binary file"),
    (b"- data\n- x.npz\n", "must be a mapping"),
    (b"data: [x.npz\n", "not valid YAML"),
    (b"data: x.npz\nsteps: 1\nlr: .nan\n", "lr must be a finite number"),
    (b"data: x.npz\nsteps: 1\nweight_decay: .inf\n", "weight-decay must be a finite number"),
])
def test_hostile_recipes_are_refused_in_one_line(tmp_path, model_file, content, message):
    marker = tmp_path / "MARKER"
    (tmp_path / "ATTACK.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nimport torch\n"
                                        "class Net(torch.nn.Module):\n    pass\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content.replace(b"ATTACK", str(tmp_path / "ATTACK").encode()))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = run_cli(str(model_file), "--recipe", str(recipe), "-o", str(tmp_path / "out.safetensors"))
    finally:
        os.chdir(cwd)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 or res.output.count("error:") == 1
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--weight-decay", "inf"), ("--momentum", "nan"),
                                        ("--bn-to", "inf"), ("--orthogonal-k", "nan"), ("--clip-to", "-inf")])
def test_non_finite_flags_are_refused_naming_the_flag(tmp_path, model_file, flag, value):
    res = run_cli(str(model_file), "--data", "x.npz", "--steps", "1", flag, value, "-o", str(tmp_path / "o.safetensors"))
    assert res.exit_code == 2 and f"{flag} must be" in res.output and "Traceback" not in res.output, res.output


def test_installed_recipes_are_found_first(tmp_path, monkeypatch):
    """The lookup an installed package uses: ttcompress/recipes/ beside the code, before a source tree's."""
    from ttcompress.train import recipes

    package = tmp_path / "site" / "ttcompress"
    (package / "recipes").mkdir(parents=True)
    (package / "recipes" / "wrn16-10-cifar10-clip1.yaml").write_text("data: cifar10\nsteps: 7\n")
    monkeypatch.setattr(recipes, "_PACKAGE", package)
    assert find_recipe("wrn16-10-cifar10-clip1") == package / "recipes" / "wrn16-10-cifar10-clip1.yaml"
    assert FinetuneConfig.from_recipe("wrn16-10-cifar10-clip1").steps == 7
    with pytest.raises(UserError, match="not found.*shipped recipes: wrn16-10-cifar10-clip1"):
        find_recipe("wrn16-10-cifar10-clip9")


@pytest.mark.slow
def test_a_non_editable_install_finds_the_shipped_recipes_by_name(tmp_path):
    """``pip install .`` (not editable) installs recipes/ as ttcompress/recipes/, and a bare name finds them."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        (source / name).write_bytes((ROOT / name).read_bytes())
    for folder in ("ttcompress", "recipes"):
        subprocess.run(["cp", "-r", str(ROOT / folder), str(source / folder)], check=True)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    assert (target / "ttcompress" / "recipes" / "wrn16-10-cifar10-clip1.yaml").is_file()
    away = tmp_path / "elsewhere"
    away.mkdir()
    probe = ("import ttcompress; from ttcompress.train import FinetuneConfig, find_recipe; "
             "print(ttcompress.__file__); print(find_recipe('wrn16-10-cifar10-clip1')); "
             "print(FinetuneConfig.from_recipe('wrn16-10-cifar10-clip1').clip_to)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=away, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"})
    module, recipe, clip_to = done.stdout.split()
    assert Path(module).is_relative_to(target) and Path(recipe).is_relative_to(target) and float(clip_to) == 1.0


def test_eval_offers_every_norm_version_and_metric_the_library_supports():
    import typer

    import ttcompress.cli.evaluate  # noqa: F401
    from ttcompress.cli import app
    from ttcompress.evaluate import METRICS
    from ttcompress.metrics import ATTACK_NORMS, ATTACK_VERSIONS

    helps = {p.name: p.help for p in typer.main.get_command(app).commands["eval"].params}
    for name, choices in (("norm", ATTACK_NORMS), ("attack_version", ATTACK_VERSIONS), ("metrics", METRICS)):
        assert all(c in helps[name] for c in choices), name
    assert {"L1", "plus", "rand"} <= set(ATTACK_NORMS) | set(ATTACK_VERSIONS)  # more than the CLI used to take
