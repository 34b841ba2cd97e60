"""**divide** (``divide_to`` D, every step; Gouk et al. 2021).

Each conv (TT: its core after QR) is divided by ``max(1, σ̂/D)`` with σ̂ from power iteration on the layer as it
runs, ``power_iters`` iterations per step from vectors kept between steps (part of the state).  Under
data-parallel training σ̂ is broadcast from rank 0 so that every rank applies the same factors.  The final
verification is the periodic one of :mod:`~ttcompress.control.methods.clip` (done there when both are on).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ttcompress.control.base import ControlContext, ControlMethod, ScheduledBound, register
from ttcompress.control.layers import ControlledConv, Layers
from ttcompress.control.methods.clip import verify_periodic
from ttcompress.control.report import BoundReport
from ttcompress.spectral.power import PowerIteration, conv_operator
from ttcompress.tt import effective_factors, write_effective


@register
class DivideConvs(ControlMethod):
    name = "divide"
    order = 10
    settings = {"divide_to": None, "power_iters": 1, "bound_schedule": "none"}

    def __init__(self, convs: list[ControlledConv], bound: float, power_iters: int, verifies: bool,
                 ctx: ControlContext, schedule: str | None = None) -> None:
        self.convs, self.bound, self.verifies, self.ctx = convs, float(bound), verifies, ctx
        self.power = PowerIteration(seed=ctx.seed, iters=power_iters)
        self.scheduled = ScheduledBound(self.bound, schedule, ctx)

    @classmethod
    def build(cls, settings: Mapping[str, Any], layers: Layers, ctx: ControlContext) -> DivideConvs | None:
        if settings["divide_to"] is None:
            return None
        verifies = settings.get("clip_to") is None  # with clip_to the clip verifies, at the smaller bound
        return cls(layers.convs_for("divide_to", periodic=True), settings["divide_to"], settings["power_iters"],
                   verifies, ctx, settings.get("bound_schedule"))

    @property
    def active(self) -> bool:
        return bool(self.convs)

    @torch.no_grad()
    def apply(self) -> None:
        prepared, sigmas = [], []
        for conv in self.convs:
            kernel, frames = effective_factors(conv.layer, conv.work_dtype)
            dtype = next(conv.layer.parameters()).dtype  # iterate in the training precision
            op = conv_operator(conv.layer, conv.input_size, kernel.to(dtype))
            sigmas.append(self.power.estimate(conv.name, op).to(torch.float64))
            prepared.append((conv, kernel, frames))
        sigma = torch.stack(sigmas)
        if self.ctx.sync is not None:
            self.ctx.sync(sigma)
        bounds = torch.tensor([self.scheduled(conv.name, lambda s=s: float(s)) for (conv, _, _), s
                               in zip(prepared, sigma)], dtype=sigma.dtype, device=sigma.device)
        factors = torch.clamp(sigma / bounds, min=1.0)
        for (conv, kernel, frames), factor in zip(prepared, factors):
            write_effective(conv.layer, kernel / factor.to(kernel.dtype), frames)

    def verify(self) -> list[BoundReport]:
        return verify_periodic(self.convs, self.bound, self.ctx) if self.verifies else []

    def state_dict(self) -> dict:
        return {"power": self.power.state_dict(), "schedule_start": self.scheduled.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.power.load_state_dict(state.get("power", {}))
        self.scheduled.load_state_dict(state.get("schedule_start", {}))
