"""LipConvNet-n (Singla & Feizi 2021b) with SOC layers, and its SOC-TT variant (Senderovich et al. 2022, Table 1).

Layout (as in the reference implementation used for Table 1): five stages of ``n/5`` blocks, each block an
orthogonal conv followed by :class:`~ttcompress.soc.MaxMin`.  In every stage the first ``n/5 − 1`` blocks keep the
width (the very first maps 3 → 32 channels by zero-padding the input channels) and the last block halves the
resolution with stride 2 and doubles the width (pixel-unshuffle to 4·C channels, SOC, keep 2·C) — with a 1×1
kernel in stage 5.  Widths: 32 → 64 → 128 → 256 → 512 → 1024 at 1×1 resolution for a 32×32 input.  The
classifier is a 1×1 SOC layer from the flattened features to ``num_classes`` channels (the first
``num_classes`` outputs of an orthogonal map: 1-Lipschitz), as in the reference code, not a free linear layer.

``conv_type="soc-tt"`` replaces every SOC layer (the classifier included) with an
:class:`~ttcompress.soc.SOCTTConv2d` of the given ``rank``.

Registry names (``ttcompress.archs``): ``lipconvnet-{n}`` (SOC) and ``lipconvnet-{n}-tt{rank}`` (SOC-TT) for
n ∈ {5, 10, 15, 20, 25, 30} and rank ∈ {128, 256}.  Inputs are normalised as in the reference training code
(CIFAR-10 mean, a single std 0.2507 for all channels): the normalisation is then ``1/0.2507``-Lipschitz, which
:func:`ttcompress.certify.network_lipschitz_bound` accounts for.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ttcompress.soc import MaxMin, SOCLayer, SOCTTConv2d

__all__ = ["DEPTHS", "LIPCONVNET_MEAN", "LIPCONVNET_STD", "LipBlock", "LipConvNet", "TT_RANKS"]

LIPCONVNET_MEAN = (0.4914, 0.4822, 0.4465)
LIPCONVNET_STD = (0.2507, 0.2507, 0.2507)
DEPTHS = (5, 10, 15, 20, 25, 30)
TT_RANKS = (128, 256)
CONV_TYPES = ("soc", "soc-tt")


class LipBlock(nn.Module):
    """``MaxMin(conv(x))``."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.activation = MaxMin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv(x))

    def lipschitz_bound(self) -> float:
        return self.conv.lipschitz_bound()


class LipConvNet(nn.Module):
    """LipConvNet-``depth`` (depth a multiple of 5).  ``conv_type`` "soc" or "soc-tt" (then ``rank`` is needed);
    ``terms``/``eval_terms`` are passed to every SOC layer."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        *,
        conv_type: str = "soc",
        rank: int | None = None,
        base_channels: int = 32,
        input_size: int = 32,
        terms: int = 6,
        eval_terms: int = 13,
    ) -> None:
        super().__init__()
        if depth < 5 or depth % 5:
            raise ValueError(f"LipConvNet depth must be a positive multiple of 5, got {depth}")
        if conv_type not in CONV_TYPES:
            raise ValueError(f"conv_type must be one of {CONV_TYPES}, got {conv_type!r}")
        if conv_type == "soc-tt" and (rank is None or rank < 1):
            raise ValueError("conv_type 'soc-tt' needs a positive rank")
        if input_size % 32:
            raise ValueError(f"LipConvNet halves the resolution five times; input size {input_size} is not a "
                             "multiple of 32")
        self.depth, self.conv_type, self.rank = depth, conv_type, rank
        blocks = depth // 5

        def conv(cin: int, cout: int, kernel_size: int, stride: int) -> nn.Module:
            if conv_type == "soc":
                return SOCLayer(cin, cout, kernel_size, stride, terms=terms, eval_terms=eval_terms)
            return SOCTTConv2d(cin, cout, int(rank), kernel_size, stride, terms=terms,  # type: ignore[arg-type]
                               eval_terms=eval_terms)

        in_planes = 3
        stages = []
        for stage in range(5):
            planes = base_channels if stage == 0 else in_planes
            layers = []
            for j in range(blocks):
                last = j == blocks - 1
                stride = 2 if last else 1
                kernel_size = 1 if (stage == 4 and last) else 3
                layers.append(LipBlock(conv(in_planes, planes * stride, kernel_size, stride)))
                in_planes = planes * stride
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4, self.layer5 = stages
        flat = (input_size // 32) ** 2 * in_planes
        self.final_conv = conv(flat, num_classes, 1, 1)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer5(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
        x = x.reshape(x.shape[0], -1, 1, 1)  # a permutation of the features: norm-preserving
        return self.final_conv(x).flatten(1)

    def chain(self) -> list[nn.Module]:
        """The layers in order (each with ``lipschitz_bound()``); the network is their composition."""
        return [*self.layer1, *self.layer2, *self.layer3, *self.layer4, *self.layer5, self.final_conv]

    @torch.no_grad()
    def lipschitz_bound(self) -> float:
        """Product of the layers' certified bounds (MaxMin and the flattening are 1-Lipschitz)."""
        return math.prod(layer.lipschitz_bound() for layer in self.chain())

    def orthogonal_loss(self) -> torch.Tensor:
        """Eq. 11 over every SOC-TT layer: Σ‖FFᵀ − I‖² + ‖LᵀL − I‖² divided by the total number of entries
        (zero for an SOC network)."""
        total, entries = None, 0
        for module in self.modules():
            if isinstance(module, SOCTTConv2d):
                value, n = module.orthogonal_terms()
                total = value if total is None else total + value
                entries += n
        if total is None:
            return self.final_conv.bias.new_zeros(()) if self.final_conv.bias is not None else torch.zeros(())
        return total / max(entries, 1)
