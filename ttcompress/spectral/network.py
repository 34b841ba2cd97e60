"""Exact spectra of every convolution of a network, on the input sizes the layers actually see."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
from torch import nn

from ttcompress.errors import UserError
from ttcompress.kernel import Geometry, Size, group_kernels, spatial_dims
from ttcompress.probe import probe
from ttcompress.progress import Progress, ensure
from ttcompress.spectral.ndim import singular_values_nd
from ttcompress.tt import conv_layers, effective_factors

T = TypeVar("T")


@dataclass
class LayerSpectrum:
    name: str
    kind: str  # "conv" | "tt"
    input_size: Size  # one int per spatial dim (1, 2 or 3)
    stride: Size
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


def layer_input_sizes(model: nn.Module, input_size: Sequence[int], net: nn.Module | None = None) -> dict[str, Size]:
    """Spatial size of the input of every conv / TT layer, from one forward pass with hooks: a tuple with one int
    per spatial dim of the layer (``(L,)`` for a Conv1d, ``(H, W)`` for a Conv2d, ``(D, H, W)`` for a Conv3d).

    ``model`` is what takes the input (e.g. the normalised wrapper), ``input_size`` its shape without the batch
    dim (``(C, H, W)`` for images); ``net`` the module whose names are reported.
    """
    net = model if net is None else net
    sizes: dict[str, Size] = {}
    handles = []
    for name, layer in conv_layers(net):
        def hook(_module, args, name=name, dims=spatial_dims(layer)):
            sizes[name] = tuple(int(v) for v in args[0].shape[-dims:])
        handles.append(layer.register_forward_pre_hook(hook))
    probe(model, input_size, handles)
    return sizes


def effective_kernel(layer: nn.Module) -> tuple[torch.Tensor, str]:
    """The kernel whose periodic spectrum carries the layer's nonzero singular values: the conv's own weight, or
    for a TT layer its core after QR of the frames (Theorem 3.2)."""
    kernel, frames = effective_factors(layer)
    return kernel, "conv" if frames is None else "tt"


def layer_spectrum(
    name: str, layer: nn.Module, input_hw: Sequence[int], *, dtype: torch.dtype = torch.float32
) -> LayerSpectrum:
    """All singular values of one conv / TT layer (1, 2 or 3 spatial dims) as a periodic conv on ``input_hw``
    inputs (one int per spatial dim; the name is historical); a TT layer through its core after QR of the frames,
    padded with the zeros of the full operator.  A grouped conv is block diagonal over its groups: the union of
    the groups' spectra."""
    geometry = Geometry.of(layer)
    size, stride = tuple(int(v) for v in input_hw), geometry.stride
    if len(size) != len(stride):
        raise UserError(f"layer {name}: input size {'×'.join(map(str, size))} has {len(size)} dims, the layer "
                        f"{len(stride)}")
    if any(n % s for n, s in zip(size, stride)):
        raise UserError(
            f"layer {name}: input size {'×'.join(map(str, size))} is not divisible by its stride "
            f"{'×'.join(map(str, stride))}; pass --input-size with a multiple of the network's total stride"
        )
    kernel, kind = effective_kernel(layer)
    groups = int(getattr(layer, "groups", 1))
    parts = [singular_values_nd(k.to(dtype), size, stride, geometry.dilation, dtype=dtype).double().cpu()
             for k in group_kernels(kernel, groups)]
    values = torch.sort(torch.cat(parts), descending=True).values if groups > 1 else parts[0]
    grid = math.prod(n // s for n, s in zip(size, stride))
    full = grid * groups * min(layer.out_channels // groups, math.prod(stride) * layer.in_channels // groups)
    if values.numel() < full:  # a TT layer: the rest of the full operator's singular values are zero
        values = torch.cat([values, values.new_zeros(full - values.numel())])
    return LayerSpectrum(name, kind, size, stride, values)


def network_spectrum(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    net: nn.Module | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> list[LayerSpectrum]:
    """Exact periodic singular values of every conv and TT layer of ``net`` (default ``model``)."""
    return each_layer(model, input_size, lambda name, layer, size: layer_spectrum(name, layer, size, dtype=dtype),
                      net=net, progress=progress)


def each_layer(
    model: nn.Module,
    input_size: Sequence[int],
    fn: Callable[[str, nn.Module, Size], T],
    *,
    net: nn.Module | None = None,
    progress: Progress | None = None,
) -> list[T]:
    """``fn(name, layer, layer_input_size)`` for every conv and TT layer of ``net`` (default ``model``) that runs
    when ``model`` sees one input of shape ``input_size``, in module order, with a progress task."""
    net = model if net is None else net
    sizes = layer_input_sizes(model, input_size, net)
    layers = [(n, m) for n, m in conv_layers(net) if n in sizes]
    out = []
    with ensure(progress).task("spectrum", total=len(layers)) as advance:
        for name, layer in layers:
            out.append(fn(name, layer, sizes[name]))
            advance(1, layer=name)
    return out
