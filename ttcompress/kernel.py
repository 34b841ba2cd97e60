"""The one place that knows how a convolution kernel is laid out.

Every kernel in ttcompress is a tensor in PyTorch's layout ``(Cout, Cin, *k)`` with one, two or three spatial dims
(``(Cout, Cin, k)``, ``(Cout, Cin, kh, kw)``, ``(Cout, Cin, kd, kh, kw)``), and every convolution is PyTorch's
cross-correlation ``y[o, i] = Σ_c Σ_a W[o, c, a] · x[c, s·i + d·a − p]`` with multi-indices ``i``, ``a`` (stride,
dilation and padding per axis).  The routines below are the only ones that reshape or permute kernels; TT and
spectral code call them instead of permuting on their own.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

Pair = tuple[int, int]
Size = tuple[int, ...]  # one int per spatial dim


def pair(value: int | tuple[int, ...] | str) -> Pair:
    if isinstance(value, str):
        raise ValueError(f"expected an integer pair, got padding mode {value!r}")
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"expected a pair, got {value!r}")
    return (int(value[0]), int(value[1]))


def ntuple(value: int | tuple[int, ...] | list[int] | str, dims: int) -> Size:
    """``value`` as one int per spatial dim (an int is repeated ``dims`` times)."""
    if isinstance(value, str):
        raise ValueError(f"expected {dims} integers, got padding mode {value!r}")
    if isinstance(value, int):
        return (value,) * dims
    if len(value) != dims:
        raise ValueError(f"expected {dims} integer(s), got {value!r}")
    return tuple(int(v) for v in value)


def spatial_dims(layer: nn.Module | torch.Tensor) -> int:
    """Number of spatial dims of a kernel ``(Cout, Cin, *k)`` or of a conv / TT layer (from its ``kernel_size``)."""
    if isinstance(layer, torch.Tensor):
        return layer.ndim - 2
    return len(layer.kernel_size)  # nn.ConvNd and TT layers keep a tuple


@dataclass(frozen=True)
class Geometry:
    """What besides the kernel defines a conv's linear map: stride and dilation per spatial dim (padding only
    shifts it).  ``dilation`` defaults to ones of the stride's length."""

    stride: Size = (1, 1)
    dilation: Size | None = None

    def __post_init__(self) -> None:
        stride = tuple(int(v) for v in self.stride)
        dilation = (1,) * len(stride) if self.dilation is None else tuple(int(v) for v in self.dilation)
        if len(dilation) != len(stride):
            raise ValueError(f"stride {stride} and dilation {dilation} have different numbers of dims")
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "dilation", dilation)

    @property
    def dims(self) -> int:
        return len(self.stride)

    @classmethod
    def of(cls, conv: nn.Module) -> "Geometry":
        dims = spatial_dims(conv)
        return cls(ntuple(conv.stride, dims), ntuple(conv.dilation, dims))


# --- unfoldings used by the TT-SVD -------------------------------------------------------------------------------

def unfold_input(kernel: torch.Tensor) -> torch.Tensor:
    """``(Cout, Cin, *k)`` → ``Cin × (∏k·Cout)``: the input-channel unfolding (first TT-SVD step)."""
    return kernel.movedim(0, -1).reshape(kernel.shape[1], -1)


def unfold_output(kernel: torch.Tensor) -> torch.Tensor:
    """``(Cout, Cin, *k)`` → ``Cout × (Cin·∏k)``: the output-channel unfolding."""
    return kernel.reshape(kernel.shape[0], -1)


