"""Running a network once to observe it: layer input shapes, which module consumes which tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ttcompress.errors import UserError

__all__ = ["probe"]


@torch.no_grad()
def probe(model: nn.Module, input_size: Sequence[int], hooks: Sequence[torch.utils.hooks.RemovableHandle] = ()) -> None:
    """Run ``model`` once, in eval mode and without gradients, on one zero input of shape ``input_size`` (no batch
    dim) on the model's device and dtype — for the forward hooks that read shapes or follow tensors — then restore
    its training mode and remove ``hooks``.  A model that cannot run on that size is a :class:`UserError`."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    except RuntimeError as exc:
        raise UserError(f"the model cannot run on inputs of size {tuple(input_size)}: {str(exc).splitlines()[0]}") from exc
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
