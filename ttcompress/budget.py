"""Per-layer TT ranks (r1, r2) for a whole-model target — a parameter ratio or a MAC ratio — spent where it hurts least.

The rule.  Each decomposable conv ``l`` either stays dense or becomes a TT layer with ranks ``(r1, r2)`` whose
parameters *and* MACs are both below the dense layer's.  Its damage is predicted from the kernel alone:

    d_l(r1, r2) = −c_l · (log(1 − a_l(r1)) + log(1 − b_l(r2))),   a_l(r1) = Σ_{i>r1} s_in,i² / ‖W_l‖²

with ``a`` and ``b`` the fractions of the kernel's energy its input-mode and output-mode unfoldings discard (their
sum bounds the relative squared TT error, which TT-SVD and its refinement sweeps only lower); ``(1 − a)(1 − b)`` is
the energy the TT form keeps if the two truncations act independently, so the total damage is ``−log`` of the
product of the kept fractions over the network. Relative errors make layers comparable (every conv here feeds a
BatchNorm or a residual sum that does not care about the conv's own scale), and the logarithm makes near-total
truncation of any one layer prohibitively expensive: on the shared ResNet-20 at ×2.6 fewer parameters (decomposition
alone) it kept 47 % test accuracy, where the plain sum of the relative squared errors kept 18 % and one rank for all
layers 23 %. ``c_l`` is 1 without data; with calibration it is the measured gain from that layer's predicted damage
to the network's output, normalised and shrunk half-way to 1 (:func:`ttcompress.sensitivity.calibrate`), so a layer
whose truncation barely moves the logits is cheaper to damage. The allocation minimises ``Σ_l d_l`` subject to the
whole-model cost (all parameters, or all conv + linear MACs) being ``before / target``: a Lagrangian sweep — every
layer independently picks the option minimising ``d_l + λ·cost_l``, λ bisected until the total crosses the target —
then single rank steps (one r1 or r2 up or down where that costs the least damage per parameter/MAC) close the gap
left by the option that switched at the crossing. The result lands within ``tolerance`` of the target or the call
says, in one line, why it cannot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ttcompress.errors import UserError
from ttcompress.macs import LayerSite, conv_macs, tt_macs
from ttcompress.tt import conv_layers, dense_reason, tt_params, unfolding_energies

__all__ = ["Allocation", "LayerBudget", "allocate", "budget_layers"]

METRICS = ("params", "macs")


def _tails(s2) -> np.ndarray:
    """``tail[r] = Σ_{i≥r} s2_i / Σ s2`` for r = 0..len(s2) (descending ``s2``)."""
    s = np.asarray(s2, dtype=np.float64)
    total = s.sum()
    tail = np.concatenate([np.cumsum(s[::-1])[::-1], [0.0]])
    return tail / total if total > 0 else np.zeros_like(tail)


@dataclass
class LayerBudget:
    """What the allocation knows of one decomposable conv: its geometry, where it runs, and its error curves."""

    name: str
    cin: int
    cout: int
    kernel_size: tuple[int, ...]
    bias: bool
    site: LayerSite
    tail_in: np.ndarray  # relative squared energy discarded by keeping r1 input-mode vectors, r1 = 0..Cin
    tail_out: np.ndarray  # the same for r2 output-mode vectors, r2 = 0..Cout
    weight: float = 1.0  # c_l: 1 without data, the measured output gain with calibration

    @property
    def dense_params(self) -> int:
        return self.cout * self.cin * math.prod(self.kernel_size) + (self.cout if self.bias else 0)

    @property
    def dense_macs(self) -> int:
        return conv_macs(self.cin, self.cout, self.kernel_size, self.site.out_points)

    def params(self, r1, r2):
        return tt_params(self.cin, self.cout, self.kernel_size, (r1, r2), self.bias)

    def macs(self, r1, r2):
        return tt_macs(self.cin, self.cout, self.kernel_size, (r1, r2), self.site.in_points, self.site.out_points)

    def estimate(self, r1, r2):
        """Predicted damage of the TT form without the weight ``c_l``: ``−log`` of the fraction of the kernel's energy
        each unfolding keeps, summed over both (0 for an exact form, growing without bound towards nothing kept)."""
        return -np.log(np.maximum(1 - self.tail_in[r1], 1e-12)) - np.log(np.maximum(1 - self.tail_out[r2], 1e-12))

    def damage(self, r1, r2):
        return self.weight * self.estimate(r1, r2)

    def cost(self, metric: str, r1, r2):
        return self.params(r1, r2) if metric == "params" else self.macs(r1, r2)

    def dense_cost(self, metric: str) -> int:
        return self.dense_params if metric == "params" else self.dense_macs

    def shrinks(self, r1, r2):
        """Whether the TT form has fewer parameters and fewer MACs than the dense layer."""
        return (self.params(r1, r2) < self.dense_params) & (self.macs(r1, r2) < self.dense_macs)


def budget_layers(net: nn.Module, sites: Mapping[str, LayerSite], skip: Iterable[str] = (),
                  input_moments: Mapping[str, torch.Tensor] | None = None) -> tuple[list[LayerBudget], dict[str, str]]:
    """The :class:`LayerBudget` of every conv that can be decomposed, and why each other conv cannot (with
    ``input_moments``, the error curves of the whitened kernels that data-aware TT-SVD truncates)."""
    patterns = list(skip)
    layers: list[LayerBudget] = []
    reasons: dict[str, str] = {}
    for name, conv in conv_layers(net):
        reason = dense_reason(name, conv, patterns)
        if reason is None and name not in sites:
            reason = "not reached by the forward pass"
        if reason is not None:
            reasons[name] = reason
            continue
        s_in, s_out = unfolding_energies(conv.weight, None if input_moments is None else input_moments.get(name))
        layers.append(LayerBudget(name, conv.in_channels, conv.out_channels, tuple(conv.kernel_size),
                                  conv.bias is not None, sites[name], _tails(s_in.cpu()), _tails(s_out.cpu())))
    return layers, reasons


@dataclass
class Allocation:
    """Ranks for the layers to decompose; the whole-model cost they give (exact: TT-SVD keeps these ranks)."""

    metric: str
    target: float
    ranks: dict[str, tuple[int, int]]
    cost_before: int
    cost_after: int
    damage: float
    dense: dict[str, str] = field(default_factory=dict)  # decomposable layers left dense, and why

    @property
    def ratio(self) -> float:
        return self.cost_before / max(self.cost_after, 1)


class _Candidates:
    """Every (r1, r2) of one layer that shrinks it, as flat arrays."""

    def __init__(self, layer: LayerBudget, metric: str, max_rank: int | None) -> None:
        cap = max_rank if max_rank is not None else max(layer.cin, layer.cout)
        r1, r2 = np.meshgrid(np.arange(1, min(cap, layer.cin) + 1), np.arange(1, min(cap, layer.cout) + 1),
                             indexing="ij")
        r1, r2 = r1.ravel(), r2.ravel()
        keep = layer.shrinks(r1, r2)
        self.r1, self.r2 = r1[keep], r2[keep]
        self.damage = layer.damage(self.r1, self.r2)
        self.cost = layer.cost(metric, self.r1, self.r2).astype(np.float64)
        self.dense_cost = float(layer.dense_cost(metric))

    def choose(self, lam: float) -> tuple[int, int] | None:
        if self.r1.size == 0:
            return None
        value = self.damage + lam * self.cost
        i = int(np.argmin(value))
        return (int(self.r1[i]), int(self.r2[i])) if value[i] < lam * self.dense_cost else None


def allocate(layers: Sequence[LayerBudget], metric: str, target: float, cost_before: int, *,
             max_rank: int | None = None, tolerance: float = 0.02) -> Allocation:
    """Ranks that bring the whole model's ``metric`` ("params" or "macs"; ``cost_before`` is the model's total) to
    ``cost_before / target`` within ``tolerance`` (relative, on the ratio) at the least predicted damage.  ``max_rank``
    caps r1 and r2.  A target that cannot be reached is a :class:`UserError` saying why."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    flag = "--target-ratio" if metric == "params" else "--target-macs"
    unit = "parameters" if metric == "params" else "MACs"
    if not target > 1:
        raise UserError(f"{flag} must be greater than 1, got {target:g}")
    if max_rank is not None and max_rank <= 0:
        raise UserError(f"--max-rank must be a positive integer, got {max_rank}")
    if not layers:
        raise UserError(f"{flag}: no conv can be decomposed (grouped, skipped or already TT)")
    by_name = {l.name: l for l in layers}
    cands = {l.name: _Candidates(l, metric, max_rank) for l in layers}
    fixed = cost_before - sum(l.dense_cost(metric) for l in layers)
    goal = cost_before / target
    low, high = cost_before / (target * (1 + tolerance)), cost_before / (target * (1 - tolerance))

    def total(state: Mapping[str, tuple[int, int] | None]) -> int:
        return fixed + sum(int(by_name[n].cost(metric, *r)) if r else by_name[n].dense_cost(metric)
                           for n, r in state.items())

    def damage(state: Mapping[str, tuple[int, int] | None]) -> float:
        return float(sum(by_name[n].damage(*r) for n, r in state.items() if r))

    cheapest = fixed + sum(min(c.dense_cost, float(c.cost.min())) if c.cost.size else c.dense_cost
                           for c in cands.values())
    if cheapest > high:
        raise UserError(
            f"{flag} {target:g} cannot be reached: with every decomposable layer at its cheapest TT form "
            f"(ranks 1, 1) the model keeps {int(cheapest):,} {unit} (×{cost_before / cheapest:.2f}), "
            f"{int(fixed):,} of them outside the convs it can decompose")

    def solve(lam: float) -> dict[str, tuple[int, int] | None]:
        return {n: c.choose(lam) for n, c in cands.items()}

    lo, hi = 1e-30, 1e6 * max(max(l.weight for l in layers), 1e-30)
    sol_lo, sol_hi = solve(lo), solve(hi)
    if total(sol_hi) > goal:  # the cheapest Lagrangian choice: polishing below reaches the rest
        sol_lo = sol_hi
    else:
        for _ in range(120):
            mid = math.sqrt(lo * hi)
            sol = solve(mid)
            if total(sol) > goal:
                lo, sol_lo = mid, sol
            else:
                hi, sol_hi = mid, sol
            if hi / lo < 1 + 1e-9:
                break
    options = [sol_lo, sol_hi, _step_down(sol_lo, by_name, metric, goal, total),
               _step_up(sol_hi, by_name, metric, goal, high, total, max_rank)]
    fitting = [s for s in options if low <= total(s) <= high]
    if not fitting:
        closest = min(options, key=lambda s: abs(math.log(total(s) / goal)))
        raise UserError(f"{flag} {target:g} cannot be reached within ±{100 * tolerance:g} %: the closest allocation "
                        f"gives ×{cost_before / total(closest):.3f}")
    best = min(fitting, key=damage)
    dense = {n: ("TT would not shrink it at any allowed rank" if cands[n].r1.size == 0
                 else "kept dense at this target") for n, r in best.items() if r is None}
    return Allocation(metric, target, {n: r for n, r in best.items() if r}, cost_before, total(best), damage(best),
                      dense)


