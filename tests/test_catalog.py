"""`ttcompress archs` / `ttcompress recipes`: what --arch and --recipe accept, as tables and JSON."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ttcompress import archs
from ttcompress.cli import app
from ttcompress.train import FinetuneConfig
from ttcompress.train.recipes import recipe_dirs


def run(*args: str):
    import ttcompress.cli.archs  # noqa: F401  (registers the commands)

    return CliRunner().invoke(app, list(args))


def test_archs_json_lists_every_registry_name_and_the_families():
    res = run("archs", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["archs"]
    names = [r["name"] for r in rows]
    assert set(archs.REGISTRY) <= set(names)
    assert {"torchvision:NAME", "timm:NAME", "path/to/file.py:Class"} <= set(names)
    r20 = next(r for r in rows if r["name"] == "resnet20")
    assert r20 == {"name": "resnet20", "kind": "registry", "input_size": [3, 32, 32], "num_classes": 10,
                   "normalization": {"mean": list(archs.IMAGENET_MEAN), "std": list(archs.IMAGENET_STD)},
                   "description": archs.REGISTRY["resnet20"].description}
    assert next(r for r in rows if r["name"] == "resnet18-cifar")["normalization"] is None
    for name in names:  # every registry name is accepted by --arch
        if name in archs.REGISTRY:
            assert archs.resolve(name).spec == name


def test_recipes_json_matches_the_shipped_files():
    res = run("recipes", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["recipes"]
    assert [r["name"] for r in rows] == sorted({p.stem for d in recipe_dirs() for p in d.glob("*.yaml")})
    assert "compress-short" in [r["name"] for r in rows]
    clip1 = next(r for r in rows if r["name"] == "wrn16-10-cifar10-clip1")
    cfg = FinetuneConfig.from_recipe("wrn16-10-cifar10-clip1")
    assert clip1["description"] == cfg.description and clip1["control"]["clip_to"] == 1.0
    assert clip1["data"] == "cifar10" and clip1["epochs"] == 200


def test_tables_render():
    for command, title in (("archs", "--arch"), ("recipes", "--recipe")):
        res = run(command)
        assert res.exit_code == 0, res.output
        assert res.output.startswith(title)
