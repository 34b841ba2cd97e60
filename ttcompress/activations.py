"""What each conv sees: the second moments of its input channels on a few images (for data-aware truncation).

``input_moments`` runs the network once over the images with a forward pre-hook on each named conv and returns,
per conv, ``Σ = E[x xᵀ]`` over every image and every spatial position of its input ``x`` (a Cin × Cin matrix in
float64, not centred: a conv is linear, so the error it makes on an input is ``(W − W_tt)·x``, whose expected
square is ``tr((W − W_tt) Σ (W − W_tt)ᵀ)`` summed over the taps — :func:`ttcompress.tt.tt_svd` minimises that).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ttcompress.data import ImageSet
from ttcompress.metrics import predict
from ttcompress.tt import conv_layers

__all__ = ["input_moments"]


@torch.no_grad()
def input_moments(model: nn.Module, net: nn.Module, images: ImageSet, names: Iterable[str] | None = None, *,
                  batch_size: int = 128, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """``{conv name: E[x xᵀ]}`` (Cin × Cin, float64, on the CPU) over the channels of each conv's input, for the
    convs of ``net`` named in ``names`` (default: all) when ``model`` (normalisation included) runs on ``images``
    in eval mode.  A conv the forward pass does not reach is absent from the result."""
    wanted = None if names is None else set(names)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0].detach().double()
            flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # (Cin, N·positions)
            moment = flat @ flat.T
            sums[name] = moment if name not in sums else sums[name] + moment
            counts[name] = counts.get(name, 0) + flat.shape[1]
        return hook

    handles = [conv.register_forward_pre_hook(hook_for(name)) for name, conv in conv_layers(net)
               if wanted is None or name in wanted]
    try:
        predict(model, images, batch_size=batch_size, device=device)
    finally:
        for h in handles:
            h.remove()
    return {name: (total / counts[name]).cpu() for name, total in sums.items()}
