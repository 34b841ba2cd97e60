"""The shape every control method has, and the registry the controller builds its methods from.

A method is a small class (see :mod:`ttcompress.control.methods` for the built-in ones):

* ``name`` (registry key and timing key) and ``settings``: the settings it reads, with their defaults (the
  finetune configuration has a field of the same name and default for each);
* :meth:`ControlMethod.check` refuses bad settings (a :class:`~ttcompress.errors.SettingError` naming them),
  :meth:`ControlMethod.build` returns the method for a network's :class:`~ttcompress.control.layers.Layers`, or
  ``None`` when its settings leave it off;
* when it runs (:meth:`ControlMethod.due`), what it does to the layers (:meth:`ControlMethod.apply`), how it
  verifies its layers into :class:`~ttcompress.control.report.BoundReport` s at the end (:meth:`ControlMethod.verify`,
  in the ``verify_phase`` it needs) and its resumable state (:meth:`ControlMethod.state_dict`).

To add a method: write such a class and decorate it with :func:`register`; the controller, the state file and
the final verification pick it up.  ``order`` says where it acts among the methods due after a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ttcompress.control.layers import Layers
from ttcompress.control.report import BoundReport
from ttcompress.errors import SettingError

__all__ = ["METHODS", "ControlContext", "ControlMethod", "ScheduledBound", "Sync", "method_settings", "register",
           "registered"]

Sync = Callable[[torch.Tensor], None]  # in place: make the tensor equal on every rank (broadcast from rank 0)

# verification phases: before the BatchNorm recalibration, after it, after the BatchNorm limit
BEFORE_RECALIBRATION, AFTER_RECALIBRATION, LAST = 0, 1, 2


@dataclass
class ControlContext:
    """What every method may use besides its settings."""

    seed: int = 0
    sync: Sync | None = None  # None: one process
    clip_dtype: torch.dtype = torch.float32  # training-time projections (float32: complex64 SVDs)
    verify_dtype: torch.dtype = torch.float64  # the final verification
    max_reprojections: int = 3
    tolerance: float = 0.01
    total_steps: int = 0  # the run's length, for bound schedules (0: unknown, the target from the first step)
    step: int = 0  # the optimizer step the controller is acting after (set by the controller)

    def broadcast(self, tensors) -> None:
        if self.sync is not None:
            for t in tensors:
                self.sync(t)


class ControlMethod:
    """Base class of a control method; see the module docstring."""

    name: ClassVar[str]
    settings: ClassVar[dict[str, Any]]  # setting → default
    order: ClassVar[int] = 100  # methods due after the same step act in increasing order
    convs: list = []  # the convs (ControlledConv) it controls, if any
    verify_phase: int = BEFORE_RECALIBRATION

    @classmethod
    def check(cls, settings: Mapping[str, Any]) -> None:
        """Refuse bad values of this method's settings (the default: bounds positive, integers at least 1, a bound
        schedule that parses)."""
        if "bound_schedule" in cls.settings:
            check_schedule(settings)
        for key, default in cls.settings.items():
            value = settings.get(key, default)
            if value is None or isinstance(value, (bool, str)):
                continue
            if isinstance(default, int) and not isinstance(default, bool):
                if value < 1:
                    raise SettingError(f"{key} must be a positive integer, got {value}", key)
            elif not (value > 0 and math.isfinite(value)):
                raise SettingError(f"{key} must be a positive number, got {value}", key)

    @classmethod
    def build(cls, settings: Mapping[str, Any], layers: Layers, ctx: ControlContext) -> ControlMethod | None:
        raise NotImplementedError

    def due(self, step: int) -> bool:
        """Whether to act after optimizer step ``step`` (1-based)."""
        return True

    def apply(self) -> None:
        """Act on the layers once (under ``torch.no_grad``)."""

    def verify(self) -> list[BoundReport]:
        """Make the layers meet the bound as reported; one process only (no collectives)."""
        return []

    @property
    def active(self) -> bool:
        """Whether the method has layers to act on."""
        return True

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ScheduledBound:
    """A conv bound reached along a :class:`~ttcompress.schedule.BoundSchedule` (``bound_schedule``): each conv
    starts from its own σmax, measured when the method first acts (kept in the state, so a resumed run follows the
    same path), and comes down to the target; the final verification always uses the target."""

    def __init__(self, target: float, schedule: str | None, ctx: ControlContext) -> None:
        from ttcompress.schedule import BoundSchedule

        self.target, self.ctx = float(target), ctx
        self.schedule = BoundSchedule.parse(schedule)
        self.start: dict[str, float] = {}

    def __call__(self, name: str, measure: Callable[[], float]) -> float:
        """The bound of layer ``name`` now; ``measure()`` gives its σmax the first time it is asked."""
        if not self.schedule.active or self.ctx.total_steps <= 0:
            return self.target
        if name not in self.start:
            self.start[name] = float(measure())
        return self.schedule.bound(self.ctx.step, self.ctx.total_steps, self.start[name], self.target)

    def state_dict(self) -> dict:
        return dict(self.start)

    def load_state_dict(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(v, float) for v in state.values()):
            raise ValueError("not a bound-schedule state")
        self.start = {str(k): float(v) for k, v in state.items()}


def check_schedule(settings: Mapping[str, Any]) -> None:
    from ttcompress.errors import UserError
    from ttcompress.schedule import BoundSchedule

    try:
        BoundSchedule.parse(settings.get("bound_schedule"))
    except UserError as exc:
        raise SettingError(str(exc), "bound_schedule") from None


METHODS: dict[str, type[ControlMethod]] = {}


def register(cls: type[ControlMethod]) -> type[ControlMethod]:
    """Add a method to the registry (a class decorator); a name registered again replaces the earlier class."""
    METHODS[cls.name] = cls
    return cls


def registered() -> list[type[ControlMethod]]:
    """The registered methods in the order they act."""
    return sorted(METHODS.values(), key=lambda cls: cls.order)


def method_settings() -> dict[str, Any]:
    """Every setting of every registered method, with its default."""
    out: dict[str, Any] = {}
    for cls in METHODS.values():
        out.update(cls.settings)
    return out
