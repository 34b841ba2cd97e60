"""Exact singular values of periodic (circular) strided convolutions, and Sedghi's clipping projection.

Theorem 2 of Senderovich et al. (2022), extending Sedghi et al. (2019): a stride-``s`` periodic conv on an
``n×n`` input is, after permuting input pixels into ``s²`` phases, a stride-1 periodic correlation on the
``m = n/s`` grid with ``s²·Cin`` channels.  The 2-D DFT block-diagonalises it: its singular values are those of the
``Cout × s²Cin`` matrices ``P̂(f) = Σ_q P_q e^{-2πi⟨f, q/m⟩}``, one per frequency ``f``.

How they are computed (``benchmarks/spectrum_bench.py`` measures each choice):

- **Distinct frequencies only.**  The kernel is real, so ``P̂(−f) = conj P̂(f)`` has the same singular values:
  one frequency per pair ``{f, −f}`` (:class:`HalfGrid`, about ``m1·m2/2``).  Beyond that, ``P̂(f)`` only depends on
  the phases ``⟨f, q − q₀⟩`` over the tap positions, so frequencies with equal phases share one eigenproblem
  (:func:`frequency_classes`): a 1×1 conv (a ResNet shortcut) has a single one, a dilated kernel a few.  Polyphase
  channels no tap reaches (the three idle phases of a stride-2 1×1 conv) are dropped: they only add zeros.
- **Gram matrices from the channel autocorrelation.**  With ``c`` the smaller side of ``P̂`` (``Cout`` or ``s²Cin``),
  ``G(f) = P̂(f) P̂(f)ᴴ = Σ_δ A_δ e^{-2πi⟨f, δ/m⟩}`` where ``A_δ = Σ_{q−q'=δ} P_q P_{q'}ᵀ`` are real ``c×c``
  matrices, one per tap offset (25 for a 3×3 kernel), with ``A_{−δ} = A_δᵀ``.  They are computed once per layer
  (one that takes the Gram path, below) in float64 — directly (45 ``c×c·k`` products for a 3×3 kernel) or, for
  ``dtype=float32``, by evaluating the matrix polynomial at 25 points of which 12 are transposes of others and
  interpolating (Toom–Cook: 13 products, relative error ~1e-14) — instead of one complex ``c²k`` product per
  frequency; a chunk of frequencies then gets its ``G(f)`` from one small real matrix product over the offsets.
- **Gram eigenvalues where they are exact enough, ``svdvals`` elsewhere.**  ``σ = √λ(G)``, but the Gram squares the
  condition number: an eigensolver with backward error ``γ·u·‖G‖`` (``γ`` measured up to ~3.4√c) moves ``σ`` by
  about ``γ·u·λmax / (2σ)`` — harmless for large ``σ``, up to ``√(γ·u)·σmax`` for a ``σ`` near zero (1e-4..1e-3·σmax
  in complex64: outside the float32 contract; complex128 eigenvalues would cost as much as complex64 ``svdvals``).
  So every Gram result carries that a-priori bound, and frequencies where it exceeds the budget (5e-5·σmax for
  float32, 2e-11·σmax for float64) get ``svdvals`` of ``P̂`` itself (error ~u·σmax, no squaring) in the same
  precision — complex64 for ``dtype=float32``, complex128 for float64.  A probe of one frequency per worker decides
  the layer: square layers (random or trained) have a σ ≈ 0 at nearly every frequency and go to ``svdvals``
  directly; wide ones (stride 2: ``Cout × 4Cin``) keep σmin far from 0 and take the Gram, which is also smaller
  (they are probed through the Gram itself: ``svdvals`` of a wide ``P̂`` costs several of its eigenvalue calls).
- **Bounded memory.**  Everything per frequency is produced and consumed chunk by chunk (``DEFAULT_CHUNK_BYTES``
  per chunk, one chunk in flight per worker); nothing of size ``m1·m2·c²`` is held.  Peak extra memory is about
  ``workers × DEFAULT_CHUNK_BYTES`` plus the ``A_δ`` (25·c² doubles for a 3×3 kernel).
- **Threads.**  LAPACK's eigensolvers gain little from threads at these sizes (``c ≤ 640``), so on a CPU the chunks
  are spread over ``torch.get_num_threads()`` Python threads, each running single-threaded BLAS/LAPACK (torch's thread
  count is restored afterwards).  On a GPU chunks run one after another as batched calls; tensors stay on the
  kernel's device.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from ttcompress.kernel import (
    Geometry,
    Pair,
    PolyphaseLayout,
    from_polyphase,
    polyphase_layout,
    to_polyphase,
)
from ttcompress.spectral.threads import pmap, workers_for

DEFAULT_CHUNK_BYTES = 16 * 2**20  # working memory of one chunk of frequencies (one chunk in flight per worker)

_UNIT_ROUNDOFF = {torch.complex64: 2.0**-24, torch.complex128: 2.0**-53}
# per-value error budget (× σmax) below which an eigenvalue is trusted; the float32 contract is 1e-4
_BUDGET = {torch.float32: 5e-5, torch.float64: 2e-11}
_SWITCH = 0.25  # probe: above this share of frequencies the Gram cannot vouch for, the layer goes to svdvals
_PROBE = 1  # frequencies per worker in that probe
_WIDE = 2  # P̂ with at least this many times more columns than rows is probed through its Gram



def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


@dataclass(frozen=True)
class HalfGrid:
    """One frequency per conjugate pair ``{f, −f}`` of the ``m1×m2`` grid, and how many frequencies it stands for.

    Columns ``0 < f2 < m2/2`` hold all ``f1``; the self-mirrored columns ``f2 = 0`` and ``f2 = m2/2`` only
    ``f1 ≤ m1/2``.  ``weight`` is 1 for the (at most four) self-conjugate frequencies, 2 otherwise; it sums to m1·m2.
    """

    freqs: torch.Tensor  # (F, 2) int64
    weight: torch.Tensor  # (F,) int64, 1 or 2

    @classmethod
    def of(cls, grid: Pair) -> HalfGrid:
        m1, m2 = grid
        f1 = torch.arange(m1).repeat_interleave(m2 // 2 + 1)
        f2 = torch.arange(m2 // 2 + 1).repeat(m1)
        mirrored_column = (f2 == 0) | (2 * f2 == m2)
        keep = ~mirrored_column | (2 * f1 <= m1)
        self_conjugate = mirrored_column & ((2 * f1) % m1 == 0)
        weight = torch.where(self_conjugate, 1, 2)
        return cls(torch.stack([f1, f2], 1)[keep], weight[keep])


def frequency_classes(freqs: torch.Tensor, positions: torch.Tensor, grid: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    """Group frequencies whose transfer matrices agree up to a unit phase, ``P̂(f) = e^{iφ} P̂(f')``: those with equal
    ``⟨f, q_t − q_0⟩ mod m`` for every tap position.  Returns ``(representatives, inverse)``: indices into ``freqs``
    of one frequency per class, and each frequency's class.  Their Gram matrices and singular values coincide."""
    m1, m2 = grid
    rel = (positions - positions[:1]).to(freqs.device)
    keys = (freqs[:, :1] * rel[:, 0] * m2 + freqs[:, 1:] * rel[:, 1] * m1) % (m1 * m2)  # (F, T)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    n = int(inverse.max()) + 1 if len(inverse) else 0
    first = torch.full((n,), len(freqs), dtype=torch.long, device=freqs.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(freqs), device=freqs.device), reduce="amin")
    # number the classes in order of first appearance (keeps the chunks in frequency order)
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=freqs.device)
    return first[order], rank[inverse]


