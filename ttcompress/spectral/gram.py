"""Gram iteration: certified upper bounds on σmax of a convolution, periodic (circular) or zero-padded.

Delattre, Barthélemy, Araujo and Allauzen (ICML 2023) bound a matrix's largest singular value by iterated Gram
matrices: with ``G_1 = MᴴM`` and ``G_{t+1} = G_tᴴ G_t``, ``G_t`` is Hermitian positive semi-definite with eigenvalues
``σ_i^{2^t}``, so

    σ1(M) ≤ ‖G_t‖_F^{1/2^t} = (Σ_i σ_i^{2^{t+1}})^{1/2^{t+1}},

the Schatten-``2^{t+1}`` norm of ``M``.  It is an upper bound at every ``t``, non-increasing in ``t`` and at most
``r^{1/2^{t+1}}·σ1`` for ``M`` of rank ``r``: super-linear convergence.  Each step is rescaled to unit Frobenius norm
with the logarithm of the scale carried along (``G_t`` itself over- or underflows after a few steps); everything is
float64.

**Periodic conv** (:func:`gram_bound`).  The periodic strided conv is block diagonal in the DFT basis after the
polyphase split (:mod:`ttcompress.spectral.periodic`): its σmax is ``max_f σ1(P̂(f))``.  The bound is
``max_f ‖G_t(f)‖_F^{1/2^t}`` with ``G_1(f) = Q̂(f) Q̂(f)ᴴ`` the Gram of the smaller side of ``P̂(f)`` — taken from
:class:`~ttcompress.spectral.periodic.GramTerms` as the exact spectrum takes it (one distinct frequency per conjugate
pair and per class of equal phases, idle polyphase channels dropped).  ``t = iters`` counts Gram products, as in the
paper: ``t = 1`` is ``‖Q̂Q̂ᴴ‖_F^{1/2}``, each further one squares.

*Only the blocks that can hold the maximum are iterated.*  ``t`` batched ``c×c`` products for every frequency would
cost more than the exact spectrum on a CPU.  Instead: the block with the largest lower bound ``‖G‖_F/√tr G ≤ σ1``
is iterated; its bound ``B`` is a bar that every other block must be *proven* to stay under — by its ``t = 1`` bound
``‖G‖_F^{1/2} ≤ B`` (free), or by a Cholesky factorisation of ``B²(1 − η)I − G(f)``, which completes only for a
positive definite matrix, i.e. ``λmax(G(f)) < B²`` (a sixth of a product's flops; measured on this CPU, from
about one product's time at ``c = 160`` to a third of it at ``c = 640``).  A block
that fails (its σ1 is at or above the bar) is iterated in turn — the likeliest first, ranked by a few power steps —
and raises the bar if its bound ends above it; an iteration stops early once the block's bound falls to the bar
(bounds only decrease with ``t``).  The result is the largest Gram bound among the iterated blocks, with every other
block certified below it: a proven upper bound of ``max_f σ1(P̂(f))``, never above the plain
``max_f ‖G_t(f)‖_F^{1/2^t}`` over all blocks, and equal to it whenever the maximum of the plain form sits at the
block with the largest σ1 (on ResNet-20, always).

**Rounding.**  The bound is a theorem in exact arithmetic.  In float64 the products, the Cholesky test and the forming
of ``G(f)`` (Toom–Cook interpolation of the channel autocorrelation, ~1e-14) err by a relative ``O(c²u)`` at most
(``u = 2⁻⁵³``); the certificate's ``η`` and a final factor ``1 + η`` with ``η = 8c(c+1)u + 1e-12`` (below 4e-10 for
``c ≤ 640``) cover it, so the value is ≥ the exact σmax also for rank-one blocks, where the two coincide.

**Zero padding** (:func:`gram_zero_padding_bound`).  Per axis, a layer with input size ``n``, kernel ``k``, stride
``s``, dilation ``d`` and padding ``(p_l, p_r)`` computes ``m = ⌊(n + p_l + p_r − d(k−1) − 1)/s⌋ + 1`` outputs
reading padded positions up to ``e = s(m−1) + d(k−1)``.  Embed the input into a periodic grid of size
``N ≥ max(n + p_l, e − p_l + 1, s·m)``, ``N`` divisible by ``s`` (zeros beyond ``n``).  The periodic conv on that grid,
shifted by ``p_l``, reads position ``u = s·i + d·a − p_l ∈ [−p_l, e − p_l]`` for output ``i < m``: for ``0 ≤ u < n`` the
input, for ``u < 0`` the wrapped position ``N + u ≥ n`` (a zero, as the left padding), for ``u ≥ n`` a position
``< N`` that holds a zero (as the right padding).  So ``A_zero = R·C_N·E``: ``E`` the zero-extending isometry,
``C_N`` the periodic conv (a circular shift of the input changes no singular value), ``R`` the restriction to the
first ``m`` outputs (``m ≤ N/s``) — and ``‖A_zero‖ ≤ ‖C_N‖ ≤`` the Gram bound of ``C_N``.  In 2-D the embedding and
restriction are Kronecker products of the per-axis ones.  For "same" padding ``N = n + k − 1`` meets the conditions
(before rounding up to the stride); :func:`zero_padding_grid` takes the smallest ``N`` that does (``n + 1`` for 3×3).  A TT layer is ``Q_l·C'·Q_f`` with
orthonormal frames after QR, so the bound of the QR-folded core ``C'`` (same padding) holds for it too.

**Differentiable** (:func:`gram_bound` on a kernel that requires grad, :func:`gram_penalty`).  The maximum over
frequencies has the (sub)gradient of its argmax: the frequency is found without autograd, and only its transfer
matrix ``P̂(f*)`` is rebuilt from the kernel (``to_polyphase`` and the DFT are differentiable) and iterated with
autograd — the same value, at the cost of one frequency.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ttcompress.kernel import Geometry, Size, group_kernels, ntuple, polyphase_layout, to_polyphase
from ttcompress.spectral import periodic
from ttcompress.spectral.threads import pmap, workers_for
from ttcompress.tt import TTConv, conv_layers, effective_factors

__all__ = [
    "DEFAULT_ITERS", "GramSearch", "gram_bound", "gram_penalty", "gram_search", "gram_zero_padding_bound",
    "layer_gram_bound", "zero_padding_grid",
]

DEFAULT_ITERS = 8
"""Gram products per frequency; within 1e-3 of the exact periodic σmax on every conv of the pretrained ResNet-20."""

_POWER_STEPS = 20  # power steps ranking the blocks that fail their certificate
_KEEP_BYTES = 64 * 2**20  # at most this much of G(f) is kept from the first pass
_COPYING_PADDING = ("reflect", "replicate")


@dataclass(frozen=True)
class GramSearch:
    """The Gram bound of a periodic conv and where it is attained: ``frequency`` on the polyphase grid
    (``m = n/s``) of the block that gives ``bound`` (None for a zero kernel)."""

    bound: float
    frequency: tuple[int, int] | None
    iters: int


def _check_iters(iters: int) -> None:
    if int(iters) != iters or iters < 1:
        raise ValueError(f"Gram iterations must be a positive integer, got {iters!r}")


def _frobenius(g: torch.Tensor) -> torch.Tensor:
    """‖g‖_F of each matrix of a complex batch (``matrix_norm`` is several times slower on complex input)."""
    return torch.linalg.vector_norm(torch.view_as_real(g), dim=(-3, -2, -1))


def _log_gram(g: torch.Tensor, iters: int, floor: float = -math.inf) -> torch.Tensor:
    """``log ‖G_iters‖_F / 2^iters`` for a batch of Grams ``g = G_1`` ``(F, c, c)``: the log of the Gram bound on
    σ1 of each block, each step rescaled to unit Frobenius norm.  A row leaves (with ``−inf``) as soon as its log
    bound is ``≤ floor``: bounds only decrease with the level, so it could not end above ``floor``.  A zero block
    gives ``−inf``.  Differentiable."""
    out = g.real.new_full((g.shape[0],), -math.inf)
    rows = torch.arange(g.shape[0], device=g.device)
    log_scale = g.real.new_zeros(g.shape[0])
    for level in range(1, iters + 1):
        if level > 1:
            g = g.mH @ g
        norm = _frobenius(g)
        log_scale = 2 * log_scale + torch.log(norm)
        upper = log_scale / 2**level
        keep = upper > floor  # a zero block (log 0 = −inf) leaves here
        if level == iters or not bool(keep.any()):
            return out.index_put((rows[keep],), upper[keep])
        if not bool(keep.all()):
            g, norm, log_scale, rows = g[keep], norm[keep], log_scale[keep], rows[keep]
        g = g / norm.reshape(-1, 1, 1).to(g.dtype)
    return out


def _power_estimate(g: torch.Tensor, steps: int = _POWER_STEPS) -> torch.Tensor:
    """Rayleigh quotients ``vᴴGv/vᴴv ≤ λmax(G)`` after ``steps`` power steps from a fixed start: which block is
    likeliest to hold the maximum (a ranking only; nothing is certified with it)."""
    start = torch.linspace(1.0, 2.0, g.shape[-1], dtype=torch.float64, device=g.device)
    v = start.to(g.dtype).expand(g.shape[0], -1).unsqueeze(-1)
    for _ in range(steps):
        v = g @ v
        v = v / _frobenius(v).reshape(-1, 1, 1).clamp_min(torch.finfo(torch.float64).tiny).to(g.dtype)
    return (v.mH @ (g @ v)).real.flatten()


def _rounding(c: int) -> float:
    """Relative slack covering float64 rounding for ``c×c`` blocks: a Cholesky factorisation that completes has
    backward error ``‖ΔA‖₂ ≤ γ_{c+1}·tr A ≤ γ_{c+1}·c·‖A‖₂`` (Higham, Thm 10.3; complex arithmetic costs a small
    factor, hence 8), the Gram products lose about as much per level, and ``G(f)`` is formed to ~1e-14 (Toom–Cook
    interpolation of the channel autocorrelation)."""
    return 8 * (c + 1) * c * 2.0**-53 + 1e-12


def _certified_below(g: torch.Tensor, log_bound: float) -> torch.Tensor:
    """Which blocks provably have ``λmax(G(f)) < e^{2·log_bound}``: those where the Cholesky factorisation of
    ``e^{2·log_bound}(1 − η) I − G(f)`` completes (``η`` = :func:`_rounding`), which proves it positive definite."""
    c = g.shape[-1]
    shift = math.exp(2 * log_bound) * (1 - _rounding(c))
    eye = torch.eye(c, dtype=g.dtype, device=g.device)
    _, info = torch.linalg.cholesky_ex(shift * eye - g)
    return info == 0


def _spans(n: int, chunk: int | None, per_freq: int, workers: int) -> list[slice]:
    """Chunks of a job of ``n`` frequencies, as the exact spectrum cuts them."""
    return periodic._chunk_spans(n, chunk, per_freq, periodic._job_workers(n, per_freq, workers))


def _as_2d(kernel: torch.Tensor, input_size: Sequence[int], geometry: Geometry) -> tuple[torch.Tensor, Size, Geometry]:
    """A 1-D conv as the 2-D ``(Cout, Cin, 1, k)`` conv on a ``1 × n`` input (the same operator); 2-D unchanged."""
    if kernel.ndim == 3:
        return (kernel.unsqueeze(2), (1, int(input_size[0])),
                Geometry((1, geometry.stride[0]), (1, geometry.dilation[0])))
    if kernel.ndim != 4:
        raise ValueError(f"the Gram bound is implemented for 1-D and 2-D convs, got kernel shape {tuple(kernel.shape)}")
    return kernel, (int(input_size[0]), int(input_size[1])), geometry


def gram_search(
    kernel: torch.Tensor,
    input_size: Sequence[int],
    geometry: Geometry = Geometry(),
    *,
    iters: int = DEFAULT_ITERS,
    chunk: int | None = None,
) -> GramSearch:
    """Gram bound (``iters`` products) on σmax of the periodic conv with ``kernel`` on an ``input_size`` input,
    computed in float64 on the blocks that can hold the maximum, every other block certified below it (module
    docstring); no autograd.  1-D and 2-D kernels.  ``chunk``: frequencies per batched call (default: bounded memory,
    as for the exact spectrum)."""
    _check_iters(iters)
    kernel, size, geometry = _as_2d(kernel.detach(), input_size, geometry)
    layout, taps = periodic._layout_and_taps(kernel, size, geometry, torch.float64)
    used = layout.used_channels(taps.shape[2] // layout.phases)
    if used is not None:
        taps = taps[:, :, used.to(taps.device)]
    side, _ = periodic._side(taps)
    freqs = periodic.HalfGrid.of(layout.grid).freqs.to(taps.device)
    reps, _ = periodic.frequency_classes(freqs, layout.positions, layout.grid)
    freqs = freqs[reps]
    workers = workers_for(taps.device)
    source = periodic._GramSource(side, layout, len(freqs), workers, interpolate=True)
    c = source.c
    per_freq = 64 * c * c
    spans = _spans(len(freqs), chunk, per_freq, workers)

    keep = len(freqs) * 16 * c * c <= _KEEP_BYTES  # hold every G(f) between the passes, or rebuild the few needed

    # level 1 everywhere: ‖G‖_F^{1/2} (the t = 1 bound) and the lower bound ‖G‖_F/√tr G ≤ σ1
    def first(s: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        g = source.chunk(freqs[s])
        log_norm = torch.log(_frobenius(g))
        trace = torch.diagonal(g, dim1=-2, dim2=-1).real.sum(-1)
        return 0.5 * log_norm, log_norm - 0.5 * torch.log(trace), g if keep else None

    parts = pmap(first, spans, workers)
    upper1 = torch.cat([u for u, _, _ in parts])
    lower1 = torch.cat([v for _, v, _ in parts])
    lower1 = torch.where(torch.isnan(lower1), -math.inf, lower1)  # −inf + inf for a zero block
    grams = torch.cat([g for _, _, g in parts]) if keep and parts else None
    del parts
    if not len(freqs) or not bool(torch.isfinite(upper1).any()):
        return GramSearch(0.0, None, iters)

    def gram(index: torch.Tensor) -> torch.Tensor:
        return grams[index] if grams is not None else source.chunk(freqs[index])

    def iterate(index: int, floor: float) -> float:
        return float(_log_gram(gram(torch.tensor([index], device=freqs.device)), iters, floor)[0])

    # the whole iteration on the likeliest maximum; its bound is the bar every other block must be shown under:
    # by its t = 1 bound, or by a Cholesky certificate.  A block that fails (σ1(f) at or above the bar) is iterated
    # in turn — the likeliest first, by a few power steps — and raises the bar if its bound ends above it
    where = int(torch.argmax(lower1))
    log_bound = iterate(where, -math.inf)
    pending = torch.ones(len(freqs), dtype=torch.bool, device=freqs.device)
    pending[where] = False
    pending = (pending & (upper1 > log_bound)).nonzero().flatten()
    while len(pending):
        spans = _spans(len(pending), chunk, per_freq, workers)
        certified = torch.cat(pmap(lambda s: _certified_below(gram(pending[s]), log_bound), spans, workers))
        pending = pending[~certified]
        if not len(pending):
            break
        spans = _spans(len(pending), chunk, per_freq, workers)
        likeliest = int(torch.argmax(torch.cat(pmap(lambda s: _power_estimate(gram(pending[s])), spans, workers))))
        index = int(pending[likeliest])
        found = iterate(index, log_bound)  # −inf once it falls to the bar
        if found > log_bound:
            log_bound, where = found, index
        pending = torch.cat([pending[:likeliest], pending[likeliest + 1:]])
    bound = math.exp(log_bound) * (1 + _rounding(c))
    return GramSearch(bound, tuple(freqs[where].tolist()), iters)


def gram_bound(
    kernel: torch.Tensor,
    input_size: Sequence[int],
    geometry: Geometry = Geometry(),
    *,
    iters: int = DEFAULT_ITERS,
    chunk: int | None = None,
) -> torch.Tensor:
    """Upper bound on σmax of the periodic (circular) conv with ``kernel`` (``(Cout, Cin, kh, kw)`` or
    ``(Cout, Cin, k)``) on an ``input_size`` input, stride and dilation from ``geometry``: the Gram iteration with
    ``iters`` products on every frequency block (:func:`gram_search`).  A 0-dim tensor in the kernel's dtype;
    differentiable in ``kernel`` (through the block that attains the maximum) when it requires grad."""
    return _attach(kernel, input_size, geometry, gram_search(kernel, input_size, geometry, iters=iters, chunk=chunk))


def _attach(kernel: torch.Tensor, input_size: Sequence[int], geometry: Geometry, found: GramSearch) -> torch.Tensor:
    """``found.bound`` as a 0-dim tensor in the kernel's dtype — when ``kernel`` requires grad, recomputed with
    autograd from the transfer matrix of ``kernel`` at ``found.frequency`` (a kernel with the same periodic
    operator's nonzero singular values as the one searched, e.g. a TT layer's dense kernel for its QR-folded core)."""
    if not (kernel.requires_grad and torch.is_grad_enabled()) or found.frequency is None:
        return torch.tensor(found.bound, dtype=kernel.dtype, device=kernel.device)
    kernel, size, geometry = _as_2d(kernel, input_size, geometry)
    layout = polyphase_layout((kernel.shape[2], kernel.shape[3]), size, geometry)
    freq = torch.tensor([found.frequency], dtype=torch.long, device=kernel.device)
    _, q = next(periodic.transfer_chunks(to_polyphase(kernel.double(), layout), layout, freqs=freq))
    g = q @ q.mH if q.shape[1] <= q.shape[2] else q.mH @ q
    value = torch.exp(_log_gram(g, found.iters)[0])
    return (value + (found.bound - float(value.detach()))).to(kernel.dtype)  # the search's value, this block's gradient


def _pads(padding: Sequence[int] | str, kernel_size: Size, dilation: Size) -> list[tuple[int, int]]:
    """Zeros added before and after each axis: ``int`` padding, ``"valid"``, or ``"same"`` (PyTorch puts the odd
    one after)."""
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * len(kernel_size)
        if padding == "same":
            total = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
            return [(t // 2, t - t // 2) for t in total]
        raise ValueError(f"unknown padding {padding!r}")
    return [(int(p), int(p)) for p in ntuple(padding if isinstance(padding, int) else tuple(padding), len(kernel_size))]


def zero_padding_grid(
    kernel_size: Sequence[int], input_size: Sequence[int], geometry: Geometry, padding: Sequence[int] | str
) -> Size:
    """The smallest periodic grid (per axis) whose conv contains the zero-padded layer as a submatrix: per axis the
    least multiple of the stride ``≥ max(n + p_l, e − p_l + 1, s·m)`` (module docstring: ``m`` outputs, reading
    padded positions up to ``e``)."""
    kernel_size, input_size = tuple(kernel_size), tuple(int(n) for n in input_size)
    grid = []
    for n, k, s, d, (left, right) in zip(input_size, kernel_size, geometry.stride, geometry.dilation,
                                          _pads(padding, kernel_size, geometry.dilation)):
        m = (n + left + right - d * (k - 1) - 1) // s + 1
        if m < 1:
            raise ValueError(f"a {k}-tap kernel (dilation {d}) does not fit an input of size {n} with padding "
                             f"{left}+{right}")
        reach = s * (m - 1) + d * (k - 1)
        size = max(n + left, reach - left + 1, s * m)
        grid.append(-(-size // s) * s)
    return tuple(grid)


def gram_zero_padding_bound(
    kernel: torch.Tensor,
    input_size: Sequence[int],
    geometry: Geometry = Geometry(),
    padding: Sequence[int] | str = 0,
    *,
    iters: int = DEFAULT_ITERS,
    chunk: int | None = None,
) -> torch.Tensor:
    """Upper bound on σmax of the conv with zero ``padding`` on an ``input_size`` input (any size, including ones
    the stride does not divide): the Gram bound of the periodic conv on :func:`zero_padding_grid`, which contains
    the zero-padded operator as a submatrix (module docstring).  A 0-dim tensor; differentiable like
    :func:`gram_bound`."""
    grid = zero_padding_grid(kernel.shape[2:], input_size, geometry, padding)
    return gram_bound(kernel, grid, geometry, iters=iters, chunk=chunk)


def layer_gram_bound(
    layer: nn.Module,
    input_size: Sequence[int],
    *,
    zero_padding: bool = False,
    iters: int = DEFAULT_ITERS,
    differentiable: bool = False,
) -> torch.Tensor:
    """Gram bound on σmax of a 1-D / 2-D conv or TT layer on ``input_size`` inputs: of its periodic operator, or
    (``zero_padding``) of the layer as it runs with zero padding — or circular padding whose outputs are a subset
    of the periodic conv's.  A grouped conv is block diagonal: the largest group bound.  Without
    ``differentiable``, a TT layer is bounded through its core after QR of the frames (same nonzero singular
    values, any padding), in float64; with it, through ``dense_weight()`` so that gradients reach every factor.
    Raises ``ValueError`` for padding modes that copy pixels (reflect, replicate) with ``zero_padding``."""
    geometry = Geometry.of(layer)
    kernel, _ = effective_factors(layer, torch.float64)
    groups = int(getattr(layer, "groups", 1))
    size = tuple(int(v) for v in input_size)
    if zero_padding:
        mode = str(getattr(layer, "padding_mode", "zeros"))
        padding = layer.padding
        if mode in _COPYING_PADDING:
            raise ValueError(f"{mode} padding copies pixels; the zero-padding bound does not apply")
        if mode == "circular":
            # outputs i < m of the periodic conv on the input itself: a submatrix when m ≤ n/s
            pads = _pads(padding, tuple(kernel.shape[2:]), geometry.dilation)
            m = [(n + a + b - d * (k - 1) - 1) // s + 1 for n, k, s, d, (a, b)
                 in zip(size, kernel.shape[2:], geometry.stride, geometry.dilation, pads)]
            if any(n % s or mm > n // s for n, s, mm in zip(size, geometry.stride, m)):
                raise ValueError("circular padding with more outputs than the periodic conv has: no bound here")
        else:
            size = zero_padding_grid(kernel.shape[2:], size, geometry, padding)
    found = [gram_search(k, size, geometry, iters=iters) for k in group_kernels(kernel, groups)]
    if not differentiable:
        return torch.tensor(max(f.bound for f in found), dtype=torch.float64)
    weight = layer.dense_weight() if isinstance(layer, TTConv) else layer.weight
    bounds = [_attach(k, size, geometry, f) for k, f in zip(group_kernels(weight, groups), found)]
    return bounds[0] if len(bounds) == 1 else torch.stack(bounds).max()


def gram_penalty(
    net: nn.Module,
    input_sizes: Mapping[str, Sequence[int]],
    weight: float = 1.0,
    *,
    iters: int = DEFAULT_ITERS,
) -> torch.Tensor:
    """``weight · Σ_layers`` Gram bound on the periodic σmax of every ungrouped conv / TT layer of ``net`` that
    ``input_sizes`` names (layer name → spatial input size, e.g. from
    :func:`ttcompress.spectral.network.layer_input_sizes`): a differentiable regulariser, the counterpart of
    :func:`ttcompress.spectral.bounds.f4_penalty` for a known input size.  A 0-dim tensor on the network's device
    (zero, without a graph, when no layer qualifies)."""
    terms = [layer_gram_bound(layer, input_sizes[name], iters=iters, differentiable=True)
             for name, layer in conv_layers(net)
             if name in input_sizes and getattr(layer, "groups", 1) == 1 and len(layer.kernel_size) in (1, 2)]
    if not terms:
        param = next(net.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return weight * torch.stack([t.float() for t in terms]).sum()
