"""Recipes: YAML files of finetune settings, shipped in the top-level ``recipes/`` folder and installed with the
package (``ttcompress/recipes/``), found by path or by bare name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ttcompress.errors import UserError

__all__ = ["find_recipe", "read_recipe", "recipe_dirs", "shipped_recipes"]

_PACKAGE = Path(__file__).resolve().parent.parent


def recipe_dirs() -> list[Path]:
    """Where shipped recipes live: inside the installed package, or the source tree's top-level ``recipes/``."""
    return [d for d in (_PACKAGE / "recipes", _PACKAGE.parent / "recipes") if d.is_dir()]


def shipped_recipes() -> dict[str, Path]:
    """``{name: path}`` of every shipped recipe (the installed copy first)."""
    found: dict[str, Path] = {}
    for folder in reversed(recipe_dirs()):
        found.update({p.stem: p for p in folder.glob("*.yaml")})
    return dict(sorted(found.items()))


def find_recipe(spec: str | os.PathLike) -> Path:
    """A recipe path as given, or a bare name (``wrn16-10-cifar10-clip1``) from the shipped recipes."""
    path = Path(os.path.expanduser(str(spec)))
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if str(spec) == path.name:
        name = path.name[:-5] if path.name.endswith(".yaml") else path.name
        if name in shipped:
            return shipped[name]
    hint = f"; shipped recipes: {', '.join(shipped)}" if shipped else ""
    raise UserError(f"recipe {spec} not found{hint}")


def read_recipe(path: Path) -> dict[str, Any]:
    """The recipe's mapping of settings (``{}`` for an empty file); anything else is a one-line :class:`UserError`."""
    import yaml

    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UserError(f"cannot read recipe {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"recipe {path} is not a UTF-8 text file") from None
    if "\x00" in text:
        raise UserError(f"recipe {path} is a binary file, not YAML")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"recipe {path} is not valid YAML{where}") from None
    except (ValueError, RecursionError, OverflowError) as exc:  # e.g. a date out of range, deep nesting
        raise UserError(f"recipe {path} is not a valid recipe ({type(exc).__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of settings (key: value), got {type(data).__name__}")
    return data
