"""Exact singular values of periodic (circular) strided convolutions, and Sedghi's clipping projection.

Theorem 2 of Senderovich et al. (2022), extending Sedghi et al. (2019): a stride-``s`` periodic conv on an
``n×n`` input is, after permuting input pixels into ``s²`` phases, a stride-1 periodic correlation on the
``m = n/s`` grid with ``s²·Cin`` channels.  The 2-D DFT block-diagonalises it: its singular values are those of the
``Cout × s²Cin`` matrices ``P̂(f) = Σ_q P_q e^{-2πi⟨f, q/m⟩}``, one per frequency ``f``.

Implementation notes:
- The polyphase kernel is nonzero at only T positions (T = ⌈k/s⌉² for a kernel that fits), so ``P̂`` is a
  T-term sum computed per chunk of frequencies as one real matrix product — no padded ``n×n`` kernel, no FFT of
  zeros, and peak memory bounded by the chunk.
- The kernel is real, so ``P̂(−f) = conj P̂(f)``: only the half grid ``f2 ∈ [0, m2/2]`` is computed, and
  frequencies whose mirror is outside it count twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from ttcompress.kernel import Geometry, Pair, PolyphaseLayout, from_polyphase, polyphase_layout, to_polyphase

DEFAULT_CHUNK_BYTES = 256 * 2**20


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


@dataclass(frozen=True)
class HalfGrid:
    """The frequencies of the real-input half spectrum and how many times each stands for in the full grid."""

    freqs: torch.Tensor  # (F, 2) int64
    weight: torch.Tensor  # (F,) int64, 1 or 2

    @classmethod
    def of(cls, grid: Pair) -> "HalfGrid":
        m1, m2 = grid
        f1 = torch.arange(m1).repeat_interleave(m2 // 2 + 1)
        f2 = torch.arange(m2 // 2 + 1).repeat(m1)
        self_mirror = (f2 == 0) | ((m2 % 2 == 0) & (f2 == m2 // 2))
        weight = torch.where(self_mirror, 1, 2)
        return cls(torch.stack([f1, f2], 1), weight)


def _phases(freqs: torch.Tensor, positions: torch.Tensor, grid: Pair, dtype: torch.dtype) -> torch.Tensor:
    """θ[f, t] = 2π ⟨f, q_t / m⟩ for a chunk of frequencies."""
    scale = torch.tensor([1.0 / grid[0], 1.0 / grid[1]], dtype=torch.float64)
    angles = 2 * math.pi * (freqs.double() * scale) @ positions.double().T
    return angles.to(dtype)


def transfer_chunks(
    taps: torch.Tensor, layout: PolyphaseLayout, chunk: int | None = None, freqs: torch.Tensor | None = None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(slice into freqs, P̂ chunk of shape (F_c, Cout, Cin·s²))`` over the half grid (or ``freqs``)."""
    t, cout, cp = taps.shape
    if freqs is None:
        freqs = HalfGrid.of(layout.grid).freqs
    ctype = _complex_dtype(taps.dtype)
    if chunk is None:
        per_freq = cout * cp * torch.empty((), dtype=ctype).element_size() * 4  # P̂ plus LAPACK workspace
        chunk = max(1, DEFAULT_CHUNK_BYTES // per_freq)
    flat = taps.reshape(t, cout * cp)
    positions = layout.positions.to(taps.device)
    for start in range(0, len(freqs), chunk):
        sl = slice(start, min(start + chunk, len(freqs)))
        theta = _phases(freqs[sl], positions.cpu(), layout.grid, taps.dtype).to(taps.device)
        real = torch.cos(theta) @ flat
        imag = -(torch.sin(theta) @ flat)
        yield sl, torch.complex(real, imag).reshape(-1, cout, cp)


def _layout_and_taps(
    kernel: torch.Tensor, input_size: Pair, geometry: Geometry, dtype: torch.dtype | None
) -> tuple[PolyphaseLayout, torch.Tensor]:
    if kernel.ndim != 4:
        raise ValueError(f"expected a (Cout, Cin, kh, kw) kernel, got shape {tuple(kernel.shape)}")
    layout = polyphase_layout((kernel.shape[2], kernel.shape[3]), input_size, geometry)
    work = kernel.detach().to(dtype or kernel.dtype)
    return layout, to_polyphase(work, layout)


def singular_values(
    kernel: torch.Tensor,
    input_size: Pair,
    geometry: Geometry = Geometry(),
    *,
    dtype: torch.dtype = torch.float32,
    chunk: int | None = None,
) -> torch.Tensor:
    """All singular values (descending) of the periodic conv with ``kernel`` on an ``input_size`` input.

    The count is ``m1·m2·min(Cout, s1·s2·Cin)``, as for the dense ``(Cout·m1·m2) × (Cin·n1·n2)`` operator.
    ``dtype`` float32 (complex64 SVDs, ~1e-6·σmax) or float64 (complex128).
    """
    layout, taps = _layout_and_taps(kernel, input_size, geometry, dtype)
    grid = HalfGrid.of(layout.grid)
    parts = []
    for sl, block in transfer_chunks(taps, layout, chunk):
        sv = torch.linalg.svdvals(block)  # (F_c, min(Cout, Cin·s²))
        parts.append(sv.repeat_interleave(grid.weight[sl].to(sv.device), dim=0).flatten())
    values = torch.cat(parts)
    return torch.sort(values, descending=True).values


def sigma_max(kernel: torch.Tensor, input_size: Pair, geometry: Geometry = Geometry(), **kw) -> float:
    return float(singular_values(kernel, input_size, geometry, **kw)[0])


def clip(
    kernel: torch.Tensor,
    input_size: Pair,
    bound: float,
    geometry: Geometry = Geometry(),
    *,
    dtype: torch.dtype = torch.float32,
    chunk: int | None = None,
) -> torch.Tensor:
    """Sedghi's projection: clip every singular value of the periodic strided conv at ``bound``, transform back,
    and keep the kernel's own support (``kh×kw`` taps).  Returns a kernel of the input's shape and dtype.

    Without the crop this would be the exact nearest operator with σmax ≤ bound; the crop makes it approximate,
    so callers that need a guarantee verify with :func:`singular_values` (see ``ttcompress.control``).
    """
    if bound <= 0:
        raise ValueError(f"clip bound must be positive, got {bound}")
    layout, taps = _layout_and_taps(kernel, input_size, geometry, dtype)
    grid = HalfGrid.of(layout.grid)
    positions = layout.positions.to(taps.device)
    total = layout.grid[0] * layout.grid[1]
    new_taps = torch.zeros_like(taps)
    for sl, block in transfer_chunks(taps, layout, chunk):
        u, s, vh = torch.linalg.svd(block, full_matrices=False)
        clipped = (u * s.clamp(max=bound).to(u.dtype).unsqueeze(-2)) @ vh
        # inverse DFT evaluated only at the support positions: P[q] = (1/M) Re Σ_f w_f P̂(f) e^{+iθ(f,q)}
        theta = _phases(grid.freqs[sl], positions.cpu(), layout.grid, taps.dtype).to(taps.device)
        w = grid.weight[sl].to(taps.device, taps.dtype).unsqueeze(1)
        cos, sin = (w * torch.cos(theta)).T, (w * torch.sin(theta)).T  # (T, F_c)
        flat_re = clipped.real.reshape(clipped.shape[0], -1)
        flat_im = clipped.imag.reshape(clipped.shape[0], -1)
        new_taps += ((cos @ flat_re - sin @ flat_im) / total).reshape_as(taps)
    out = from_polyphase(new_taps, layout, (kernel.shape[2], kernel.shape[3]))
    return out.to(kernel.dtype)
