"""Forward latency, measured: the median of repeated runs, side by side (interleaved), on a chosen device.

Candidates are timed in alternation — one run of each, then the next round — so a load change on a shared
machine hits every candidate alike; each figure is the median over the rounds after ``warmup`` untimed ones.
Modules are copied to the device (the caller's stay where they are), inputs are random, gradients are off, and
CUDA work is synchronised before each clock read.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["compare_ms", "modules_ms"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_ms(fns: Sequence[Callable[[], object]], device: str | torch.device = "cpu", repeats: int = 7,
               warmup: int = 2) -> list[float]:
    """Median wall time in milliseconds of each of ``fns``, run in alternation ``warmup + repeats`` times."""
    if repeats <= 0:
        raise ValueError(f"repeats must be positive, got {repeats}")
    device = torch.device(device)
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + repeats):
        for fn, record in zip(fns, times):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                record.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


@torch.inference_mode()
def modules_ms(modules: Sequence[nn.Module], input_shape: Sequence[int], device: str | torch.device = "cpu",
               repeats: int = 7, warmup: int = 2) -> list[float]:
    """Median forward time (ms) of each module on one random input of ``input_shape`` (batch dim included), in
    eval mode, compared side by side (:func:`compare_ms`).  The modules are copied to ``device``."""
    device = torch.device(device)
    copies = [copy.deepcopy(m).to(device).eval() for m in modules]
    param = next(modules[0].parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.randn(*input_shape, device=device, dtype=dtype)
    return compare_ms([lambda m=m: m(x) for m in copies], device, repeats, warmup)
