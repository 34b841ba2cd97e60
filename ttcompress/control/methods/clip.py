"""**clip** (``clip_to`` C, every ``clip_every`` steps; Sedghi et al. 2019 with strides, Senderovich et al. 2022).

For each conv, the exact singular values of its periodic strided operator are clipped at C, the operator is
transformed back and cropped to the kernel's support.  A TT layer is first brought to orthonormal frames by QR
(the triangular factors folded into the core), only the core is clipped, and the layer is rewritten with the
orthonormal frames: its operator is then exactly the clipped core's (Theorem 3.2).  Runs on the training device,
batched over frequencies by :func:`ttcompress.spectral.periodic.clip`.

The crop makes a single clip approximate, so the final verification (:func:`verify_periodic`) computes every
conv's exact spectrum, re-projects up to ``max_reprojections`` times and rescales as a last resort.  With
``divide_to`` as well, the bound is the smaller of the two.  Exact for ``zeros`` and ``circular`` padding (the
layer as it runs is a restriction / a shift of the periodic operator); other padding modes are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ttcompress.control.base import ControlContext, ControlMethod, ScheduledBound, register
from ttcompress.control.layers import ControlledConv, Layers
from ttcompress.control.report import BoundReport
from ttcompress.spectral.periodic import clip as clip_kernel
from ttcompress.spectral.periodic import singular_values
from ttcompress.tt import effective_factors, write_effective


def exact_sigma(conv: ControlledConv, kernel: torch.Tensor, dtype: torch.dtype) -> float:
    """σmax of the periodic operator of ``kernel`` on ``conv``'s input size, exactly."""
    return float(singular_values(kernel, conv.input_size, conv.geometry, dtype=dtype)[0])


@torch.no_grad()
def verify_periodic(convs: list[ControlledConv], bound: float, ctx: ControlContext) -> list[BoundReport]:
    """Every conv's exact periodic σmax (``verify_dtype``) at most ``bound·(1 + tolerance)``: re-projected up to
    ``max_reprojections`` times, then rescaled by bound/σmax; one report per conv."""
    reports: list[BoundReport] = []
    limit = bound * (1 + ctx.tolerance)
    dtype = ctx.verify_dtype
    for conv in convs:
        kernel, frames = effective_factors(conv.layer, dtype)
        sigma = before = exact_sigma(conv, kernel, dtype)
        report = BoundReport(conv.name, conv.kind, bound, before, before)
        changed = False
        while sigma > limit and report.reprojections < ctx.max_reprojections:
            kernel = clip_kernel(kernel, conv.input_size, bound, conv.geometry, dtype=dtype)
            sigma = exact_sigma(conv, kernel, dtype)
            report.reprojections += 1
            changed = True
        if sigma > limit:
            report.rescale = bound / sigma
            kernel = kernel * report.rescale
            sigma = exact_sigma(conv, kernel, dtype)
            changed = True
        if changed:
            write_effective(conv.layer, kernel, frames)
        report.sigma_after = sigma
        reports.append(report)
    return reports


@register
class ClipConvs(ControlMethod):
    name = "clip"
    order = 20
    settings = {"clip_to": None, "clip_every": 100, "bound_schedule": "none"}

    def __init__(self, convs: list[ControlledConv], bound: float, every: int, ctx: ControlContext,
                 schedule: str | None = None) -> None:
        self.convs, self.bound, self.every, self.ctx = convs, float(bound), int(every), ctx
        self.scheduled = ScheduledBound(self.bound, schedule, ctx)

    @classmethod
    def build(cls, settings: Mapping[str, Any], layers: Layers, ctx: ControlContext) -> ClipConvs | None:
        if settings["clip_to"] is None:
            return None
        bound = min(b for b in (settings["clip_to"], settings.get("divide_to")) if b is not None)
        return cls(layers.convs_for("clip_to", periodic=True), bound, settings["clip_every"], ctx,
                   settings.get("bound_schedule"))

    @property
    def active(self) -> bool:
        return bool(self.convs)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def apply(self) -> None:
        """One Sedghi projection of every conv at the bound (its scheduled value, with ``bound_schedule``)."""
        for conv in self.convs:
            kernel, frames = effective_factors(conv.layer, conv.work_dtype)
            bound = self.scheduled(conv.name, lambda: exact_sigma(conv, kernel, self.ctx.clip_dtype))
            clipped = clip_kernel(kernel, conv.input_size, bound, conv.geometry, dtype=self.ctx.clip_dtype)
            write_effective(conv.layer, clipped, frames)
            self.ctx.broadcast(conv.params())

    def verify(self) -> list[BoundReport]:
        return verify_periodic(self.convs, self.bound, self.ctx)

    def state_dict(self) -> dict:
        return {"schedule_start": self.scheduled.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scheduled.load_state_dict(state.get("schedule_start", {}))
