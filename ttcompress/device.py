"""Choosing the torch device from a ``--device`` string."""

from __future__ import annotations

import torch

from ttcompress.errors import UserError


def pick_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; ``local_rank`` picks the GPU under torchrun."""
    spec = spec.lower().strip()
    if spec not in ("auto", "cpu", "cuda") and not spec.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    cuda = torch.cuda.is_available()
    if spec.startswith("cuda") and not cuda:
        raise UserError(f"--device {spec}: no CUDA device is available (torch.cuda.is_available() is False); "
                        "use --device cpu")
    if spec == "cpu" or (spec == "auto" and not cuda):
        return torch.device("cpu")
    if local_rank is not None:
        device = torch.device("cuda", local_rank)
    elif spec.startswith("cuda:"):
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise UserError(f"--device {spec}: not a valid device name") from None
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    torch.cuda.set_device(device)
    return device
