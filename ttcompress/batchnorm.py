"""BatchNorm statistics after a decomposition: the original's, moved by what the decomposition changed.

A truncated conv shifts the mean and scales the variance of every channel downstream, and the BatchNorm layers,
in eval mode, keep normalising with the statistics of the dense network.  Re-estimating those statistics from a few
hundred calibration images repairs much of the damage but also throws away the original's statistics (gathered on
the whole training set): on a model that was not changed at all it costs accuracy.

:func:`correct_batchnorm` keeps the original statistics and applies only the change: for each BatchNorm, in the
order of the forward pass, the mean ``m`` and variance ``v`` of its input channels are measured on the same images
in the dense model (``m₀, v₀``: :func:`batchnorm_inputs`, one pass before decomposing) and in the decomposed one
(``m₁, v₁``, its earlier BatchNorms already corrected),
and the running statistics ``μ, σ² (+ eps)`` become

    σ'² + eps = (σ² + eps) · v₁ / v₀,      μ' = m₁ − (m₀ − μ) · √(v₁ / v₀)

— the unique choice that gives the BatchNorm's output on those images the same per-channel mean and variance as in
the dense network.  A layer whose inputs did not change keeps its statistics exactly, and the noise of a small
sample mostly cancels between the two measurements.  Each measurement in the decomposed network stops the forward
pass at the BatchNorm it measures.  (Shared ResNet-20, 512 test images, decomposition alone: at ×2.6 fewer
parameters, one rank 24, 23.0 % → 68.4 %; re-estimating the statistics from the same 256 images instead gives
60.4 %.)  A finetune that follows
trains its BatchNorms on batch statistics and replaces the running ones, so it ends where it would have anyway: the
correction is for the decomposed model as it is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ttcompress.data import ImageSet
from ttcompress.metrics import eval_mode

__all__ = ["BatchNormCorrection", "batchnorm_inputs", "batchnorm_layers", "channel_stats", "correct_batchnorm"]


@dataclass
class BatchNormCorrection:
    """What :func:`correct_batchnorm` changed in one BatchNorm: the largest mean shift in units of the original
    running standard deviation, and the range of the variance ratios."""

    name: str
    mean_shift: float
    var_ratio_min: float
    var_ratio_max: float


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BatchNorm layers of ``model`` that keep running statistics, in module order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the measured layer has seen its input."""


@torch.no_grad()
def channel_stats(model: nn.Module, names: list[str], images: ImageSet, *, batch_size: int = 128,
                  device: str | torch.device = "cpu",
                  stop: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (mean, variance)}`` (float64, CPU; the population variance) of the input channels (dim 1) of each
    named module of ``model`` run in eval mode on ``images``.  With ``stop`` (one name only), each forward pass ends
    at that module."""
    if stop and len(names) != 1:
        raise ValueError("stop needs exactly one module name")
    sums: dict[str, list] = {}

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0].detach().double()
            flat = x.transpose(0, 1).reshape(x.shape[1], -1)
            s, s2, n = sums.get(name, (0.0, 0.0, 0))
            sums[name] = [s + flat.sum(1), s2 + (flat * flat).sum(1), n + flat.shape[1]]
            if stop:
                raise _Stop
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with eval_mode(model):
            for x, _ in images.batches(batch_size, device):
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for name, (s, s2, n) in sums.items():
        mean = (s / n).cpu()
        stats[name] = (mean, ((s2 / n).cpu() - mean * mean).clamp_min(0.0))
    return stats


def batchnorm_inputs(model: nn.Module, images: ImageSet, *, batch_size: int = 128,
                     device: str | torch.device = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The reference for :func:`correct_batchnorm`: :func:`channel_stats` of every BatchNorm's input in ``model``
    (the network before it is decomposed) on ``images``, in one pass."""
    return channel_stats(model, [name for name, _ in batchnorm_layers(model)], images, batch_size=batch_size,
                         device=device)


@torch.no_grad()
def correct_batchnorm(model: nn.Module, reference: dict[str, tuple[torch.Tensor, torch.Tensor]], images: ImageSet,
                      *, batch_size: int = 128, device: str | torch.device = "cpu") -> list[BatchNormCorrection]:
    """Correct the running statistics of every BatchNorm of ``model`` (the decomposed network, in place) for the
    change of its input statistics from ``reference`` (:func:`batchnorm_inputs` of the original network on the same
    ``images``), so that each BatchNorm's output there keeps the original's per-channel mean and variance.
    BatchNorms absent from ``reference`` (not in the original, or not reached) are left alone.  Returns one entry
    per corrected layer."""
    layers = [(name, bn) for name, bn in batchnorm_layers(model) if name in reference]
    done = []
    for name, bn in layers:
        now = channel_stats(model, [name], images, batch_size=batch_size, device=device, stop=True)[name]
        (m0, v0), (m1, v1) = reference[name], now
        tiny = torch.finfo(torch.float32).tiny
        ratio = torch.where(v0 > tiny, v1 / v0.clamp_min(tiny), torch.ones_like(v0))
        mu, var = bn.running_mean.double().cpu(), bn.running_var.double().cpu()
        new_mu = m1 - (m0 - mu) * ratio.sqrt()
        new_var = ((var + bn.eps) * ratio - bn.eps).clamp_min(0.0)
        shift = (new_mu - mu).abs() / (var + bn.eps).sqrt()
        bn.running_mean.copy_(new_mu.to(bn.running_mean))
        bn.running_var.copy_(new_var.to(bn.running_var))
        done.append(BatchNormCorrection(name, float(shift.max()), float(ratio.min()), float(ratio.max())))
    return done