def apply_input_frame(kernel: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Contract the input channels with ``frame`` (r, Cin): ``(Cout, Cin, *k)`` → ``(Cout, r, *k)``."""
    return torch.einsum("oc...,rc->or...", kernel, frame)


def apply_output_frame(kernel: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Contract the output channels with ``frame`` (r, Cout): ``(Cout, Cin, *k)`` → ``(r, Cin, *k)``."""
    return torch.einsum("oc...,ro->rc...", kernel, frame)


def compose_tt(first: torch.Tensor, core: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Dense kernel of ``last ∘ core ∘ first``.

    first: (r1, Cin) — the 1×1 conv Cin→r1;  core: (r2, r1, *k);  last: (Cout, r2) — the 1×1 conv r2→Cout.
    """
    return torch.einsum("ob,ba...,ac->oc...", last, core, first)


def group_kernels(kernel: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
    """A grouped conv's weight ``(Cout, Cin/g, *k)`` as the dense ``(Cout/g, Cin/g, *k)`` kernel of each group: the
    operator is block diagonal over them."""
    return kernel.chunk(groups, dim=0) if groups > 1 else (kernel,)


def as_matrix(weight_1x1: torch.Tensor) -> torch.Tensor:
    """A 1×1 conv weight ``(Cout, Cin, 1, …)`` (any number of spatial dims) as the ``Cout × Cin`` matrix."""
    return weight_1x1.reshape(weight_1x1.shape[0], weight_1x1.shape[1])


def as_1x1(matrix: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """A ``Cout × Cin`` matrix as the weight of a 1×1 conv with ``dims`` spatial dims."""
    return matrix.reshape(matrix.shape[0], matrix.shape[1], *(1,) * dims)


# --- polyphase layout used by the exact spectrum and by clipping --------------------------------------------------

@dataclass(frozen=True)
class PolyphaseLayout:
    """Where each kernel tap lands in the strided-periodic (polyphase) form of the operator (Theorem 2).

    With input size ``n`` and stride ``s`` (per axis; ``n`` divisible by ``s``), the periodic strided conv equals a
    stride-1 periodic correlation on an ``m = n/s`` grid with ``∏s·Cin`` input channels.  Tap ``a`` (a multi-index,
    e.g. ``(a, b)`` in 2-D) sits at offset ``t = (d·a mod n)``, i.e. polyphase position ``q = t // s`` and phase
    ``r = t % s`` per axis; its ``Cin`` channels become polyphase channels ``c·∏s + r̄`` with the row-major phase
    index ``r̄`` (``r1·s2 + r2`` in 2-D).

    ``positions`` lists the distinct positions q (T of them); ``tap_position[a]`` indexes into it;
    ``tap_phase[a]`` is ``r̄``; ``tap_owner[a]`` is False for a tap that wraps onto the same (q, r) as an earlier
    tap (kernels larger than the input): such taps add up in the operator.
    """

    input_size: Size
    stride: Size
    grid: Size
    positions: torch.Tensor  # (T, dims) int64
    tap_position: torch.Tensor  # kernel_size, int64
    tap_phase: torch.Tensor  # kernel_size, int64
    tap_owner: torch.Tensor  # kernel_size, bool

    @property
    def phases(self) -> int:
        return math.prod(self.stride)

    def used_channels(self, cin: int) -> torch.Tensor | None:
        """Polyphase channels some tap reaches (``c·∏s + r̄`` for the phases ``r̄`` in use), or None when all are.
        A strided 1×1 conv only reads phase 0: the other columns of ``P̂`` are zero and only add zero singular
        values."""
        used = sorted(set(self.tap_phase.flatten().tolist()))
        if len(used) == self.phases:
            return None
        return (torch.arange(cin).unsqueeze(1) * self.phases + torch.tensor(used)).flatten()

    def taps(self) -> list[tuple[Size, int, int, bool]]:
        """``(a, position, phase, owner)`` for every tap ``a`` in row-major order, as Python ints."""
        shape = tuple(self.tap_position.shape)
        pos, phase, owner = (t.flatten().tolist() for t in (self.tap_position, self.tap_phase, self.tap_owner))
        return [(a, pos[i], phase[i], owner[i]) for i, a in enumerate(itertools.product(*map(range, shape)))]


def polyphase_layout(kernel_size: Size, input_size: Size, geometry: Geometry) -> PolyphaseLayout:
    kernel_size, input_size = tuple(kernel_size), tuple(input_size)
    stride, dilation = geometry.stride, geometry.dilation
    if not len(kernel_size) == len(input_size) == len(stride):
        raise ValueError(f"kernel size {kernel_size}, input size {input_size} and stride {stride} differ in their "
                         "number of dims")
    if any(n % s for n, s in zip(input_size, stride)):
        raise ValueError(f"input size {'×'.join(map(str, input_size))} is not divisible by the stride "
                         f"{'×'.join(map(str, stride))}")
    grid = tuple(n // s for n, s in zip(input_size, stride))
    positions: dict[Size, int] = {}
    seen: set[tuple[int, int]] = set()
    tap_position = torch.empty(kernel_size, dtype=torch.long)
    tap_phase = torch.empty(kernel_size, dtype=torch.long)
    tap_owner = torch.empty(kernel_size, dtype=torch.bool)
    for a in itertools.product(*map(range, kernel_size)):
        offsets = [(d * i) % n for d, i, n in zip(dilation, a, input_size)]
        q = tuple(t // s for t, s in zip(offsets, stride))
        phase = 0
        for t, s in zip(offsets, stride):
            phase = phase * s + t % s
        index = positions.setdefault(q, len(positions))
        tap_position[a] = index
        tap_phase[a] = phase
        tap_owner[a] = (index, phase) not in seen
        seen.add((index, phase))
    pos = torch.tensor(list(positions.keys()), dtype=torch.long).reshape(-1, len(kernel_size))
    return PolyphaseLayout(input_size, stride, grid, pos, tap_position, tap_phase, tap_owner)


def to_polyphase(kernel: torch.Tensor, layout: PolyphaseLayout) -> torch.Tensor:
    """``(Cout, Cin, *k)`` → ``(T, Cout, Cin·∏s)``: the polyphase kernel at its T nonzero positions."""
    cout, cin = kernel.shape[:2]
    p = layout.phases
    taps = kernel.new_zeros(len(layout.positions), cout, cin, p)
    for a, position, phase, _ in layout.taps():
        taps[position, :, :, phase] += kernel[(slice(None), slice(None), *a)]
    return taps.reshape(len(layout.positions), cout, cin * p)


def from_polyphase(taps: torch.Tensor, layout: PolyphaseLayout, kernel_size: Size) -> torch.Tensor:
    """Inverse of :func:`to_polyphase` on the kernel's support: ``(T, Cout, Cin·∏s)`` → ``(Cout, Cin, *k)``.

    A tap that wraps onto an earlier tap's slot gets zero, so the operator is the one ``taps`` describes.
    """
    t, cout, cp = taps.shape
    p = layout.phases
    taps = taps.reshape(t, cout, cp // p, p)
    kernel = taps.new_zeros(cout, cp // p, *kernel_size)
    for a, position, phase, owner in layout.taps():
        if owner:
            kernel[(slice(None), slice(None), *a)] = taps[position, :, :, phase]
    return kernel
