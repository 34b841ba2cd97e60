"""Exact spectra of every convolution of a network, on the input sizes the layers actually see."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ttcompress.errors import UserError
from ttcompress.kernel import Geometry, Pair
from ttcompress.progress import Progress, ensure
from ttcompress.spectral.periodic import singular_values
from ttcompress.tt import TTConv2d, conv_layers, orthonormal_factors


@dataclass
class LayerSpectrum:
    name: str
    kind: str  # "conv" | "tt"
    input_size: Pair
    stride: Pair
    values: torch.Tensor  # all singular values, descending (float64, CPU)

    @property
    def sigma_max(self) -> float:
        return float(self.values[0])

    @property
    def sigma_min(self) -> float:
        return float(self.values[-1])

    @property
    def count(self) -> int:
        return int(self.values.numel())

    def to_json(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "input_size": list(self.input_size), "stride": list(self.stride),
            "sigma_max": self.sigma_max, "sigma_min": self.sigma_min, "count": self.count,
        }


def layer_input_sizes(model: nn.Module, input_size: Sequence[int], net: nn.Module | None = None) -> dict[str, Pair]:
    """Spatial size of the input of every conv / TT layer, from one forward pass with hooks.

    ``model`` is what takes the image (e.g. the normalised wrapper); ``net`` the module whose names are reported.
    """
    net = model if net is None else net
    sizes: dict[str, Pair] = {}
    handles = []
    for name, layer in conv_layers(net):
        def hook(_module, args, name=name):
            sizes[name] = (int(args[0].shape[-2]), int(args[0].shape[-1]))
        handles.append(layer.register_forward_pre_hook(hook))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    except RuntimeError as exc:
        raise UserError(f"the model cannot run on inputs of size {tuple(input_size)}: {str(exc).splitlines()[0]}") from exc
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sizes


def effective_kernel(layer: nn.Module) -> tuple[torch.Tensor, str]:
    """The kernel whose periodic spectrum carries the layer's nonzero singular values: the conv's own weight, or
    for a TT layer its core after QR of the frames (Theorem 3.2)."""
    if isinstance(layer, TTConv2d):
        _, core, _ = orthonormal_factors(layer)
        return core, "tt"
    return layer.weight.detach(), "conv"


def layer_spectrum(
    name: str, layer: nn.Module, input_hw: Pair, *, dtype: torch.dtype = torch.float32
) -> LayerSpectrum:
    geometry = Geometry.of(layer)
    (n1, n2), (s1, s2) = input_hw, geometry.stride
    if n1 % s1 or n2 % s2:
        raise UserError(
            f"layer {name}: input size {n1}×{n2} is not divisible by its stride {s1}×{s2}; "
            "pass --input-size with a multiple of the network's total stride"
        )
    kernel, kind = effective_kernel(layer)
    values = singular_values(kernel.to(dtype), input_hw, geometry, dtype=dtype).double().cpu()
    full = (n1 // s1) * (n2 // s2) * min(layer.out_channels, s1 * s2 * layer.in_channels)
    if values.numel() < full:  # a TT layer: the rest of the full operator's singular values are zero
        values = torch.cat([values, values.new_zeros(full - values.numel())])
    return LayerSpectrum(name, kind, input_hw, geometry.stride, values)


def network_spectrum(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    net: nn.Module | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> list[LayerSpectrum]:
    """Exact periodic singular values of every conv and TT layer of ``net`` (default ``model``)."""
    net = model if net is None else net
    sizes = layer_input_sizes(model, input_size, net)
    layers = [(n, m) for n, m in conv_layers(net) if n in sizes]
    out = []
    with ensure(progress).task("spectrum", total=len(layers)) as advance:
        for name, layer in layers:
            out.append(layer_spectrum(name, layer, sizes[name], dtype=dtype))
            advance(1, layer=name)
    return out
