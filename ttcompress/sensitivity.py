"""How much each layer's truncation alone costs the network: accuracy, loss and output change on a few images.

For every decomposable conv and every requested rank, the layer is replaced by its TT-SVD form (only that layer),
the network is run on the images, and the result is compared with the dense network's: accuracy, cross-entropy,
and the relative change of the logits ``‖f'(x) − f(x)‖² / ‖f(x)‖²`` (summed over the images).  By default the
truncation is data-aware (TT-SVD on the kernel whitened by the second moments of the layer's inputs on the same
images, :mod:`ttcompress.activations`), as ``decompose --calibrate`` truncates.  ``ttcompress
sensitivity`` shows these; ``decompose --calibrate`` uses the same measurement to weight each layer's predicted
damage in the budget allocation (:func:`calibrate`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ttcompress.budget import LayerBudget
from ttcompress.data import ImageSet
from ttcompress.errors import UserError
from ttcompress.macs import LayerSite, conv_macs, layer_sites, tt_macs
from ttcompress.metrics import accuracy, predict
from ttcompress.progress import Progress, ensure
from ttcompress.tt import conv_layers, dense_reason, relative_error, set_module, tt_from_conv, tt_params, tt_svd

__all__ = ["SensitivityRow", "SensitivityReport", "calibrate", "measure", "sensitivity"]


@dataclass
class SensitivityRow:
    layer: str
    rank: int | None  # the requested rank (None when the ranks were chosen per layer)
    ranks: tuple[int, int]
    accuracy: float
    loss: float
    output_change: float
    rel_error: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    def to_json(self) -> dict:
        out = dict(self.__dict__)
        out["ranks"] = list(self.ranks)
        return out


@dataclass
class SensitivityReport:
    n: int
    accuracy: float  # of the dense network on the same images
    loss: float
    rows: list[SensitivityRow] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layers not measured, and why
    data_aware: bool = False  # truncated where the inputs live (input moments on the same images)

    def to_json(self) -> dict:
        return {"n": self.n, "accuracy": self.accuracy, "loss": self.loss, "data_aware": self.data_aware,
                "rows": [r.to_json() for r in self.rows], "skipped": self.skipped}


def _outputs(model: nn.Module, images: ImageSet, batch_size: int, device) -> tuple[torch.Tensor, float, float]:
    logits = predict(model, images, batch_size=batch_size, device=device)
    return logits, accuracy(logits, images.labels), float(F.cross_entropy(logits, images.labels))


@torch.no_grad()
def measure(model: nn.Module, net: nn.Module, images: ImageSet, plan: Mapping[str, Sequence[tuple[int, int]]],
            sites: Mapping[str, LayerSite], *, batch_size: int = 256, device: str | torch.device = "cpu",
            requested: Mapping[tuple[str, tuple[int, int]], int] | None = None,
            input_moments: Mapping[str, torch.Tensor] | None = None,
            progress: Progress | None = None) -> SensitivityReport:
    """Run ``model`` on ``images`` with, in turn, each layer of ``plan`` alone replaced by its TT-SVD form at each of
    its ``(r1, r2)`` (data-aware where ``input_moments`` has the layer); the network is left as it was.
    ``requested`` maps ``(layer, ranks)`` to the rank the user asked for, for the report."""
    reference, acc0, loss0 = _outputs(model, images, batch_size, device)
    report = SensitivityReport(len(images), acc0, loss0, data_aware=input_moments is not None)
    norm = max(float((reference.double() ** 2).sum()), 1e-300)
    convs = dict(conv_layers(net))
    with ensure(progress).task("sensitivity", total=sum(len(v) for v in plan.values())) as advance:
        for name, pairs in plan.items():
            conv, site = convs[name], sites[name]
            size = tuple(conv.kernel_size)
            bias = conv.bias is not None
            dense_params = sum(p.numel() for p in conv.parameters())
            dense_macs = conv_macs(conv.in_channels, conv.out_channels, size, site.out_points)
            try:
                for ranks in pairs:
                    factors = tt_svd(conv.weight, ranks=ranks,
                                     input_moment=None if input_moments is None else input_moments.get(name))
                    set_module(net, name, tt_from_conv(conv, factors))
                    logits, acc, loss = _outputs(model, images, batch_size, device)
                    change = float(((logits.double() - reference.double()) ** 2).sum()) / norm
                    r = factors.ranks
                    report.rows.append(SensitivityRow(
                        name, None if requested is None else requested.get((name, tuple(ranks))), r, acc, loss,
                        change, relative_error(factors, conv.weight), dense_params,
                        tt_params(conv.in_channels, conv.out_channels, size, r, bias), dense_macs,
                        tt_macs(conv.in_channels, conv.out_channels, size, r, site.in_points, site.out_points)))
                    advance(1, layer=name, acc=acc)
            finally:
                set_module(net, name, conv)
    return report


def sensitivity(model: nn.Module, net: nn.Module, input_size: Sequence[int], images: ImageSet,
                ranks: Iterable[int] = (4, 8, 16, 32), *, skip: Iterable[str] = (), batch_size: int = 256,
                device: str | torch.device = "cpu", data_aware: bool = True,
                progress: Progress | None = None) -> SensitivityReport:
    """Per decomposable conv and per rank R of ``ranks`` (r1 = min(R, Cin), r2 = min(R, Cout)): the network's
    accuracy, loss and output change on ``images`` with only that layer decomposed (``data_aware``: truncated where
    its inputs on ``images`` live), its relative error, parameters and MACs.  ``model`` takes the images
    (normalisation included), ``net`` holds the layers."""
    wanted = sorted({int(r) for r in ranks})
    if not wanted or wanted[0] <= 0:
        raise UserError(f"--ranks must be positive integers, got {list(ranks)}")
    sites = layer_sites(model, input_size, net)
    patterns = list(skip)
    plan: dict[str, list[tuple[int, int]]] = {}
    requested: dict[tuple[str, tuple[int, int]], int] = {}
    skipped: dict[str, str] = {}
    for name, conv in conv_layers(net):
        reason = dense_reason(name, conv, patterns) or (None if name in sites else "not reached by the forward pass")
        if reason:
            skipped[name] = reason
            continue
        for r in wanted:
            pair = (min(r, conv.in_channels), min(r, conv.out_channels))
            if pair not in plan.setdefault(name, []):
                plan[name].append(pair)
                requested[(name, pair)] = r
    moments = None
    if data_aware and plan:
        from ttcompress.activations import input_moments

        moments = input_moments(model, net, images, plan, batch_size=batch_size, device=device)
    report = measure(model, net, images, plan, sites, batch_size=batch_size, device=device, requested=requested,
                     input_moments=moments, progress=progress)
    report.skipped = skipped
    return report


def calibrate(model: nn.Module, net: nn.Module, layers: Sequence[LayerBudget], images: ImageSet,
              at: Mapping[str, tuple[int, int]], *, batch_size: int = 256, device: str | torch.device = "cpu",
              input_moments: Mapping[str, torch.Tensor] | None = None,
              progress: Progress | None = None) -> SensitivityReport:
    """Set each layer's ``weight`` (c_l of :mod:`ttcompress.budget`) from one measurement at its ranks in ``at``
    (the data-free allocation for the same target; half its channels where that keeps it dense): with the gain
    ``g_l = output change / predicted damage``, ``c_l = ½ + ½·g_l / mean(g)`` — the measured gains, normalised,
    shrunk half-way to the data-free prior (every layer alike). The gains spread over more than an order of
    magnitude on ResNet-20, and one layer truncated alone overstates how far the others can be pushed when all
    are truncated together: the raw gain lost accuracy against no calibration there, the shrunk one gained at
    every ratio tried. Returns the measurement."""
    plan = {l.name: [tuple(at[l.name]) if l.name in at else (max(1, min(l.cin, l.cout) // 2),) * 2]
            for l in layers}
    report = measure(model, net, images, plan, {l.name: l.site for l in layers}, batch_size=batch_size,
                     device=device, input_moments=input_moments, progress=progress)
    change = {r.layer: (r.ranks, r.output_change) for r in report.rows}
    gains = {}
    for layer in layers:
        ranks, measured = change[layer.name]
        predicted = float(layer.estimate(*ranks))
        gains[layer.name] = measured / predicted if predicted > 0 else 0.0
    mean = sum(gains.values()) / len(gains) if gains else 0.0
    for layer in layers:
        layer.weight = 0.5 + 0.5 * gains[layer.name] / mean if mean > 0 else 1.0
    return report
