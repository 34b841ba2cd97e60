"""Which layers singular-value control acts on: one discovery for every control method.

:func:`discover` walks the network once: every conv and TT layer that runs (it has an input size), with its
spatial input size, padding mode and the BatchNorm that consumes its output (when a conv → BatchNorm map is
given); every ``nn.Linear``; every affine BatchNorm with running statistics.  Methods then ask for the convs they
can handle (:meth:`Layers.convs_for`), which refuses what no method can bound.  :func:`is_tt` is the one test of
"is this a TT layer".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ttcompress.errors import SettingError, UserError
from ttcompress.kernel import Geometry, Pair
from ttcompress.tt import TTConv, conv_layers

__all__ = ["ControlledConv", "Layers", "discover", "is_tt"]

PERIODIC_PADDINGS = ("zeros", "circular")  # where the periodic spectrum is the one the final verification states


def is_tt(layer: nn.Module) -> bool:
    """Whether ``layer`` is a TT conv (``last ∘ core ∘ first``; its effective kernel is the core after QR)."""
    return isinstance(layer, TTConv)


@dataclass
class ControlledConv:
    name: str
    layer: nn.Module
    input_size: Pair
    bn: nn.Module | None = None  # the BatchNorm consuming the conv's output (FastClip with clip_with_bn)

    @property
    def is_tt(self) -> bool:
        return is_tt(self.layer)

    @property
    def kind(self) -> str:
        return "tt" if self.is_tt else "conv"

    @property
    def geometry(self) -> Geometry:
        return Geometry.of(self.layer)

    @property
    def padding_mode(self) -> str:
        return str(getattr(self.layer, "padding_mode", "zeros"))

    @property
    def work_dtype(self) -> torch.dtype:
        """The dtype its effective kernel is worked in: float64 for a TT core after QR, else the weight's."""
        return torch.float64 if self.is_tt else self.layer.weight.dtype

    def params(self) -> list[torch.Tensor]:
        """The tensors control rewrites (kernels and frames, not biases): what a data-parallel run broadcasts."""
        return [p.data for p in self.layer.parameters() if p.dim() > 1]


@dataclass
class Layers:
    """The controllable layers of one network; see :func:`discover`."""

    net: nn.Module
    convs: list[ControlledConv] = field(default_factory=list)
    linears: list[tuple[str, nn.Linear]] = field(default_factory=list)
    bns: list[tuple[str, nn.Module]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # conv name → why no method controls it
    grouped: list[tuple[str, int]] = field(default_factory=list)
    batchnorms: dict[str, str] | None = None  # conv name → BatchNorm name, when given

    def convs_for(self, method: str, *, periodic: bool) -> list[ControlledConv]:
        """The convs ``method`` controls; refuses grouped convs and, for a ``periodic`` method (its bound is
        stated on the periodic operator), input sizes the stride does not divide and padding modes whose layer
        as it runs is not bounded by its periodic operator (``reflect``, ``replicate``)."""
        if self.grouped:
            name, groups = self.grouped[0]
            raise UserError(f"layer {name} is a grouped conv (groups={groups}); singular-value control supports "
                            "groups=1 only")
        if self.skipped:
            warnings.warn("singular-value control skips " + "; ".join(f"{n}: {why}" for n, why in self.skipped.items()),
                          UserWarning, stacklevel=3)
        if periodic:
            for conv in self.convs:
                size, (s1, s2) = conv.input_size, conv.geometry.stride
                if size[0] % s1 or size[1] % s2:
                    raise UserError(f"layer {conv.name}: input size {size[0]}×{size[1]} is not divisible by its "
                                    f"stride {s1}×{s2}; exact spectra need an input size that is a multiple of the "
                                    "stride")
                if conv.padding_mode not in PERIODIC_PADDINGS:
                    raise SettingError(f"layer {conv.name} pads with padding_mode={conv.padding_mode!r}: the "
                                       f"periodic spectrum {method} controls does not bound that layer as it runs; "
                                       "use fastclip_to (it controls the layer as it runs, with its own padding)",
                                       method, "fastclip_to")
        return list(self.convs)


def discover(net: nn.Module, input_sizes: dict[str, Pair], batchnorms: dict[str, str] | None = None) -> Layers:
    """The layers of ``net`` control can act on.  ``input_sizes`` (layer name → spatial input size, from
    :func:`ttcompress.spectral.network.layer_input_sizes`) names the convs that run; the others are left alone.
    ``batchnorms`` (conv name → BatchNorm name, :func:`ttcompress.fastclip.following_batchnorms`) pairs convs with
    the BatchNorm that consumes their output."""
    found = Layers(net, batchnorms=None if batchnorms is None else dict(batchnorms))
    for name, layer in conv_layers(net):
        if name not in input_sizes:
            continue
        if len(layer.kernel_size) != 2:  # 1-D / 3-D convs: spectra yes, clipping/division not (yet)
            found.skipped[name] = f"{len(layer.kernel_size)}-D conv: clipping and division support 2-D only"
            continue
        if getattr(layer, "groups", 1) != 1:
            found.grouped.append((name, int(layer.groups)))
            continue
        size = tuple(int(v) for v in input_sizes[name])
        bn = net.get_submodule(batchnorms[name]) if batchnorms and name in batchnorms else None
        found.convs.append(ControlledConv(name, layer, (size[0], size[1]), bn))
    found.linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    found.bns = [(n, m) for n, m in net.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.running_var is not None]
    return found
