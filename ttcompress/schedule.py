"""Bound schedules: reach a singular-value bound gradually instead of at the first control step.

``linear:F`` lowers each layer's bound linearly from its own σmax at the start of the run to the target C over the
first fraction F of the run, then holds C; ``cosine:F`` does the same along a half cosine (slow start and finish);
``none`` is C from the first step.  The final verification always enforces C itself, so a schedule changes the path,
never the saved model's bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ttcompress.errors import UserError

SHAPES = ("none", "linear", "cosine")


@dataclass(frozen=True)
class BoundSchedule:
    shape: str = "none"
    fraction: float = 0.0  # of the run's steps over which the bound comes down

    @classmethod
    def parse(cls, text: str | None) -> BoundSchedule:
        """``none``, ``linear:F`` or ``cosine:F`` with 0 < F ≤ 1."""
        if text is None or text.strip() in ("", "none"):
            return cls()
        shape, _, frac = text.strip().partition(":")
        if shape not in SHAPES[1:]:
            raise UserError(f"bound_schedule must be none, linear:F or cosine:F, got {text!r}")
        try:
            fraction = float(frac) if frac else 0.5
        except ValueError:
            raise UserError(f"bound_schedule {text!r}: F must be a number in (0, 1]") from None
        if not (0 < fraction <= 1) or not math.isfinite(fraction):
            raise UserError(f"bound_schedule {text!r}: F must be in (0, 1]")
        return cls(shape, fraction)

    @property
    def active(self) -> bool:
        return self.shape != "none"

    def progress(self, step: int, total: int) -> float:
        """How far along the way from the start to the target the bound is at ``step`` (0 → start, 1 → target)."""
        if not self.active or total <= 0:
            return 1.0
        t = min(1.0, step / (self.fraction * total))
        return t if self.shape == "linear" else 0.5 - 0.5 * math.cos(math.pi * t)

    def bound(self, step: int, total: int, start: float, target: float) -> float:
        """The bound at ``step`` for a layer whose σmax was ``start`` when the run began (never below ``target``,
        never above ``start``)."""
        if start <= target:
            return target
        return start + (target - start) * self.progress(step, total)

    def __str__(self) -> str:
        return "none" if not self.active else f"{self.shape}:{self.fraction:g}"
