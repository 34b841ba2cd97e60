"""**fastclip** (``fastclip_to`` C, every ``fastclip_every`` steps; Boroojeny et al. 2024).

The top singular values of each conv *as it runs* (its own padding mode, stride; TT: its core after QR) are
brought to C through their singular vectors, :func:`ttcompress.fastclip.fastclip`, warm-started from the vectors
kept per layer (part of the state).  With ``clip_with_bn`` the operator is the conv followed by its BatchNorm in
eval mode (the map from :func:`ttcompress.fastclip.following_batchnorms`); convs that feed no BatchNorm are
clipped alone.  It replaces clip and divide (combining them is refused).

The final verification is on the same operator: σmax by PowerQR to ``FASTCLIP_SV_TOL``, more FastClip rounds
above ``C·(1 + FASTCLIP_TOL)``, rescaling as the last resort; under ``clip_with_bn`` it comes last, after the
BatchNorm recalibration and limit, which change the composition.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ttcompress.control.base import (BEFORE_RECALIBRATION, LAST, ControlContext, ControlMethod, ScheduledBound,
                                    register)
from ttcompress.control.layers import ControlledConv, Layers
from ttcompress.control.report import BoundReport
from ttcompress.errors import SettingError, UserError
from ttcompress.fastclip import fastclip, layer_sigma
from ttcompress.tt import effective_factors, write_effective

FASTCLIP_TOL = 1e-3  # FastClip's target: σmax ≤ C·(1 + FASTCLIP_TOL) ...
FASTCLIP_SV_TOL = 1e-4  # ... with σmax from PowerQR to this relative accuracy


def operator_name(conv: ControlledConv, with_bn: bool) -> str:
    """What FastClip's σ is of: ``zero-padded`` (or ``circular-padded``, …), ``+bn`` with the BatchNorm."""
    mode = "zero" if conv.padding_mode == "zeros" else conv.padding_mode
    return f"{mode}-padded" + ("+bn" if with_bn and conv.bn is not None else "")


@register
class FastClipConvs(ControlMethod):
    name = "fastclip"
    order = 30
    settings = {"fastclip_to": None, "fastclip_every": 100, "fastclip_k": 1, "fastclip_rounds": 10,
                "clip_with_bn": False, "bound_schedule": "none"}

    def __init__(self, convs: list[ControlledConv], bound: float, every: int, k: int, rounds: int, with_bn: bool,
                 ctx: ControlContext, schedule: str | None = None) -> None:
        self.convs, self.bound, self.every, self.k, self.rounds = convs, float(bound), int(every), int(k), int(rounds)
        self.with_bn, self.ctx = with_bn, ctx
        self.verify_phase = LAST if with_bn else BEFORE_RECALIBRATION
        self.vectors: dict[str, torch.Tensor] = {}  # right singular vectors per conv, for warm starts
        self.scheduled = ScheduledBound(self.bound, schedule, ctx)

    @classmethod
    def check(cls, settings: Mapping[str, Any]) -> None:
        super().check(settings)
        if settings.get("clip_with_bn") and settings.get("fastclip_to") is None:
            raise SettingError("clip_with_bn needs fastclip_to C (it clips the composition conv → BatchNorm)",
                               "clip_with_bn", "fastclip_to")
        if settings.get("fastclip_to") is not None:
            for other, what in (("clip_to", "periodic"), ("divide_to", "divided by a power-iteration estimate")):
                if settings.get(other) is not None:
                    raise SettingError(f"fastclip_to and {other} both control the convs' singular values (as they "
                                       f"run vs {what}); give one of them", "fastclip_to", other)

    @classmethod
    def build(cls, settings: Mapping[str, Any], layers: Layers, ctx: ControlContext) -> FastClipConvs | None:
        if settings["fastclip_to"] is None:
            return None
        with_bn = bool(settings["clip_with_bn"])
        if with_bn and layers.batchnorms is None:
            raise UserError("clip_with_bn needs the conv → BatchNorm map: pass "
                            "batchnorms=following_batchnorms(model, input_shape, net)")
        return cls(layers.convs_for("fastclip_to", periodic=False), settings["fastclip_to"],
                   settings["fastclip_every"], settings["fastclip_k"], settings["fastclip_rounds"], with_bn, ctx,
                   settings.get("bound_schedule"))

    @property
    def active(self) -> bool:
        return bool(self.convs)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def _bn(self, conv: ControlledConv):
        return conv.bn if self.with_bn else None

    @torch.no_grad()
    def apply(self) -> None:
        for conv in self.convs:
            bound = self.scheduled(conv.name, lambda: float(layer_sigma(
                conv.layer, conv.input_size, bn=self._bn(conv), k=self.k, tol=FASTCLIP_SV_TOL,
                start=self.vectors.get(conv.name), seed=self.ctx.seed, dtype=self.ctx.clip_dtype).values[0]))
            result = fastclip(conv.layer, conv.input_size, bound, bn=self._bn(conv), k=self.k,
                              rounds=self.rounds, tol=FASTCLIP_TOL, sv_tol=FASTCLIP_SV_TOL,
                              start=self.vectors.get(conv.name), seed=self.ctx.seed, dtype=self.ctx.clip_dtype)
            self.vectors[conv.name] = result.right
            self.ctx.broadcast(conv.params())

    def verify(self) -> list[BoundReport]:
        return [self._verify(conv) for conv in self.convs]

    @torch.no_grad()
    def _verify(self, conv: ControlledConv) -> BoundReport:
        """σmax of the conv as it runs (with its BatchNorm under ``clip_with_bn``) by PowerQR in ``verify_dtype``;
        above ``C·(1 + FASTCLIP_TOL)``: up to ``fastclip_rounds`` FastClip rounds, then rescaling by C/σmax (the
        operator is linear in the kernel, so that lands σmax on C)."""
        bound, dtype, bn, k = self.bound, self.ctx.verify_dtype, self._bn(conv), self.k
        limit = bound * (1 + FASTCLIP_TOL)

        # the kept vectors plus one seeded random vector, so that a top direction new since the last clip is not
        # missed for want of a component in the start block
        def measure(start):
            return layer_sigma(conv.layer, conv.input_size, bn=bn, k=k, block=k + 1, tol=FASTCLIP_SV_TOL,
                               start=start, seed=self.ctx.seed, dtype=dtype)

        found = measure(self.vectors.get(conv.name))
        sigma = before = float(found.values[0])
        report = BoundReport(conv.name, conv.kind, bound, before, before, operator=operator_name(conv, self.with_bn))
        start = found.right
        if sigma > limit:
            result = fastclip(conv.layer, conv.input_size, bound, bn=bn, k=k, rounds=self.rounds, tol=FASTCLIP_TOL,
                              sv_tol=FASTCLIP_SV_TOL, start=start, seed=self.ctx.seed, dtype=dtype)
            report.reprojections = result.rounds
            found = measure(result.right)
            sigma, start = float(found.values[0]), found.right
        if sigma > limit:
            report.rescale = bound / sigma
            kernel, frames = effective_factors(conv.layer, dtype)
            write_effective(conv.layer, kernel * report.rescale, frames)
            found = measure(start)
            sigma = float(found.values[0])
        self.vectors[conv.name] = found.right
        report.sigma_after = sigma
        return report

    def state_dict(self) -> dict:
        return {"vectors": {k: v.detach().cpu().clone() for k, v in self.vectors.items()},
                "schedule_start": self.scheduled.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.vectors = {str(k): v.clone() for k, v in state.get("vectors", {}).items()}
        self.scheduled.load_state_dict(state.get("schedule_start", {}))
