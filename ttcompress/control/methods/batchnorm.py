"""**bn** (``bn_to`` X, every step; Gouk et al.): ``γ ← γ / max(1, max|γ/√(running_var+ε)|/X)``.

It reads the running variances, which each rank of a data-parallel run updates from its own batches: the norms
are broadcast from rank 0.  The final limit comes after the BatchNorm recalibration (exact: a rescale).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ttcompress.control.base import AFTER_RECALIBRATION, ControlContext, ControlMethod, Sync, register
from ttcompress.control.layers import Layers
from ttcompress.control.report import BoundReport


def bn_norm(bn: nn.Module) -> torch.Tensor:
    """The Lipschitz constant of an eval-mode BatchNorm: ``max |γ/√(running_var + ε)|``."""
    return (bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)).abs().max()


@register
class BatchNormLimit(ControlMethod):
    name = "bn"
    order = 50
    settings = {"bn_to": None}
    verify_phase = AFTER_RECALIBRATION

    def __init__(self, bns: list[tuple[str, nn.Module]], bound: float, ctx: ControlContext) -> None:
        self.bns, self.bound, self.ctx = bns, float(bound), ctx

    @classmethod
    def build(cls, settings: Mapping[str, Any], layers: Layers, ctx: ControlContext) -> BatchNormLimit | None:
        return None if settings["bn_to"] is None else cls(list(layers.bns), settings["bn_to"], ctx)

    @property
    def active(self) -> bool:
        return bool(self.bns)

    @torch.no_grad()
    def _limit(self, sync: Sync | None) -> None:
        if not self.bns:
            return
        norms = torch.stack([bn_norm(m).to(torch.float64) for _, m in self.bns])
        if sync is not None:
            sync(norms)
        for (_, m), norm in zip(self.bns, norms):
            m.weight.div_(torch.clamp(norm / self.bound, min=1.0).to(m.weight.dtype))

    def apply(self) -> None:
        self._limit(self.ctx.sync)

    def verify(self) -> list[BoundReport]:
        before = [float(bn_norm(m)) for _, m in self.bns]
        self._limit(None)  # verification runs on the one rank that saves: no collectives
        return [BoundReport(name, "bn", self.bound, b, float(bn_norm(m)),
                            rescale=self.bound / b if b > self.bound else None, operator="bn")
                for (name, m), b in zip(self.bns, before)]
