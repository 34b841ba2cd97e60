"""Every finetune setting, in one typed dataclass: its type hints drive the coercion of recipe and keyword values,
:meth:`FinetuneConfig.validate` checks them, and errors name the setting as the library does (``clip_to``);
the CLI spells them as flags (``--clip-to``) through :meth:`ttcompress.errors.SettingError.render`.

To add a setting: add a field here (type hint, default, comment), check it in :meth:`FinetuneConfig.validate`,
and give the ``finetune`` command a flag of the same name (``tests/test_config.py`` checks that they match).
"""

from __future__ import annotations

import math
import os
import typing
from dataclasses import asdict, dataclass, fields, replace
from functools import cache
from typing import Any

from ttcompress.errors import SettingError, UserError
from ttcompress.train.recipes import find_recipe, read_recipe
from ttcompress.train.schedule import parse_schedule

__all__ = ["DEFAULT_LR", "DEFAULT_WEIGHT_DECAY", "DEVICES", "OPTIMIZERS", "FinetuneConfig", "setting_types"]

OPTIMIZERS = ("sgd", "adam")
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-4}
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adam": 0.0}
RECIPE_ONLY = ("description",)  # settings a recipe may give that have no flag


@dataclass
class FinetuneConfig:
    """Every ``ttcompress finetune`` setting, with its default.  ``None`` means "not set" (or "automatic")."""

    data: str | None = None  # cifar10 | cifar100 | file.npz | image folder
    data_root: str | None = None  # where torchvision data sets live / are downloaded
    arch: str | None = None  # architecture of a foreign checkpoint (ttcompress files name their own)
    epochs: int | None = None  # run length: exactly one of epochs / steps
    steps: int | None = None
    batch_size: int = 128  # per process
    optimizer: str = "sgd"  # sgd | adam
    lr: float | None = None  # default 0.01 for sgd, 1e-4 for adam
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float | None = None  # default 1e-4 for sgd, 0 for adam
    schedule: str = "cosine"  # constant | cosine | multistep:M1,M2,...[:GAMMA] (milestones in epochs)
    schedule_epochs: float | None = None  # the epoch count multistep milestones refer to (see parse_schedule)
    orthogonal_k: float = 0.0  # weight of the orthogonal loss (paper: 1e5)
    f4_weight: float = 0.0  # weight of the Fantastic-Four bound sum Σ f4_bound over the convs (a regulariser)
    gram_weight: float = 0.0  # weight of Σ Gram-iteration bound of each conv's periodic σmax (a regulariser)
    clip_to: float | None = None  # clip conv singular values at C ...
    clip_every: int = 100  # ... every N steps
    divide_to: float | None = None  # divide convs by max(1, σ̂/D) every step
    bn_to: float | None = None  # BatchNorm Lipschitz limit X
    linear_to: float | None = None  # linear layers' σmax limit Y
    power_iters: int = 1  # power iterations per step for division
    fastclip_to: float | None = None  # FastClip: the convs' σmax as they run to C ...
    fastclip_every: int = 100  # ... every N steps (Boroojeny et al.: 100) ...
    fastclip_k: int = 1  # ... top k singular values at a time ...
    fastclip_rounds: int = 10  # ... at most this many rounds per layer and call (and in the final verification)
    clip_with_bn: bool = False  # FastClip the composition conv → its BatchNorm (eval mode)
    bound_schedule: str = "none"  # none | linear:F | cosine:F: clip_to/divide_to/fastclip_to reached over F of the run
    teacher: str | None = None  # distil from this checkpoint (auto: the one decompose recorded, checked by SHA-256)
    teacher_arch: str | None = None  # architecture of a foreign teacher checkpoint
    kd_alpha: float = 1.0  # weight of the distillation term T²·KL(teacher ‖ student) added to the cross-entropy
    kd_temperature: float = 4.0  # softmax temperature T of the distillation term
    kd_features: float = 0.0  # weight of the layer term: relative squared error of each decomposed layer's output
    reset_momentum: bool = True  # drop the optimizer state of the convs a control step rewrote (TT: new frames)
    final_reprojections: int = 3  # final verification: re-projections before rescaling (0: rescale at once)
    bn_recalibrate: int = 20  # batches to re-estimate BatchNorm statistics after the final projection (0: off)
    augment: bool | None = None  # random crop (4 px) + flip; default: on for 32×32 images
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = False  # float16 autocast + GradScaler (CUDA only)
    seed: int = 0
    save_every: int = 500  # state file at least every N steps
    resume: bool = False  # continue from OUT.state.pt when present
    tensorboard: bool = False  # also write TensorBoard events to OUT.tb/
    recipe: str | None = None  # the recipe this configuration came from (set by from_recipe)
    description: str | None = None  # free text, for recipes

    # ---------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_recipe(cls, path: str | os.PathLike | None = None, **overrides: Any) -> FinetuneConfig:
        """Defaults from a YAML recipe (``None``: none), overridden by every keyword that is not ``None``.

        Recipe keys are field names (``clip_to`` or ``clip-to``); unknown keys are an error.  A ``steps`` override
        replaces the recipe's ``epochs`` (and vice versa); the recipe's ``epochs`` then stays the reference of its
        multistep milestones (``schedule_epochs``), so they scale with the run.  A recipe may not name a Python
        file as ``arch`` (a file that is read must never run code: only the person running the command names one).
        """
        values: dict[str, Any] = {}
        recipe_path = None
        if path is not None:
            recipe_path = find_recipe(path)
            values = _recipe_values(recipe_path)
        given = {k.replace("-", "_"): v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - set(setting_types()))
        if unknown:
            raise UserError(f"unknown finetune setting(s): {', '.join(unknown)}")
        given = {k: coerce(k, v, "argument") for k, v in given.items()}
        if "steps" in given and "epochs" in values and "epochs" not in given:
            values.setdefault("schedule_epochs", values["epochs"])
            del values["epochs"]
        if "epochs" in given and "steps" in values and "steps" not in given:
            del values["steps"]
            values.pop("schedule_epochs", None)
        merged = {**values, **given}
        if recipe_path is not None:
            merged["recipe"] = str(recipe_path)
        config = cls(**merged)
        config.validate()
        return config

    def validate(self, *, data_given: bool = False) -> None:
        """Raise :class:`~ttcompress.errors.SettingError` for anything inconsistent, naming the setting
        (``data_given``: the batches come from elsewhere, ``data`` may be unset)."""
        from ttcompress.control import check_combination

        for name, kind in setting_types().items():  # every number finite, whatever its range
            value = getattr(self, name)
            if kind is float and value is not None and not math.isfinite(value):
                raise SettingError(f"{name} must be a finite number, got {value}", name)
        if not self.data and not data_given:
            raise SettingError("give the training data with data (cifar10, cifar100, a .npz file or an image "
                               "folder)", "data")
        if (self.epochs is None) == (self.steps is None):
            if self.epochs is None:
                raise SettingError("give the run length with epochs or steps (or a recipe that sets one)",
                                   "epochs", "steps", "recipe")
            raise SettingError("give either epochs or steps, not both", "epochs", "steps")
        for name in ("epochs", "steps", "batch_size", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SettingError(f"{name} must be a positive integer, got {value}", name)
        if self.optimizer.lower() not in OPTIMIZERS:
            raise SettingError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}",
                               "optimizer")
        for name in ("lr", "schedule_epochs"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise SettingError(f"{name} must be a positive number, got {value}", name)
        if self.final_reprojections < 0:
            raise SettingError(f"final_reprojections must be a non-negative integer, got {self.final_reprojections}",
                               "final_reprojections")
        if self.bn_recalibrate < 0:
            raise SettingError(f"bn_recalibrate must be a non-negative number of batches, got {self.bn_recalibrate}",
                               "bn_recalibrate")
        if not 0 <= self.momentum < 1:
            raise SettingError(f"momentum must be in [0, 1), got {self.momentum}", "momentum")
        if self.teacher_arch is not None and self.teacher is None:
            raise SettingError("teacher_arch names the architecture of a teacher: give teacher too", "teacher_arch",
                               "teacher")
        if not self.kd_temperature > 0:
            raise SettingError(f"kd_temperature must be a positive number, got {self.kd_temperature}",
                               "kd_temperature")
        if self.kd_features and self.teacher is None:
            raise SettingError("kd_features distils the layers' outputs from a teacher: give teacher too",
                               "kd_features", "teacher")
        for name in ("weight_decay", "orthogonal_k", "f4_weight", "gram_weight", "kd_alpha", "kd_features"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise SettingError(f"{name} must be a non-negative number, got {value}", name)
        check_combination(self)  # the control methods' settings (bounds, schedules), by the methods themselves
        if self.nesterov and (self.optimizer.lower() != "sgd" or self.momentum == 0):
            raise SettingError("nesterov needs optimizer sgd with a positive momentum", "nesterov", "optimizer",
                               "momentum")
        parse_schedule(self.schedule)
        device = self.device.lower()
        if not (device in DEVICES[:-1] or (device.startswith("cuda:") and device[5:].isdigit())):
            raise SettingError(f"device must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, got {self.device!r}",
                               "device")

    def resolved(self) -> FinetuneConfig:
        """A copy with the automatic defaults (lr, weight decay) filled in."""
        optimizer = self.optimizer.lower()
        return replace(
            self,
            optimizer=optimizer,
            device=self.device.lower(),
            lr=DEFAULT_LR[optimizer] if self.lr is None else self.lr,
            weight_decay=DEFAULT_WEIGHT_DECAY[optimizer] if self.weight_decay is None else self.weight_decay,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@cache
def setting_types() -> dict[str, type]:
    """``{setting: int | float | bool | str}`` from the type hints of :class:`FinetuneConfig` (``None`` aside)."""
    hints = typing.get_type_hints(FinetuneConfig)
    out = {}
    for f in fields(FinetuneConfig):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        assert len(args) == 1 and args[0] in (int, float, bool, str), f.name
        out[f.name] = args[0]
    return out


def coerce(name: str, value: Any, where: str) -> Any:
    """``value`` as the type of setting ``name`` (YAML reads ``1e5`` as a string, ``2`` as an int for a float)."""
    kind = setting_types()[name]

    def bad(what: str) -> SettingError:
        return SettingError(f"{where}: {name} must be {what}, got {value!r}", name)

    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if kind is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise bad("an integer") from None
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            return int(number)
        raise bad("an integer")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad("a number")
        try:
            return float(value)
        except ValueError:
            raise bad("a number") from None
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise bad("a string")


def _recipe_values(path) -> dict[str, Any]:
    data = read_recipe(path)
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = set(setting_types()) - {"recipe"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"recipe {path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    values = {k: coerce(k, v, f"recipe {path}") for k, v in values.items()}
    for key in ("arch", "teacher_arch"):
        arch = values.get(key)
        if arch is not None and (".py" in arch.lower() or "/" in arch or "\\" in arch):
            raise UserError(f"recipe {path}: {key} {arch!r} names a Python file, and a recipe may not run "
                            f"code: name that file yourself (--{key.replace('_', '-')}, or {key}=) if you trust it")
    return values
