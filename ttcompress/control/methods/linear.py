"""**linear** (``linear_to`` Y): every ``nn.Linear`` — divided by its power-iteration σ̂ every step when dividing
(``divide_to`` set), otherwise its exact singular values are clipped at Y (on the clip schedule, or every step
without ``clip_to``).  The final verification is the exact SVD."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ttcompress.control.base import ControlContext, ControlMethod, register
from ttcompress.control.layers import Layers
from ttcompress.control.report import BoundReport
from ttcompress.spectral.power import LinearMap, PowerIteration


def matrix_clip(weight: torch.Tensor, bound: float) -> torch.Tensor:
    """``weight`` with its singular values clipped at ``bound`` (SVD in float64)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return ((u * s.clamp(max=bound)) @ vh).to(weight.dtype)


def matrix_sigma(weight: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight.detach().double(), ord=2))


@register
class LinearLimit(ControlMethod):
    name = "linear"
    order = 40
    settings = {"linear_to": None}

    def __init__(self, linears: list[tuple[str, nn.Linear]], bound: float, divide: bool, every: int,
                 power_iters: int, ctx: ControlContext) -> None:
        self.linears, self.bound, self.divide, self.every, self.ctx = linears, float(bound), divide, every, ctx
        self.power = PowerIteration(seed=ctx.seed, iters=power_iters)

    @classmethod
    def build(cls, settings: Mapping[str, Any], layers: Layers, ctx: ControlContext) -> LinearLimit | None:
        if settings["linear_to"] is None:
            return None
        every = settings["clip_every"] if settings.get("clip_to") is not None else 1
        return cls(list(layers.linears), settings["linear_to"], settings.get("divide_to") is not None, int(every),
                   settings.get("power_iters", 1), ctx)

    @property
    def active(self) -> bool:
        return bool(self.linears)

    def due(self, step: int) -> bool:
        return self.divide or step % self.every == 0

    @torch.no_grad()
    def apply(self) -> None:
        if not self.linears:
            return
        if self.divide:
            sigma = torch.stack([self.power.estimate(name, LinearMap(m.weight.detach())).to(torch.float64)
                                 for name, m in self.linears])
            if self.ctx.sync is not None:
                self.ctx.sync(sigma)
            for (_, m), s in zip(self.linears, sigma):
                m.weight.div_(torch.clamp(s / self.bound, min=1.0).to(m.weight.dtype))
            return
        for _, m in self.linears:
            m.weight.copy_(matrix_clip(m.weight.detach(), self.bound))
            self.ctx.broadcast([m.weight.data])

    @torch.no_grad()
    def verify(self) -> list[BoundReport]:
        reports = []
        for name, m in self.linears:
            before = matrix_sigma(m.weight)
            report = BoundReport(name, "linear", self.bound, before, before, operator="matrix")
            if before > self.bound * (1 + self.ctx.tolerance):
                m.weight.copy_(matrix_clip(m.weight.detach(), self.bound))
                report.reprojections = 1
                report.sigma_after = matrix_sigma(m.weight)
            reports.append(report)
        return reports

    def state_dict(self) -> dict:
        return {"power": self.power.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.power.load_state_dict(state.get("power", {}))
