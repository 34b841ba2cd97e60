"""The one place that knows how a convolution kernel is laid out.

Every kernel in ttcompress is a tensor in PyTorch's layout ``(Cout, Cin, kh, kw)`` and every convolution is
PyTorch's cross-correlation ``y[o, i, j] = Σ_c Σ_{a,b} W[o, c, a, b] · x[c, s·i + d·a − p, s·j + d·b − p]``.
The routines below are the only ones that reshape or permute kernels; TT and spectral code call them instead of
permuting on their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

Pair = tuple[int, int]


def pair(value: int | tuple[int, ...] | str) -> Pair:
    if isinstance(value, str):
        raise ValueError(f"expected an integer pair, got padding mode {value!r}")
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"expected a pair, got {value!r}")
    return (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class Geometry:
    """What besides the kernel defines a conv's linear map: stride and dilation (padding only shifts it)."""

    stride: Pair = (1, 1)
    dilation: Pair = (1, 1)

    @classmethod
    def of(cls, conv: nn.Module) -> "Geometry":
        return cls(pair(conv.stride), pair(conv.dilation))


# --- unfoldings used by the TT-SVD -------------------------------------------------------------------------------

def unfold_input(kernel: torch.Tensor) -> torch.Tensor:
    """``(Cout, Cin, kh, kw)`` → ``Cin × (kh·kw·Cout)``: the input-channel unfolding (first TT-SVD step)."""
    cout, cin, kh, kw = kernel.shape
    return kernel.permute(1, 2, 3, 0).reshape(cin, kh * kw * cout)


def unfold_output(kernel: torch.Tensor) -> torch.Tensor:
    """``(Cout, Cin, kh, kw)`` → ``Cout × (Cin·kh·kw)``: the output-channel unfolding."""
    return kernel.reshape(kernel.shape[0], -1)


def apply_input_frame(kernel: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Contract the input channels with ``frame`` (r, Cin): ``(Cout, Cin, kh, kw)`` → ``(Cout, r, kh, kw)``."""
    return torch.einsum("ocij,rc->orij", kernel, frame)


def apply_output_frame(kernel: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Contract the output channels with ``frame`` (r, Cout): ``(Cout, Cin, kh, kw)`` → ``(r, Cin, kh, kw)``."""
    return torch.einsum("ocij,ro->rcij", kernel, frame)


def compose_tt(first: torch.Tensor, core: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Dense kernel of ``last ∘ core ∘ first``.

    first: (r1, Cin) — the 1×1 conv Cin→r1;  core: (r2, r1, kh, kw);  last: (Cout, r2) — the 1×1 conv r2→Cout.
    """
    return torch.einsum("ob,baij,ac->ocij", last, core, first)


def as_matrix(weight_1x1: torch.Tensor) -> torch.Tensor:
    """A 1×1 conv weight ``(Cout, Cin, 1, 1)`` as the ``Cout × Cin`` matrix."""
    return weight_1x1.reshape(weight_1x1.shape[0], weight_1x1.shape[1])


def as_1x1(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.reshape(matrix.shape[0], matrix.shape[1], 1, 1)


# --- polyphase layout used by the exact spectrum and by clipping --------------------------------------------------

@dataclass(frozen=True)
class PolyphaseLayout:
    """Where each kernel tap lands in the strided-periodic (polyphase) form of the operator (Theorem 2).

    With input size ``n`` and stride ``s`` (per axis; ``n`` divisible by ``s``), the periodic strided conv equals a
    stride-1 periodic correlation on an ``m = n/s`` grid with ``s1·s2·Cin`` input channels.  Tap ``(a, b)`` sits at
    offset ``t = (d·a mod n)``, i.e. polyphase position ``q = t // s`` and phase ``r = t % s`` per axis; its
    ``Cin`` channels become polyphase channels ``c·s1·s2 + r1·s2 + r2``.

    ``positions`` lists the distinct positions q (T of them); ``tap_position[a, b]`` indexes into it;
    ``tap_phase[a, b]`` is ``r1·s2 + r2``; ``tap_owner[a, b]`` is False for a tap that wraps onto the same
    (q, r) as an earlier tap (kernels larger than the input): such taps add up in the operator.
    """

    input_size: Pair
    stride: Pair
    grid: Pair
    positions: torch.Tensor  # (T, 2) int64
    tap_position: torch.Tensor  # (kh, kw) int64
    tap_phase: torch.Tensor  # (kh, kw) int64
    tap_owner: torch.Tensor  # (kh, kw) bool

    @property
    def phases(self) -> int:
        return self.stride[0] * self.stride[1]


def polyphase_layout(kernel_size: Pair, input_size: Pair, geometry: Geometry) -> PolyphaseLayout:
    (kh, kw), (n1, n2) = kernel_size, input_size
    (s1, s2), (d1, d2) = geometry.stride, geometry.dilation
    if n1 % s1 or n2 % s2:
        raise ValueError(f"input size {n1}×{n2} is not divisible by the stride {s1}×{s2}")
    m1, m2 = n1 // s1, n2 // s2
    positions: dict[Pair, int] = {}
    seen: set[tuple[int, int]] = set()
    tap_position = torch.empty(kh, kw, dtype=torch.long)
    tap_phase = torch.empty(kh, kw, dtype=torch.long)
    tap_owner = torch.empty(kh, kw, dtype=torch.bool)
    for a in range(kh):
        t1 = (d1 * a) % n1
        for b in range(kw):
            t2 = (d2 * b) % n2
            q = (t1 // s1, t2 // s2)
            phase = (t1 % s1) * s2 + (t2 % s2)
            index = positions.setdefault(q, len(positions))
            tap_position[a, b] = index
            tap_phase[a, b] = phase
            tap_owner[a, b] = (index, phase) not in seen
            seen.add((index, phase))
    pos = torch.tensor(list(positions.keys()), dtype=torch.long).reshape(-1, 2)
    return PolyphaseLayout((n1, n2), (s1, s2), (m1, m2), pos, tap_position, tap_phase, tap_owner)


def to_polyphase(kernel: torch.Tensor, layout: PolyphaseLayout) -> torch.Tensor:
    """``(Cout, Cin, kh, kw)`` → ``(T, Cout, Cin·s1·s2)``: the polyphase kernel at its T nonzero positions."""
    cout, cin, kh, kw = kernel.shape
    p = layout.phases
    taps = kernel.new_zeros(len(layout.positions), cout, cin, p)
    for a in range(kh):
        for b in range(kw):
            taps[layout.tap_position[a, b], :, :, layout.tap_phase[a, b]] += kernel[:, :, a, b]
    return taps.reshape(len(layout.positions), cout, cin * p)


def from_polyphase(taps: torch.Tensor, layout: PolyphaseLayout, kernel_size: Pair) -> torch.Tensor:
    """Inverse of :func:`to_polyphase` on the kernel's support: ``(T, Cout, Cin·s1·s2)`` → ``(Cout, Cin, kh, kw)``.

    A tap that wraps onto an earlier tap's slot gets zero, so the operator is the one ``taps`` describes.
    """
    t, cout, cp = taps.shape
    p = layout.phases
    taps = taps.reshape(t, cout, cp // p, p)
    kh, kw = kernel_size
    kernel = taps.new_zeros(cout, cp // p, kh, kw)
    for a in range(kh):
        for b in range(kw):
            if layout.tap_owner[a, b]:
                kernel[:, :, a, b] = taps[layout.tap_position[a, b], :, :, layout.tap_phase[a, b]]
    return kernel