def _phases(freqs: torch.Tensor, positions: torch.Tensor, grid: Pair, dtype: torch.dtype) -> torch.Tensor:
    """θ[f, t] = 2π ⟨f, q_t / m⟩ for a chunk of frequencies (computed in float64 on the CPU, returned on
    ``positions``' device)."""
    scale = torch.tensor([1.0 / grid[0], 1.0 / grid[1]], dtype=torch.float64)
    angles = 2 * math.pi * (freqs.cpu().double() * scale) @ positions.cpu().double().T
    return angles.to(device=positions.device, dtype=dtype)


def _dft(flat: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, grid: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of ``Σ_t flat[t] e^{-iθ(f, q_t)}`` for a chunk of frequencies: ``(F_c, N)`` each."""
    theta = _phases(freqs, positions, grid, flat.dtype)
    return torch.cos(theta) @ flat, -(torch.sin(theta) @ flat)


def transfer_chunks(
    taps: torch.Tensor, layout: PolyphaseLayout, chunk: int | None = None, freqs: torch.Tensor | None = None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(slice into freqs, P̂ chunk of shape (F_c, Cout, Cin·s²))`` over the half grid (or ``freqs``)."""
    t, cout, cp = taps.shape
    if freqs is None:
        freqs = HalfGrid.of(layout.grid).freqs
    if chunk is None:
        per_freq = cout * cp * torch.empty((), dtype=_complex_dtype(taps.dtype)).element_size() * 4
        chunk = max(1, DEFAULT_CHUNK_BYTES // per_freq)
    flat = taps.reshape(t, cout * cp)
    positions = layout.positions.to(taps.device)
    for start in range(0, len(freqs), chunk):
        sl = slice(start, min(start + chunk, len(freqs)))
        real, imag = _dft(flat, positions, freqs[sl], layout.grid)
        yield sl, torch.complex(real, imag).reshape(-1, cout, cp)


# --- chunked, threaded execution ---------------------------------------------------------------------------------

def _spans(n: int, per_chunk: int) -> list[slice]:
    per_chunk = max(1, per_chunk)
    return [slice(s, min(s + per_chunk, n)) for s in range(0, n, per_chunk)]


_SMALL_CHUNK_BYTES = 2**20  # below this a chunk is not worth a task of its own
_SMALL_JOB_BYTES = 8 * 2**20  # below this a whole job runs on the calling thread


def _job_workers(n: int, bytes_per_item: int, workers: int) -> int:
    return workers if n * bytes_per_item >= _SMALL_JOB_BYTES else 1


def _chunk_spans(n: int, chunk: int | None, bytes_per_item: int, workers: int) -> list[slice]:
    """Chunks of at most ``DEFAULT_CHUNK_BYTES`` (or ``chunk`` items), and with several workers many chunks per
    worker so that they finish together — but not chunks so small that scheduling them costs more than it saves."""
    if chunk is None:
        bytes_per_item = max(1, bytes_per_item)
        chunk = max(1, DEFAULT_CHUNK_BYTES // bytes_per_item)
        if workers > 1:  # dynamic scheduling: many small chunks keep the workers' finishing times close
            balanced = max(math.ceil(n / (16 * workers)), _SMALL_CHUNK_BYTES // bytes_per_item)
            chunk = max(1, min(chunk, balanced))
    return _spans(n, chunk)


# --- Gram matrices of the smaller side ---------------------------------------------------------------------------

def _canonical_offset(d: Pair, grid: Pair) -> tuple[Pair, bool]:
    """The representative of the pair ``{δ, −δ}`` of grid offsets (modulo the grid, the smaller of the two), and
    whether ``δ`` is its mirror ``−κ``."""
    m1, m2 = grid
    d = (d[0] % m1, d[1] % m2)
    neg = ((-d[0]) % m1, (-d[1]) % m2)
    return (d, False) if d <= neg else (neg, True)


def _tap_offsets(positions: list[list[int]], grid: Pair) -> dict[tuple[int, int], tuple[Pair, bool]]:
    """For every ordered pair of taps ``(i, j)``: the canonical offset of ``q_i − q_j`` and whether it is mirrored."""
    return {(i, j): _canonical_offset((p[0] - q[0], p[1] - q[1]), grid)
            for i, p in enumerate(positions) for j, q in enumerate(positions)}


@dataclass(frozen=True)
class GramTerms:
    """``G(f) = Σ_s S_s cos θ(f, δ_s) − i Σ_k K_k sin θ(f, δ_k)``: the Gram matrix ``Q̂(f) Q̂(f)ᴴ`` of a polyphase
    kernel ``Q`` (``(T, c, k)`` taps) as a trigonometric polynomial in ``f``.

    With ``A_δ = Σ_{q−q'≡δ} Q_q Q_{q'}ᵀ`` (offsets modulo the grid) and ``A_{−δ} = A_δᵀ``, each pair ``{δ, −δ}``
    contributes ``(A_δ + A_δᵀ) cos θ − i (A_δ − A_δᵀ) sin θ``; a self-conjugate offset (``2δ ≡ 0``) only its
    symmetric ``A_δ cos θ``.  All in float64.
    """

    grid: Pair
    size: int
    sym_offsets: torch.Tensor  # (Ds, 2) int64
    sym: torch.Tensor  # (Ds, c·c) float64
    skew_offsets: torch.Tensor  # (Dk, 2)
    skew: torch.Tensor  # (Dk, c·c)

    @classmethod
    def of(
        cls, side: torch.Tensor, positions: torch.Tensor, grid: Pair, workers: int = 1, interpolate: bool = False
    ) -> GramTerms:
        """``interpolate`` allows :func:`_autocorrelation_by_evaluation` (Toom–Cook: 13 instead of 45 products for a
        3×3 kernel, 5 instead of 10 for a stride-2 one) at a relative error ~1e-14 instead of ~1e-16."""
        t, c, _ = side.shape
        m1, m2 = grid
        side = side.double()
        pos = positions.tolist()
        pairs: dict[Pair, list[tuple[int, int]]] = {}
        for (i, j), (key, mirrored) in _tap_offsets(pos, grid).items():
            if not mirrored:  # the mirrored pairs give A_κᵀ
                pairs.setdefault(key, []).append((i, j))
        keys = list(pairs)
        self_conjugate = [k == ((-k[0]) % m1, (-k[1]) % m2) for k in keys]
        evaluated = None
        if interpolate:
            evaluated = _autocorrelation_by_evaluation(side, pos, workers, sum(len(v) for v in pairs.values()))
        sym = side.new_zeros(len(keys), c, c)
        skew = side.new_zeros(len(keys) - sum(self_conjugate), c, c)

        def store(i: int, a: torch.Tensor, slot: list[int]) -> None:
            """Add ``A`` (all or part of ``A_κ``) to the stacks: ``A + Aᵀ`` and ``A − Aᵀ``, or ½(A + Aᵀ) if κ ≡ −κ."""
            if self_conjugate[i]:
                sym[i].add_(a, alpha=0.5).add_(a.T, alpha=0.5)
            else:
                sym[i].add_(a).add_(a.T)
                skew[slot[i]].add_(a).sub_(a.T)

        slot, n = [], 0
        for conj in self_conjugate:
            slot.append(-1 if conj else n)
            n += 0 if conj else 1
        order = {k: i for i, k in enumerate(keys)}
        if evaluated is not None:
            coeff, deg = evaluated  # (2d1+1, 2d2+1, c, c): A_δ at [δ + d]
            for a in range(2 * deg[0] + 1):
                for b in range(2 * deg[1] + 1):
                    key, mirrored = _canonical_offset((a - deg[0], b - deg[1]), grid)
                    if not mirrored:  # the offsets ≡ −κ hold A_κᵀ; several may wrap onto one κ
                        store(order[key], coeff[a, b], slot)
        else:
            def product(i: int) -> None:
                group = pairs[keys[i]]
                left = side[[a for a, _ in group]].transpose(0, 1).reshape(c, -1)
                right = side[[b for _, b in group]].transpose(0, 1).reshape(c, -1)
                store(i, left @ right.T, slot)

            pmap(product, list(range(len(keys))), workers)

        def offsets(ds: list[Pair]) -> torch.Tensor:
            return torch.tensor(ds, dtype=torch.long, device=side.device).reshape(-1, 2)

        skew_keys = [k for k, conj in zip(keys, self_conjugate) if not conj]
        return cls(grid, c, offsets(keys), sym.reshape(len(keys), c * c), offsets(skew_keys),
                   skew.reshape(len(skew_keys), c * c))

    def chunk(self, freqs: torch.Tensor, ctype: torch.dtype = torch.complex128) -> torch.Tensor:
        """``G(f)`` for a chunk of frequencies: ``(F_c, c, c)`` of ``ctype`` (accumulated in float64)."""
        re = torch.cos(_phases(freqs, self.sym_offsets, self.grid, torch.float64)) @ self.sym
        if len(self.skew):
            im = -(torch.sin(_phases(freqs, self.skew_offsets, self.grid, torch.float64)) @ self.skew)
        else:
            im = torch.zeros_like(re)
        if ctype == torch.complex64:
            re, im = re.float(), im.float()
        return torch.complex(re, im).reshape(-1, self.size, self.size)


# evaluation points per axis for a polynomial of degree d ≤ 2 (None = ∞, i.e. the leading coefficient); the set is
# closed under z ↦ 1/z (0 ↔ ∞), which maps a product to the transpose of another
_POINTS: dict[int, list[float | None]] = {0: [0.0], 1: [0.0, None, 1.0], 2: [0.0, None, 1.0, 2.0, 0.5]}


def _autocorrelation_by_evaluation(
    side: torch.Tensor, positions: list[list[int]], workers: int, direct_products: int
) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """``A_δ = Σ_{q−q'=δ} Q_q Q_{q'}ᵀ`` for every (unwrapped) offset δ, by evaluation and interpolation: a
    ``(2d1+1, 2d2+1, c, c)`` tensor with ``A_δ`` at ``[δ + d]``, and the degrees ``d``.

    Per axis, with ``d`` the degree of ``Q(z) = Σ_q Q_q z^q`` and ``R(z) = z^d Q(1/z)``, the product
    ``B(z) = Q(z) R(z)ᵀ = z^d Σ_δ A_δ z^δ`` is a matrix polynomial of degree 2d: evaluate it at 2d+1 points of
    ``{0, ∞, 1, 2, ½}`` (per axis, tensor grid in 2-D) and invert the Vandermonde matrix.  Since
    ``B(1/z) = z^{-2d} B(z)ᵀ`` (0 ↔ ∞ without the factor), about half the evaluations are transposes of others.
    None for degrees above 2 (the points would be ill-conditioned) or when it would not save products.
    """
    lo = [min(p[a] for p in positions) for a in range(2)]
    deg = (max(p[0] for p in positions) - lo[0], max(p[1] for p in positions) - lo[1])
    if max(deg) > 2:
        return None
    _, c, k = side.shape
    where = {(p[0] - lo[0], p[1] - lo[1]): i for i, p in enumerate(positions)}

    def weights(d: int, point: float | None, reverse: bool) -> list[float]:
        power = [d - q if reverse else q for q in range(d + 1)]
        if point is None:
            return [1.0 if e == d else 0.0 for e in power]
        return [point**e for e in power]  # 0.0**0 == 1

    def inverse(point: float | None, d: int) -> float | None:
        if d == 0:
            return point  # a constant: its one "point" stands for all
        return None if point == 0.0 else 0.0 if point is None else 1.0 / point

    def scale(point: float | None, d: int) -> float:
        return 1.0 if point in (0.0, None) else point ** (-2 * d)

    pts = [_POINTS[deg[0]], _POINTS[deg[1]]]
    todo: list[tuple[int, int]] = []
    mirror: dict[tuple[int, int], tuple[int, int]] = {}
    for i, p in enumerate(pts[0]):
        for j, r in enumerate(pts[1]):
            twin = (pts[0].index(inverse(p, deg[0])), pts[1].index(inverse(r, deg[1])))
            if twin in todo:
                mirror[(i, j)] = twin
            else:
                todo.append((i, j))
    if len(todo) >= direct_products:
        return None
    values = side.new_empty(len(pts[0]), len(pts[1]), c, c)

    def evaluate(ij: tuple[int, int]) -> None:
        p, r = pts[0][ij[0]], pts[1][ij[1]]
        q = side.new_zeros(c, k)
        rr = side.new_zeros(c, k)
        wq = [weights(deg[0], p, False), weights(deg[1], r, False)]
        wr = [weights(deg[0], p, True), weights(deg[1], r, True)]
        for (a, b), tap in where.items():
            if wq[0][a] * wq[1][b]:
                q.add_(side[tap], alpha=wq[0][a] * wq[1][b])
            if wr[0][a] * wr[1][b]:
                rr.add_(side[tap], alpha=wr[0][a] * wr[1][b])
        torch.matmul(q, rr.T, out=values[ij])

    pmap(evaluate, todo, workers)
    for ij, twin in mirror.items():
        p, r = pts[0][twin[0]], pts[1][twin[1]]
        torch.mul(values[twin].T, scale(p, deg[0]) * scale(r, deg[1]), out=values[ij])

    def vandermonde_inverse(d: int) -> torch.Tensor:
        rows = [weights(2 * d, p, False) for p in _POINTS[d]]
        return torch.linalg.inv(torch.tensor(rows, dtype=torch.float64))

    mix = torch.kron(vandermonde_inverse(deg[0]), vandermonde_inverse(deg[1])).to(side.device)
    return (mix @ values.reshape(len(mix), -1)).reshape(values.shape), deg


class _GramSource:
    """``Q̂(f)`` and ``G(f) = Q̂(f) Q̂(f)ᴴ`` of the smaller side of ``P̂(f)``.  The Gram comes from :class:`GramTerms`
    (built on first use) or — when the kernel has so many taps that the autocorrelation would cost more than
    per-frequency products (T² > 3F) — as ``Q̂ Q̂ᴴ`` per chunk."""

    def __init__(
        self, side: torch.Tensor, layout: PolyphaseLayout, n_freqs: int, workers: int, interpolate: bool = False
    ) -> None:
        self.side = side.double()  # (T, c, k), c ≤ k
        self.layout = layout
        self.positions = layout.positions.to(side.device)
        t, self.c, self.k = side.shape
        self.use_terms = t * t <= 3 * n_freqs
        self.workers, self.interpolate = workers, interpolate
        self._terms: GramTerms | None = None
        self._complex: dict[torch.dtype, torch.Tensor] = {}
        self._lock = threading.Lock()

    @property
    def terms(self) -> GramTerms | None:
        if self.use_terms and self._terms is None:
            self._terms = GramTerms.of(self.side, self.layout.positions, self.layout.grid, self.workers,
                                       self.interpolate)
        return self._terms

    def bytes_per_freq(self) -> int:
        return 48 * self.c * self.c + (0 if self.use_terms else 32 * self.c * self.k)

    def transfer(self, freqs: torch.Tensor, ctype: torch.dtype = torch.complex128) -> torch.Tensor:
        """``Q̂(f)`` of the side taps, ``(F_c, c, k)`` of ``ctype``: one complex product over the T taps, with the
        phases ``e^{-iθ}`` taken in float64."""
        with self._lock:
            taps = self._complex.get(ctype)
            if taps is None:
                taps = self._complex[ctype] = self.side.reshape(len(self.side), -1).to(ctype)
        theta = _phases(freqs, self.positions, self.layout.grid, torch.float64)
        phase = torch.polar(torch.ones_like(theta), -theta).to(ctype)
        return (phase @ taps).reshape(-1, self.c, self.k)

    def chunk(self, freqs: torch.Tensor, ctype: torch.dtype = torch.complex128) -> torch.Tensor:
        terms = self.terms
        if terms is not None:
            return terms.chunk(freqs, ctype)
        q = self.transfer(freqs)
        return (q @ q.mH).to(ctype)


def _side(taps: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The polyphase taps with the smaller dimension first: ``(T, c, k)``, c ≤ k; and whether they were transposed
    (``P̂ᵀ`` has the singular values of ``P̂``, and clipping commutes with the transpose)."""
    if taps.shape[1] <= taps.shape[2]:
        return taps, False
    return taps.transpose(1, 2), True


# --- singular values ---------------------------------------------------------------------------------------------

def _layout_and_taps(
    kernel: torch.Tensor, input_size: Pair, geometry: Geometry, dtype: torch.dtype | None
) -> tuple[PolyphaseLayout, torch.Tensor]:
    if kernel.ndim != 4:
        raise ValueError(f"expected a (Cout, Cin, kh, kw) kernel, got shape {tuple(kernel.shape)}")
    layout = polyphase_layout((kernel.shape[2], kernel.shape[3]), input_size, geometry)
    work = kernel.detach().to(dtype or kernel.dtype)
    return layout, to_polyphase(work, layout)


def _untrusted(lam: torch.Tensor, ctype: torch.dtype, budget: float, sigma_max: float) -> torch.Tensor:
    """Rows (frequencies) whose smallest ``√λ`` may be off by more than ``budget·σmax``, for eigenvalues from a
    ``ctype`` eigensolver with error ``|λ̃ − λ| ≤ (16 + 4√c)·u·λmax(f)``.  Measured worst cases (MKL, random,
    rank-deficient, graded and clustered spectra): 14·u at c = 16, 43·u at c = 160, 66·u at c = 640."""
    c = lam.shape[1]
    top = lam[:, -1].clamp(min=0)
    err = (16 + 4 * math.sqrt(c)) * _UNIT_ROUNDOFF[ctype] * top
    low = lam[:, 0]
    spread = (low + err).clamp(min=0).sqrt() - (low - err).clamp(min=0).sqrt()
    return spread > budget * sigma_max


class _Spectrum:
    """Singular values (ascending, float64) of ``P̂(f)`` for a set of frequencies, in the precision they need.

    Two ways per frequency: the eigenvalues of the Gram (cheap, ``c×c`` even when ``P̂`` is wide, but they lose
    small σ) and ``svdvals`` of ``P̂`` itself (error ~ u·σmax for every σ), in complex64 for ``dtype=float32`` and
    complex128 for float64.  A probe of one frequency per worker goes through ``svdvals`` (through the Gram for a wide
    ``P̂``); if the Gram would not have been trustworthy there (a σ near zero: typical of square layers), every
    frequency goes through ``svdvals``, otherwise the Gram is used and the frequencies it cannot vouch for
    (:func:`_untrusted`, with the final σmax) are redone with ``svdvals``.
    """

    def __init__(self, source: _GramSource, freqs: torch.Tensor, dtype: torch.dtype, chunk: int | None,
                 workers: int) -> None:
        self.source, self.freqs, self.chunk, self.workers = source, freqs, chunk, workers
        self.budget = _BUDGET.get(dtype, _BUDGET[torch.float32])
        self.ctype = torch.complex64 if dtype == torch.float32 else torch.complex128
        self.sigma = torch.empty(len(freqs), source.c, dtype=torch.float64, device=freqs.device)
        self.exact = torch.zeros(len(freqs), dtype=torch.bool, device=freqs.device)  # from svdvals

    def _svd(self, rows: torch.Tensor | slice) -> None:
        freqs = self.freqs[rows]
        size = 40 * self.source.c * self.source.k
        workers = _job_workers(len(freqs), size, self.workers)
        spans = _chunk_spans(len(freqs), self.chunk, size, workers)
        ctype = self.ctype

        def svdvals(s: slice) -> torch.Tensor:
            return torch.linalg.svdvals(self.source.transfer(freqs[s], ctype)).flip(-1).double()

        parts = pmap(svdvals, spans, workers)
        if parts:
            self.sigma[rows] = torch.cat(parts)
            self.exact[rows] = True

    def _gram(self, rows: slice) -> torch.Tensor:
        freqs = self.freqs[rows]
        workers = _job_workers(len(freqs), self.source.bytes_per_freq(), self.workers)
        spans = _chunk_spans(len(freqs), self.chunk, self.source.bytes_per_freq(), workers)
        ctype = self.ctype
        parts = pmap(lambda s: torch.linalg.eigvalsh(self.source.chunk(freqs[s], ctype)).double(), spans, workers)
        return torch.cat(parts) if parts else self.sigma.new_empty(0, self.source.c)

    def compute(self) -> torch.Tensor:
        n = len(self.freqs)
        probe = slice(0, min(n, self.workers * _PROBE))
        # a wide P̂ (k ≥ 2c, e.g. stride 2) is probed through its Gram, whose eigenvalues are then kept: its svdvals
        # cost several eigvalsh of the Gram, and such layers rarely need them; a square-ish one through svdvals
        wide = self.source.k >= _WIDE * self.source.c
        if wide:
            seen = self._gram(probe)
        else:
            self._svd(probe)
            seen = self.sigma[probe] ** 2
        top = float(seen[:, -1].clamp(min=0).max().sqrt()) if len(seen) else 0.0
        gram = slice(0 if wide else probe.stop, n)  # what the Gram decides, or svdvals redoes wholesale
        if float(_untrusted(seen, self.ctype, self.budget, top).double().mean()) > _SWITCH:
            self._svd(gram)
            return self.sigma
        rest = self._gram(slice(probe.stop, n))
        lam = torch.cat([seen, rest]) if wide else rest
        self.sigma[gram] = lam.clamp(min=0).sqrt()
        sigma_max = float(self.sigma[:, -1].max()) if n else 0.0
        redo = torch.zeros(n, dtype=torch.bool, device=self.freqs.device)
        redo[gram] = _untrusted(lam, self.ctype, self.budget, sigma_max)
        self._svd(redo.nonzero().flatten())
        return self.sigma


@dataclass
class _Problem:
    """The polyphase set-up the spectra and the clip share: the layout, the taps of every phase and of the used
    input phases with the smaller side first (``side``, :func:`_side`), the half grid of frequencies with their
    weights, the classes of frequencies with the same Gram and the Gram source."""

    layout: PolyphaseLayout
    taps: torch.Tensor  # (T, Cout, Cin·s²), every phase
    used: torch.Tensor | None  # the input phases that are used (None: all)
    side: torch.Tensor  # (T, c, k), c ≤ k
    transposed: bool
    freqs: torch.Tensor  # the half grid
    weight: torch.Tensor  # how many frequencies of the full grid each one stands for
    reps: torch.Tensor  # one frequency per class ...
    inverse: torch.Tensor  # ... and each frequency's class
    source: _GramSource
    workers: int

    @classmethod
    def of(cls, kernel: torch.Tensor, input_size: Pair, geometry: Geometry, dtype: torch.dtype,
           taps_dtype: torch.dtype | None = None) -> _Problem:
        """The set-up for ``dtype`` (float32: complex64 Grams, interpolated), with the taps in ``taps_dtype``
        (default ``dtype``)."""
        layout, taps = _layout_and_taps(kernel, input_size, geometry, dtype)
        if taps_dtype is not None:
            taps = taps.to(taps_dtype)
        used = layout.used_channels(taps.shape[2] // layout.phases)
        if used is not None:
            used = used.to(taps.device)
        side, transposed = _side(taps if used is None else taps[:, :, used])
        grid = HalfGrid.of(layout.grid)
        freqs = grid.freqs.to(taps.device)
        workers = workers_for(taps.device)
        reps, inverse = frequency_classes(freqs, layout.positions, layout.grid)
        source = _GramSource(side, layout, len(reps), workers, interpolate=dtype != torch.float64)
        return cls(layout, taps, used, side, transposed, freqs, grid.weight, reps, inverse, source, workers)

    def frequency_singular_values(self, dtype: torch.dtype, chunk: int | None) -> torch.Tensor:
        """``(F, min(Cout, Cin·s²))`` singular values (ascending, float64) of ``P̂(f)`` over the half grid."""
        full = min(self.taps.shape[1], self.taps.shape[2])
        sigma = _Spectrum(self.source, self.freqs[self.reps], dtype, chunk, self.workers).compute()[self.inverse]
        if sigma.shape[1] < full:  # unused phases: zero columns of P̂
            sigma = torch.cat([sigma.new_zeros(len(sigma), full - sigma.shape[1]), sigma], 1)
        return sigma

    def taps_with(self, side: torch.Tensor) -> torch.Tensor:
        """Every phase's taps, with ``side`` (the shape of :attr:`side`) in place of the used phases'."""
        new = side.transpose(1, 2) if self.transposed else side
        if self.used is not None:
            new = self.taps.index_copy(2, self.used, new.contiguous())
        return new.contiguous()


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
    ``dtype`` float32: every value within 5e-5·σmax (contract: 1e-4·σmax), returned as float32; float64: within
    2e-11·σmax.  ``chunk`` is the number of frequencies per batched eigensolver call (default: sized by
    ``DEFAULT_CHUNK_BYTES``).
    """
    problem = _Problem.of(kernel, input_size, geometry, dtype)
    sigma = problem.frequency_singular_values(dtype, chunk)
    values = sigma.repeat_interleave(problem.weight.to(sigma.device), dim=0).flatten()
    return torch.sort(values, descending=True).values.to(dtype)


def sigma_max(kernel: torch.Tensor, input_size: Pair, geometry: Geometry = Geometry(), **kw) -> float:
    """The largest singular value (``singular_values(...)[0]``)."""
    return float(singular_values(kernel, input_size, geometry, **kw)[0])


# --- clipping ----------------------------------------------------------------------------------------------------

_OFFSET_BYTES = 8 * DEFAULT_CHUNK_BYTES  # most memory for one worker's float64 B(δ) accumulators in clip


def _offset_form_cheaper(active: int, n_freqs: int, taps: int, c: int, k: int, n_offsets: int) -> bool:
    """Whether :func:`clip` should sum the change of a chunk of frequencies with ``active`` eigenpairs above the
    bound through the tap offsets: fewer real flops per frequency (float64 ones weigh double: they run at half the
    single-precision rate), the final ``T²`` products shared by all ``n_freqs`` frequencies, and each worker's
    ``(D, c, c)`` accumulator within ``_OFFSET_BYTES``."""
    per_frequency = 8 * 2 * c * active * k  # U_kᴴ Q̂ and U_k (·): complex products
    offsets = 8 * c * c * active + 2 * 2 * n_offsets * c * c + 2 * 2 * taps * taps * c * c * k / max(1, n_freqs)
    return offsets < per_frequency and 8 * n_offsets * c * c <= _OFFSET_BYTES


def clip(
    kernel: torch.Tensor,
    input_size: Pair,
    bound: float,
    geometry: Geometry = Geometry(),
    *,
    dtype: torch.dtype = torch.float32,
    chunk: int | None = None,
    accumulate: Literal["auto", "frequency", "offsets"] = "auto",
) -> torch.Tensor:
    """Sedghi's projection: clip every singular value of the periodic strided conv at ``bound``, transform back,
    and keep the kernel's own support (``kh×kw`` taps).  Returns a kernel of the input's shape and dtype.

    Without the crop this would be the exact nearest operator with σmax ≤ bound; the crop makes it approximate,
    so callers that need a guarantee verify with :func:`singular_values` (see ``ttcompress.control``).

    Per frequency only the part above the bound changes: with ``G = P̂P̂ᴴ = U Λ Uᴴ`` (the smaller side),
    ``clip(P̂) = P̂ − U_k diag(1 − bound/σ_k) U_kᴴ P̂`` over the ``k`` eigenpairs with ``σ > bound`` (no division by
    small σ), so the kernel becomes ``kernel − crop(IDFT(Δ))``.  Frequencies with nothing above the bound are skipped:
    a cheap eigenvalue pass finds them, and is dropped once most frequencies turn out to be active.  ``dtype`` float32
    uses complex64 eigendecompositions of the Gram (operator error ~ u·σmax³/bound², about 1e-6 of the kernel at
    σmax ≈ 2·bound), float64 complex128.

    ``accumulate`` is how the change gets back to the taps, both exact: ``"frequency"`` forms ``Δ(f)`` per
    frequency (two complex products with ``Cin·s²`` columns), ``"offsets"`` only the ``c×c`` ``H(f)`` and sums it
    over the tap offsets, then takes ``T²`` real products once (fewer flops when many eigenpairs are above the bound
    and there are many frequencies or ``P̂`` is wide, e.g. 32×32 inputs or stride 2); ``"auto"`` picks per chunk of
    frequencies by flop count.
    """
    if bound <= 0:
        raise ValueError(f"clip bound must be positive, got {bound}")
    if accumulate not in ("auto", "frequency", "offsets"):
        raise ValueError(f"accumulate must be 'auto', 'frequency' or 'offsets', got {accumulate!r}")
    problem = _Problem.of(kernel, input_size, geometry, dtype, taps_dtype=torch.float64)
    ctype = _complex_dtype(dtype)
    change = _Change(problem, ctype, accumulate)
    work = _ClipPass(problem, change, bound, ctype)
    c, k = problem.source.c, problem.source.k
    per_freq = 16 * (4 * c * c + 5 * c * k)
    workers = _job_workers(len(problem.freqs), per_freq, problem.workers)
    pmap(work, _chunk_spans(len(problem.freqs), chunk, per_freq, workers), workers)
    grid = problem.layout.grid
    new_side = problem.side - (change.total() / (grid[0] * grid[1])).reshape(problem.side.shape)
    out = from_polyphase(problem.taps_with(new_side), problem.layout, (kernel.shape[2], kernel.shape[3]))
    return out.to(kernel.dtype)


def _above(g: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Eigenpairs above the bound of a chunk of Grams: ``u`` (F_c, c, count) and ``shrink = 1 − bound/σ``
    (None when no Gram has one)."""
    lam, u = torch.linalg.eigh(g)
    shrink = (1 - bound / lam.clamp(min=0).sqrt()).clamp(min=0)  # σ = 0 gives −inf → 0
    count = int((shrink > 0).sum(-1).max()) if len(shrink) else 0
    if count == 0:
        return None
    return u[..., -count:], shrink[..., -count:]


class _ClipPass:
    """What each worker does with its chunks of frequencies in :func:`clip`: find the eigenpairs above the bound
    and add their change to ``change``.

    Few distinct Grams (a 1×1 or dilated kernel): one eigendecomposition per class of frequencies, shared by its
    members.  Otherwise per chunk, after a cheap eigenvalue pass that skips the frequencies with nothing above the
    bound; that pass is dropped once a chunk shows most frequencies active (they need the eigenvectors anyway).
    """

    def __init__(self, problem: _Problem, change: _Change, bound: float, ctype: torch.dtype) -> None:
        self.problem, self.change, self.bound, self.ctype = problem, change, bound, ctype
        self.threshold = bound * bound * (1 - 1e-4)  # margin of the eigenvalue pass, far above its error
        self.prefilter = True
        self.shared = None
        p = problem
        c = p.source.c
        self.by_class = len(p.reps) < len(p.freqs) and 32 * len(p.reps) * c * c <= DEFAULT_CHUNK_BYTES
        if self.by_class:
            self.shared = _above(p.source.chunk(p.freqs[p.reps], ctype), bound)
        self.weight = p.weight.to(p.freqs.device, torch.float64)

    def __call__(self, s: slice) -> None:
        p = self.problem
        fr, w = p.freqs[s], self.weight[s]
        if self.by_class:
            if self.shared is not None:
                cls = p.inverse[s]
                self.change.add(fr, w, self.shared[0][cls], self.shared[1][cls])
            return
        g = p.source.chunk(fr, self.ctype)
        if self.prefilter:
            active = (torch.linalg.eigvalsh(g)[:, -1] > self.threshold).nonzero().flatten()
            if 2 * len(active) > len(fr):
                self.prefilter = False
            if len(active) == 0:
                return
            if len(active) < len(fr):
                g, fr, w = g[active], fr[active], w[active]
        found = _above(g, self.bound)
        if found is not None:
            self.change.add(fr, w, *found)


class _Change:
    """The kernel change of :func:`clip`, ``Σ_f w_f Re(Δ(f) e^{iθ(f, q_t)})`` for every tap position ``q_t``,
    summed over chunks of frequencies by several worker threads (one float64 accumulator per thread and form).

    ``Δ(f) = U diag(shrink) Uᴴ Q̂(f)`` is added per chunk in one of two exact forms: ``"frequency"`` at the support
    positions (``(T, c·k)``), or ``"offsets"``: through the tap offsets δ, ``B(δ) = Σ_f w_f Re(H(f) e^{+iθ(f,δ)})``
    of ``H = U diag(shrink) Uᴴ`` (``(D, c·c)``), since ``Σ_f w_f Re(Δ(f) e^{iθ(f,q_t)}) = Σ_t' B(q_t − q_t') Q_t'``;
    ``"auto"`` picks whichever costs less for the chunk's number of active eigenpairs.  The 1/M comes later.
    """

    def __init__(self, problem: _Problem, ctype: torch.dtype, form: str) -> None:
        self.problem, self.ctype, self.form = problem, ctype, form
        device = problem.freqs.device
        self.positions = problem.layout.positions.to(device)
        self.pairs = _tap_offsets(problem.layout.positions.tolist(), problem.layout.grid)
        self.keys = sorted({key for key, _ in self.pairs.values()})
        self.offsets = torch.tensor(self.keys, dtype=torch.long, device=device).reshape(-1, 2)
        self.parts: dict[str, list[torch.Tensor]] = {"frequency": [], "offsets": []}  # one per worker thread
        self.local, self.lock = threading.local(), threading.Lock()

    def add(self, fr: torch.Tensor, w: torch.Tensor, u: torch.Tensor, shrink: torch.Tensor) -> None:
        """Add the change of a chunk of frequencies ``fr`` (weights ``w``) with eigenvectors ``u`` to shrink."""
        p = self.problem
        scaled = u * shrink.unsqueeze(-2).to(self.ctype)
        form = self.form
        if form == "auto":
            cheaper = _offset_form_cheaper(u.shape[-1], len(p.freqs), len(p.side), p.source.c, p.source.k,
                                           len(self.keys))
            form = "offsets" if cheaper else "frequency"
        if form == "offsets":
            self._transform(form, fr, w, self.offsets, scaled @ u.mH)
        else:
            self._transform(form, fr, w, self.positions, scaled @ (u.mH @ p.source.transfer(fr, self.ctype)))

    def _transform(self, form: str, fr: torch.Tensor, w: torch.Tensor, at: torch.Tensor, values: torch.Tensor
                   ) -> None:
        """Add ``Σ_f w_f Re(values(f) e^{+iθ(f, p)})`` for each grid position ``p`` of ``at`` to this thread's
        ``(len(at), ·)`` float64 accumulator of ``form``."""
        theta = _phases(fr, at, self.problem.layout.grid, torch.float64)
        cos, sin = (w.unsqueeze(1) * torch.cos(theta)).T, (w.unsqueeze(1) * torch.sin(theta)).T  # (·, F_c)
        flat = values.reshape(len(fr), -1)
        mine = getattr(self.local, "totals", None)
        if mine is None:
            mine = self.local.totals = {}
        if form not in mine:
            mine[form] = torch.zeros(len(at), flat.shape[1], dtype=torch.float64, device=flat.device)
            with self.lock:
                self.parts[form].append(mine[form])
        mine[form].addmm_(cos, flat.real.double()).addmm_(sin, flat.imag.double(), alpha=-1)

    def total(self) -> torch.Tensor:
        """The summed change at the support positions, ``(T, c, k)`` (offsets form: ``Σ_t' B(q_t − q_t') Q_t'``)."""
        side = self.problem.side
        c, k = side.shape[1], side.shape[2]
        total = side.new_zeros(len(side), c, k)
        for part in self.parts["frequency"]:
            total += part.reshape(total.shape)
        if self.parts["offsets"]:
            b = self.parts["offsets"][0]
            for part in self.parts["offsets"][1:]:
                b += part
            b = b.reshape(len(self.keys), c, c)
            index = {key: i for i, key in enumerate(self.keys)}
            stacked = side.reshape(len(side) * c, k)

            def block(i: int, j: int) -> torch.Tensor:
                key, mirrored = self.pairs[(i, j)]
                return b[index[key]].T if mirrored else b[index[key]]  # B(−κ) = B(κ)ᵀ
            for i in range(len(side)):
                total[i] += torch.cat([block(i, j) for j in range(len(side))], 1) @ stacked
        return total
