"""Learning-rate schedules: ``constant``, ``cosine`` and ``multistep:M1,M2,...[:GAMMA]``."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

from ttcompress.errors import SettingError

__all__ = ["lr_factor", "parse_schedule"]


def parse_schedule(text: str) -> tuple[str, list[float], float]:
    """``constant`` | ``cosine`` (to 0 over the run) | ``multistep:M1,M2,...[:GAMMA]`` (γ default 0.1).

    Multistep milestones are epochs of a run of ``schedule_epochs`` epochs (default: the run's own length in
    epochs, so for ``epochs`` runs they are plain epochs).  For a ``steps`` run they fall at the same fraction
    of the run: milestone step = round(M · steps / schedule_epochs).
    """
    raw = str(text).strip().lower()
    if raw in ("constant", "cosine"):
        return raw, [], 1.0
    parts = raw.split(":")
    if parts[0] == "multistep" and len(parts) in (2, 3):
        try:
            milestones = sorted(float(m) for m in parts[1].split(",") if m.strip())
            gamma = float(parts[2]) if len(parts) == 3 else 0.1
        except ValueError:
            milestones, gamma = [], -1.0
        if (milestones and all(m > 0 and math.isfinite(m) for m in milestones) and gamma > 0
                and math.isfinite(gamma)):
            return "multistep", milestones, gamma
    raise SettingError(f"schedule must be constant, cosine or multistep:M1,M2,...[:GAMMA] (milestones in epochs), "
                       f"got {text!r}", "schedule")


def lr_factor(schedule: str, total_steps: int, steps_per_epoch: int,
              schedule_epochs: float | None = None) -> Callable[[int], float]:
    """The learning-rate multiplier after ``s`` optimizer steps (what the next step uses)."""
    kind, milestones, gamma = parse_schedule(schedule)
    if kind == "constant":
        return lambda s: 1.0
    if kind == "cosine":
        return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps))
    nominal = schedule_epochs or total_steps / steps_per_epoch
    marks = [round(m * total_steps / nominal) for m in milestones]
    return lambda s: gamma ** bisect.bisect_right(marks, s)
