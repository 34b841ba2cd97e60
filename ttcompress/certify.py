"""Provable L2 robustness from logit margins (Li et al. 2019; Singla & Feizi 2021b; Senderovich et al. 2022, p.r.).

If the network ``f`` is ``L``-Lipschitz in L2, every difference of two logits ``f_y − f_j = (e_y − e_j)ᵀf`` is
``√2·L``-Lipschitz.  So when the prediction ``y`` beats the runner-up by the margin ``M``, no perturbation with
``‖δ‖₂ < M / (√2·L)`` can change it.  An image is *certified* at radius ``ε`` when it is classified correctly and
``M > √2·L·ε`` — the criterion of the SOC / LipConvNet code (``certificate = M / (√2·L) > ε``, ε = 36/255 on
[0, 1] images).  Ties at the top give ``M = 0``: never certified.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ttcompress.errors import UserError

__all__ = ["certified_accuracy", "certified_radius", "logit_margins", "network_lipschitz_bound"]

DEFAULT_RADIUS = 36 / 255


def _check_logits(logits: torch.Tensor) -> None:
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"expected logits of shape (N, classes ≥ 2), got {tuple(logits.shape)}")


def logit_margins(logits: torch.Tensor) -> torch.Tensor:
    """Top logit minus the runner-up, per row (≥ 0)."""
    _check_logits(logits)
    top2 = logits.detach().topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def certified_radius(logits: torch.Tensor, lipschitz: float = 1.0) -> torch.Tensor:
    """``M / (√2·L)``: the L2 radius within which each prediction provably cannot change."""
    if not lipschitz > 0:
        raise ValueError(f"the Lipschitz constant must be positive, got {lipschitz}")
    return logit_margins(logits) / (math.sqrt(2) * lipschitz)


def certified_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, lipschitz: float = 1.0, radius: float = DEFAULT_RADIUS
) -> float:
    """Fraction of rows that are correctly classified (``argmax == label``) with margin ``> √2·lipschitz·radius``."""
    _check_logits(logits)
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"expected {logits.shape[0]} labels, got shape {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no logits given")
    if radius < 0:
        raise ValueError(f"radius must be non-negative, got {radius}")
    if not lipschitz > 0:
        raise ValueError(f"the Lipschitz constant must be positive, got {lipschitz}")
    logits = logits.detach()
    correct = logits.argmax(1) == labels.to(logits.device)
    certified = correct & (logit_margins(logits) > math.sqrt(2) * lipschitz * radius)
    return float(certified.double().mean())


@torch.no_grad()
def network_lipschitz_bound(net: nn.Module) -> float:
    """Certified L2 Lipschitz constant of a provably Lipschitz network.

    Supports :class:`~ttcompress.archs.lipconvnet.LipConvNet` (the product of its layers' certified bounds: 1 up to
    the truncated exponential series of SOC, times the frame norms of SOC-TT layers), a
    :class:`~ttcompress.archs.Normalized` wrapper around one (its ``(x − mean)/std`` adds a factor ``1/min std``),
    and ``nn.Linear`` (its spectral norm).  Anything else: :class:`~ttcompress.errors.UserError`.
    """
    from ttcompress.archs import Normalized
    from ttcompress.archs.lipconvnet import LipConvNet

    if isinstance(net, Normalized):
        scale = 1.0 if net.std is None else 1.0 / float(net.std.min())
        return scale * network_lipschitz_bound(net.net)
    if isinstance(net, LipConvNet):
        return net.lipschitz_bound()
    if isinstance(net, nn.Linear):
        return float(torch.linalg.matrix_norm(net.weight.detach().double(), ord=2))
    raise UserError(
        f"no certified Lipschitz bound for {type(net).__name__}: provable robustness needs a LipConvNet "
        "(--arch lipconvnet-N or lipconvnet-N-ttR)"
    )