def _step_down(state, layers, metric, goal, total):
    """Lower single ranks (least damage per unit of cost saved first) until the total is at most ``goal``."""
    state = dict(state)
    cost = total(state)
    while cost > goal:
        best, best_score = None, math.inf
        for name, r in state.items():
            if not r:
                continue
            layer = layers[name]
            now = layer.cost(metric, *r)
            for nxt in ((r[0] - 1, r[1]), (r[0], r[1] - 1)):
                if min(nxt) < 1:
                    continue
                saved = now - layer.cost(metric, *nxt)
                if saved <= 0:
                    continue
                score = (layer.damage(*nxt) - layer.damage(*r)) / saved
                if score < best_score:
                    best, best_score = (name, nxt, saved), score
        if best is None:
            break
        state[best[0]] = best[1]
        cost -= best[2]
    return state


def _step_up(state, layers, metric, goal, high, total, max_rank):
    """Raise single ranks (most damage removed per unit of cost first) while the total is below ``goal``, never
    above ``high`` and never to a TT form that would not shrink its layer."""
    state = dict(state)
    cost = total(state)
    while cost < goal:
        best, best_score = None, -math.inf
        for name, r in state.items():
            if not r:
                continue
            layer = layers[name]
            now = layer.cost(metric, *r)
            for nxt in ((r[0] + 1, r[1]), (r[0], r[1] + 1)):
                if nxt[0] > layer.cin or nxt[1] > layer.cout or (max_rank is not None and max(nxt) > max_rank):
                    continue
                if not layer.shrinks(*nxt):
                    continue
                extra = layer.cost(metric, *nxt) - now
                if extra <= 0 or cost + extra > high:
                    continue
                score = (layer.damage(*r) - layer.damage(*nxt)) / extra
                if score > best_score:
                    best, best_score = (name, nxt, extra), score
        if best is None:
            break
        state[best[0]] = best[1]
        cost += best[2]
    return state
