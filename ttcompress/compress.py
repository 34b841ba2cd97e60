"""``ttcompress decompose`` as a library call: one rank, an energy, or a whole-model target; MACs; measured latency.

:func:`compress` decomposes ``net`` in place (:func:`ttcompress.tt.decompose`) with ranks from ``--rank`` /
``--energy`` or from the budget allocation (:mod:`ttcompress.budget`, optionally calibrated on images with
:mod:`ttcompress.sensitivity`), counts MACs before and after (:mod:`ttcompress.macs`) and, when asked, times each
decomposed layer against its dense form and the whole model before and after (:mod:`ttcompress.latency`);
``keep_faster`` keeps a layer dense where its TT form is not faster on that device at that batch size.
With calibration images, every layer is also truncated where its inputs live (data-aware TT-SVD on the second
moments of its input channels, :mod:`ttcompress.activations`), whatever chose its ranks, and the BatchNorm running
statistics are moved by the change the decomposition made to their inputs on those images
(:mod:`ttcompress.batchnorm`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ttcompress.budget import Allocation, allocate, budget_layers
from ttcompress.data import ImageSet
from ttcompress.errors import UserError
from ttcompress.latency import modules_ms
from ttcompress.macs import LayerSite, layer_sites, module_macs
from ttcompress.progress import Progress
from ttcompress.report import CompressionReport
from ttcompress.tt import DecomposeReport, TTConv, conv_layers, decompose, set_module, tt_like

__all__ = ["CompressSettings", "compress"]


@dataclass
class CompressSettings:
    """Exactly one of ``rank``, ``energy``, ``target_ratio`` (whole-model parameters) and ``target_macs``."""

    rank: int | None = None
    energy: float | None = None
    target_ratio: float | None = None
    target_macs: float | None = None
    max_rank: int | None = None
    skip: Sequence[str] = ()
    calibrate: ImageSet | None = None
    data_aware: bool = True  # with calibrate: truncate each layer where its inputs live (not only weight a target)
    bn_correct: bool = True  # with calibrate: move the BatchNorm statistics by what the decomposition changed
    latency: bool = False
    keep_faster: bool = False
    device: str | torch.device = "cpu"
    batch_size: int = 1
    repeats: int = 7
    tolerance: float = 0.02

    @property
    def target(self) -> tuple[str, float] | None:
        if self.target_ratio is not None:
            return "params", self.target_ratio
        if self.target_macs is not None:
            return "macs", self.target_macs
        return None

    def validate(self, calibrating: bool | None = None) -> None:
        """One-line :class:`UserError` for contradictory settings (``calibrating``: whether images will be given,
        to check before loading them)."""
        calibrating = self.calibrate is not None if calibrating is None else calibrating
        if sum(v is not None for v in (self.rank, self.energy, self.target_ratio, self.target_macs)) != 1:
            raise UserError("give exactly one of --rank R, --energy E, --target-ratio X or --target-macs X")
        if self.target is None and self.max_rank is not None:
            raise UserError("--max-rank caps the ranks a target chooses: use it with --target-ratio or --target-macs")
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        if self.repeats <= 0:
            raise UserError(f"--repeats must be positive, got {self.repeats}")


def _slow(dense_ms: float, tt_ms: float, device: torch.device, batch_size: int) -> str | None:
    if tt_ms < dense_ms:
        return None
    return (f"TT form not faster on {device.type} at batch {batch_size} ({tt_ms:.3g} ms vs {dense_ms:.3g} ms dense; "
            "--keep-faster)")


def _allocate(net: nn.Module, model: nn.Module, sites: dict[str, LayerSite], s: CompressSettings, cost_before: int,
              time_pair, moments: dict[str, torch.Tensor] | None,
              progress: Progress | None) -> tuple[Allocation, dict[str, str]]:
    """The budget allocation; with ``keep_faster``, re-allocated without the layers whose TT form is slower until
    every chosen one is faster.  Returns it and the layers kept dense for speed."""
    metric, value = s.target  # type: ignore[misc]
    layers, _ = budget_layers(net, sites, s.skip, moments)
    if s.calibrate is not None:
        from ttcompress.sensitivity import calibrate

        data_free = allocate(layers, metric, value, cost_before, max_rank=s.max_rank, tolerance=s.tolerance)
        calibrate(model, net, layers, s.calibrate, data_free.ranks, device=next(model.parameters()).device,
                  input_moments=moments, progress=progress)
    slow: dict[str, str] = {}
    while True:
        try:
            alloc = allocate([l for l in layers if l.name not in slow], metric, value, cost_before,
                             max_rank=s.max_rank, tolerance=s.tolerance)
        except UserError as exc:
            if not slow:
                raise
            raise UserError(f"{exc} (with --keep-faster: {len(slow)} layer(s) whose TT form is not faster stay "
                            "dense)") from None
        if not s.keep_faster:
            return alloc, slow
        newly = {name: why for name, r in alloc.ranks.items() if (why := time_pair(name, r)) is not None}
        if not newly:
            return alloc, slow
        slow.update(newly)


def compress(model: nn.Module, net: nn.Module, input_size: Sequence[int], settings: CompressSettings,
             progress: Progress | None = None) -> CompressionReport:
    """Decompose ``net`` (inside ``model``, which takes inputs of ``input_size`` without the batch dim) in place as
    ``settings`` say; the report has parameters, MACs, the target and, with ``latency``, measured times."""
    s = settings
    s.validate()
    device = torch.device(s.device)
    sites = layer_sites(model, input_size, net)
    macs_before = {n: module_macs(net.get_submodule(n), site) for n, site in sites.items()}
    originals = dict(conv_layers(net))
    dense_model = copy.deepcopy(model) if s.latency or s.keep_faster else None
    timings: dict[str, tuple[float | None, float | None]] = {}
    tried: dict[tuple[str, tuple[int, int]], tuple[float, float]] = {}

    def time_layer(name: str, tt: nn.Module) -> tuple[float, float]:
        dense_ms, tt_ms = modules_ms([originals[name], tt], (s.batch_size, *sites[name].in_shape), device, s.repeats)
        timings[name] = (dense_ms, tt_ms)
        return dense_ms, tt_ms

    def time_pair(name: str, ranks: tuple[int, int]) -> str | None:
        key = (name, tuple(ranks))
        if key not in tried:
            tried[key] = time_layer(name, tt_like(originals[name], ranks))
        timings[name] = tried[key]
        return _slow(*tried[key], device, s.batch_size)

    moments = None
    if s.calibrate is not None and s.data_aware:
        from ttcompress.activations import input_moments

        moments = input_moments(model, net, s.calibrate, sites, device=next(model.parameters()).device)
    reference = None
    if s.calibrate is not None and s.bn_correct:  # the BatchNorms' inputs in the original network
        from ttcompress.batchnorm import batchnorm_inputs

        reference = batchnorm_inputs(model, s.calibrate, device=next(model.parameters()).device)
    target = None
    if s.target is not None:
        metric, value = s.target
        cost_before = (sum(p.numel() for p in net.parameters()) if metric == "params" else sum(macs_before.values()))
        alloc, slow = _allocate(net, model, sites, s, cost_before, time_pair, moments, progress)
        report = decompose(net, ranks=alloc.ranks, skip=s.skip, input_moments=moments)
        for name in [n for n in timings if n not in alloc.ranks and n not in slow]:
            del timings[name]  # timed in an earlier round of --keep-faster, dense in the final allocation
        reasons = {**alloc.dense, **slow}
        for entry in report.layers:
            if entry.name in reasons and entry.reason == "not chosen by the allocation":
                entry.reason = reasons[entry.name]
        target = {"metric": metric, "ratio": value, "max_rank": s.max_rank, "tolerance": s.tolerance,
                  "calibrate": None if s.calibrate is None else s.calibrate.source or "images",
                  "keep_faster": s.keep_faster}
    else:
        report = decompose(net, rank=s.rank, energy=s.energy, skip=s.skip, input_moments=moments)
        if s.keep_faster:
            _keep_faster(net, report, {n: c for n, c in originals.items() if n in sites}, time_layer, device,
                         s.batch_size)
    if s.latency or s.keep_faster:
        for name, module in conv_layers(net):
            if isinstance(module, TTConv) and name not in timings and name in sites and name in originals \
                    and not isinstance(originals[name], TTConv):
                time_layer(name, module)
    corrected = None
    if reference is not None:
        from ttcompress.batchnorm import correct_batchnorm

        corrected = correct_batchnorm(model, reference, s.calibrate, device=next(model.parameters()).device)
    report.params_after = sum(p.numel() for p in net.parameters())
    macs_after = {n: module_macs(net.get_submodule(n), site) for n, site in sites.items()}
    result = CompressionReport(report, macs_before, macs_after, target)
    if s.calibrate is not None:
        result.calibrate = {"source": s.calibrate.source or "images", "n": len(s.calibrate),
                            "data_aware": s.data_aware,
                            "batchnorm": None if corrected is None else len(corrected)}
    if s.latency or s.keep_faster:
        result.layer_latency = timings
        result.latency_before_ms, result.latency_after_ms = modules_ms(
            [dense_model, model], (s.batch_size, *input_size), device, s.repeats)
    return result


def _keep_faster(net: nn.Module, report: DecomposeReport, originals: dict[str, nn.Module], time_layer,
                 device: torch.device, batch_size: int) -> None:
    """Put the dense conv back wherever the TT layer :func:`decompose` made is not faster (``originals``: the dense
    convs that can be timed, by name)."""
    for entry in report.layers:
        conv = originals.get(entry.name)
        if entry.reason is not None or entry.ranks is None or conv is None or isinstance(conv, TTConv):
            continue
        why = _slow(*time_layer(entry.name, net.get_submodule(entry.name)), device, batch_size)
        if why is not None:
            set_module(net, entry.name, conv)
            entry.ranks, entry.rel_error, entry.params_after, entry.reason = None, 0.0, entry.params_before, why
