"""The orthogonal loss on TT frames (paper eq. 11), and whether a network has frames at all."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["has_frames", "orthogonal_loss"]


def _framed(module: nn.Module) -> bool:
    return callable(getattr(module, "orthogonal_terms", None))


def has_frames(net: nn.Module) -> bool:
    """Whether any layer of ``net`` takes part in the orthogonal loss (TT layers, SOC-TT layers)."""
    return any(_framed(m) for m in net.modules())


def orthogonal_loss(net: nn.Module) -> torch.Tensor:
    """Mean squared non-orthonormality of the TT frames (paper eq. 11, without the factor k).

    For every TT layer: ``‖F Fᵀ − I‖²_F`` for the first frame F (r1×Cin, orthonormal rows) and ``‖LᵀL − I‖²_F``
    for the last frame L (Cout×r2, orthonormal columns); summed over layers and divided by the total number of
    Gram entries (``Σ r1² + r2²``).  Every layer with frames takes part through its ``orthogonal_terms()`` method
    returning ``(sum of squared deviations, entry count)`` (TT layers of any dimension, SOC-TT layers).
    Differentiable; 0 for a network without such layers.
    """
    total: torch.Tensor | None = None
    entries = 0
    for module in net.modules():
        if _framed(module):
            dev, count = module.orthogonal_terms()
            if count:
                total = dev if total is None else total + dev
                entries += int(count)
    if total is None or entries == 0:
        param = next(net.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total / entries
