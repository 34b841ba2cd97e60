"""Multiply-accumulates (MACs) of conv, TT and linear layers, counted from their shapes and the input each sees.

One forward pass (:func:`ttcompress.probe.probe`, batch 1) records, per layer, how many spatial positions its input
and its output have (summed over calls, should a module run more than once).  From those the counts are exact:

* dense conv: ``Cout · Cin/groups · ∏k · out_points``
* TT conv: ``r1·Cin · in_points`` (the 1×1 ``first`` runs at the input resolution) ``+ r2·r1·∏k · out_points`` (the
  core carries the stride) ``+ Cout·r2 · out_points``
* linear: ``in_features · out_features · positions`` (positions = input elements / in_features)

Biases, BatchNorm, activations and pooling are not counted: the figures are the products of the weight layers, per
image.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ttcompress.probe import probe
from ttcompress.tt import DENSE_CONVS, TTConv, conv_layers

__all__ = ["LayerSite", "conv_macs", "linear_macs", "tt_macs", "layer_sites", "module_macs", "network_macs"]


@dataclass(frozen=True)
class LayerSite:
    """Where a layer runs, per image: spatial positions of its input and of its output (summed over its calls) and
    the shape of its first input without the batch dim (for timing it alone)."""

    name: str
    in_points: int
    out_points: int
    in_shape: tuple[int, ...]


def conv_macs(cin: int, cout: int, kernel_size: Iterable[int], out_points: int, groups: int = 1) -> int:
    return cout * (cin // groups) * math.prod(kernel_size) * out_points


def tt_macs(cin: int, cout: int, kernel_size: Iterable[int], ranks: Sequence[int], in_points: int,
            out_points: int) -> int:
    r1, r2 = ranks
    return r1 * cin * in_points + (r2 * r1 * math.prod(kernel_size) + cout * r2) * out_points


def linear_macs(in_features: int, out_features: int, positions: int) -> int:
    return in_features * out_features * positions


def _weight_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(conv_layers(net)) + [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]


def layer_sites(model: nn.Module, input_size: Sequence[int], net: nn.Module | None = None) -> dict[str, LayerSite]:
    """The :class:`LayerSite` of every conv, TT and linear layer of ``net`` (default ``model``), by module name, from
    one forward pass of ``model`` on a zero input of shape ``input_size`` (no batch dim).  Layers the pass does not
    reach are absent."""
    net = model if net is None else net
    seen: dict[str, list] = {}
    handles = []
    for name, layer in _weight_layers(net):
        def hook(module, args, output, name=name):
            x = args[0]
            if isinstance(module, nn.Linear):
                points_in = points_out = x.numel() // x.shape[0] // module.in_features
            else:
                points_in = math.prod(x.shape[2:])
                points_out = math.prod(output.shape[2:])
            entry = seen.setdefault(name, [0, 0, tuple(int(v) for v in x.shape[1:])])
            entry[0] += points_in
            entry[1] += points_out
        handles.append(layer.register_forward_hook(hook))
    probe(model, input_size, handles)
    return {name: LayerSite(name, a, b, shape) for name, (a, b, shape) in seen.items()}


def module_macs(module: nn.Module, site: LayerSite) -> int:
    """MACs per image of a conv, TT or linear layer at ``site``."""
    if isinstance(module, TTConv):
        return tt_macs(module.in_channels, module.out_channels, module.kernel_size, module.ranks, site.in_points,
                       site.out_points)
    if isinstance(module, DENSE_CONVS):
        return conv_macs(module.in_channels, module.out_channels, module.kernel_size, site.out_points, module.groups)
    if isinstance(module, nn.Linear):
        return linear_macs(module.in_features, module.out_features, site.in_points)
    raise TypeError(f"no MAC count for {type(module).__name__}")


@torch.no_grad()
def network_macs(model: nn.Module, input_size: Sequence[int], net: nn.Module | None = None) -> dict[str, int]:
    """MACs per image of every conv, TT and linear layer of ``net`` (default ``model``) that a forward pass of
    ``model`` on ``input_size`` reaches, by module name; their sum is the model's count."""
    net = model if net is None else net
    sites = layer_sites(model, input_size, net)
    return {name: module_macs(net.get_submodule(name), site) for name, site in sites.items()}
