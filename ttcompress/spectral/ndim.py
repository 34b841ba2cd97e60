"""Exact singular values of periodic strided convolutions in 1, 2 and 3 spatial dims.

The formulas are those of the 2-D case (Sedghi et al. 2019; Senderovich et al. 2022, Theorem 2) with N-d DFTs: a
stride-``s`` periodic conv on an ``n``-sized input (``n``, ``s`` per axis, ``n`` divisible by ``s``) is, after
splitting the input into ``∏s`` phases, a stride-1 periodic correlation on the ``m = n/s`` grid with ``∏s·Cin``
channels; the N-d DFT block-diagonalises it, so its singular values are those of the ``Cout × ∏s·Cin`` transfer
matrices ``P̂(f) = Σ_q P_q e^{-2πi⟨f, q/m⟩}``, one per frequency ``f`` of the grid — ``∏m·min(Cout, ∏s·Cin)``
values in all, as for the dense operator.

- **2-D** kernels go to :func:`ttcompress.spectral.periodic.singular_values` unchanged.
- **1-D** kernels are mapped exactly onto that 2-D path: a ``(Cout, Cin, k)`` conv with stride ``s`` and dilation
  ``d`` on a length-``n`` input is the ``(Cout, Cin, 1, k)`` conv with stride ``(1, s)`` and dilation ``(1, d)`` on
  a ``1 × n`` input (same operator, entry for entry).
- **3-D** kernels take the direct route here (written for any number of dims): the polyphase kernel of
  :func:`ttcompress.kernel.to_polyphase`, its DFT at the frequencies of a half grid (``P̂(−f) = conj P̂(f)`` for a
  real kernel: only ``0 ≤ f_last ≤ m_last/2`` is computed, the interior counted twice), and batched ``svdvals`` in
  complex64 (``dtype=float32``) or complex128 (float64), chunk by chunk so that memory stays bounded by
  ``CHUNK_BYTES`` whatever the grid, the chunks spread over worker threads (:mod:`~ttcompress.spectral.threads`) as in the 2-D path.  Polyphase channels
  that no tap reaches (e.g. the idle phases of a strided 1×1×1 conv) are left out of the SVDs and contribute their
  zeros directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ttcompress.kernel import Geometry, Size, ntuple, polyphase_layout, to_polyphase
from ttcompress.spectral import periodic
from ttcompress.spectral.threads import pmap, workers_for

__all__ = ["CHUNK_BYTES", "half_grid", "singular_values_nd"]

CHUNK_BYTES = 16 * 2**20  # working memory of one chunk of frequencies on the direct (3-D) path


def half_grid(grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequencies ``(F, D)`` of an N-d grid with ``0 ≤ f_D ≤ m_D/2`` and their weights (``(F,)``, 1 or 2).

    Every conjugate pair ``{f, −f}`` is represented with total weight 2 and every self-conjugate frequency with
    weight 1: a frequency with ``0 < f_D < m_D/2`` stands for itself and its mirror (whose last coordinate
    ``m_D − f_D`` is not in the set); the planes ``f_D = 0`` and ``f_D = m_D/2`` are kept whole with weight 1 (both
    members of their pairs are in the set).  The weights sum to ``∏m``.
    """
    grid = [int(m) for m in grid]
    axes = [torch.arange(m) for m in grid[:-1]] + [torch.arange(grid[-1] // 2 + 1)]
    freqs = torch.cartesian_prod(*axes).reshape(-1, len(grid))
    last = freqs[:, -1]
    weight = torch.where((last > 0) & (2 * last < grid[-1]), 2, 1)
    return freqs, weight


def _direct(kernel: torch.Tensor, input_size: Size, geometry: Geometry, dtype: torch.dtype,
            chunk: int | None) -> torch.Tensor:
    """Singular values (unsorted, float64) of the periodic strided conv by N-d polyphase + DFT + ``svdvals``."""
    cout, cin = kernel.shape[:2]
    layout = polyphase_layout(tuple(kernel.shape[2:]), input_size, geometry)
    ctype = torch.complex128 if dtype == torch.float64 else torch.complex64
    taps = to_polyphase(kernel.detach().to(torch.float64), layout)  # (T, Cout, Cin·P)
    full = min(cout, taps.shape[2])
    used = layout.used_channels(cin)
    if used is not None:
        taps = taps[:, :, used.to(taps.device)]
    t, _, k = taps.shape
    flat = taps.reshape(t, cout * k).to(ctype)
    freqs, weight = half_grid(layout.grid)
    scale = torch.tensor([1.0 / m for m in layout.grid], dtype=torch.float64)
    positions = layout.positions.double().T  # (D, T)
    workers = workers_for(flat.device)
    if chunk is None:
        per_freq = 4 * cout * k * torch.empty((), dtype=ctype).element_size() + 16 * t
        chunk = max(1, min(CHUNK_BYTES // per_freq, math.ceil(len(freqs) / workers)))

    def svdvals(start: int) -> torch.Tensor:
        theta = 2 * math.pi * (freqs[start:start + chunk].double() * scale) @ positions  # (F_c, T)
        phase = torch.polar(torch.ones_like(theta), -theta).to(device=flat.device, dtype=ctype)
        transfer = (phase @ flat).reshape(-1, cout, k)
        return torch.linalg.svdvals(transfer).double().cpu()

    # on a CPU the chunks go to periodic's worker threads, each with single-threaded BLAS/LAPACK: batched svdvals
    # on an OpenMP team stall when the cores are shared (4-6× slower with 2 threads on a busy 2-core machine)
    sigma = torch.cat(pmap(svdvals, range(0, len(freqs), chunk), workers))  # (F, min(Cout, k))
    if sigma.shape[1] < full:  # phases no tap reaches: zero columns of P̂
        sigma = torch.cat([sigma, sigma.new_zeros(len(sigma), full - sigma.shape[1])], 1)
    return sigma.repeat_interleave(weight, dim=0).flatten()


def singular_values_nd(
    kernel: torch.Tensor,
    input_size: Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    *,
    dtype: torch.dtype = torch.float32,
    chunk: int | None = None,
) -> torch.Tensor:
    """All singular values (descending) of the periodic conv with ``kernel`` ``(Cout, Cin, *k)`` — 1, 2 or 3
    spatial dims — on an ``input_size`` input (one int per spatial dim) with the given stride and dilation.

    The count is ``∏m·min(Cout, ∏s·Cin)`` with ``m = input_size/stride``, as for the dense
    ``(Cout·∏m) × (Cin·∏n)`` operator.  ``dtype`` float32 computes in complex64 and returns float32 (every value
    within about 1e-6·σmax), float64 in complex128.  ``chunk``: frequencies per batched call (default: bounded
    memory).  Raises ``ValueError`` for a size that is not a multiple of the stride or of the wrong length.
    """
    dims = kernel.ndim - 2
    if dims not in (1, 2, 3):
        raise ValueError(f"expected a (Cout, Cin, *k) kernel with 1, 2 or 3 spatial dims, got shape "
                         f"{tuple(kernel.shape)}")
    size = ntuple(tuple(input_size), dims)
    strides, dilations = ntuple(stride, dims), ntuple(dilation, dims)
    if min(size) <= 0 or min(strides) <= 0 or min(dilations) <= 0:
        raise ValueError(f"input size, stride and dilation must be positive, got {size}, {strides}, {dilations}")
    if any(n % s for n, s in zip(size, strides)):
        raise ValueError(f"input size {'×'.join(map(str, size))} is not divisible by the stride "
                         f"{'×'.join(map(str, strides))}")
    if dims == 2:
        return periodic.singular_values(kernel, (size[0], size[1]), Geometry(strides, dilations), dtype=dtype,
                                        chunk=chunk)
    if dims == 1:
        return periodic.singular_values(kernel.unsqueeze(2), (1, size[0]), Geometry((1, strides[0]), (1, dilations[0])),
                                        dtype=dtype, chunk=chunk)
    values = _direct(kernel, size, Geometry(strides, dilations), dtype, chunk)
    return torch.sort(values, descending=True).values.to(device=kernel.device, dtype=dtype)
