"""Skew Orthogonal Convolutions (Singla & Feizi 2021b), MaxMin, and SOC-TT (Senderovich et al. 2022, Sec. 5.1).

**SOC.**  Take a kernel ``W`` (C, C, k, k) with odd ``k`` and make it skew: ``A = ½(W − Wᵀ)`` where
``Wᵀ[o, c, i, j] = W[c, o, k−1−i, k−1−j]`` is the kernel of the adjoint conv.  A stride-1 conv with "same" zero
padding (``k // 2``) and kernel ``A`` is then a skew-symmetric matrix ``J`` (Jᵀ = −J) — exactly, also at the
image borders, because the adjoint of a zero-padded same conv is the zero-padded same conv with the transposed,
flipped kernel.  ``exp(J)`` is therefore orthogonal, and SOC computes it by its Taylor series
``Σ_{i<T} Jⁱx / i!``: ``T − 1`` convolutions.  Before that ``A`` is scaled to ``correction · A / σ̂`` with ``σ̂``
the smallest of the four Fantastic-Four reshaping norms (power iteration with persistent vectors, as SOC does;
``correction`` = 0.7, 1.0 for 1×1 kernels), so ``‖J‖ ≤ √(k²)·correction`` and the series converges fast.

The layer is orthogonal up to the truncation of the series: ``‖S_T(J) − exp(J)‖ ≤ Σ_{i≥T} ρⁱ/i!`` for any
``ρ ≥ ‖J‖``.  :meth:`SOCConv2d.lipschitz_bound` returns ``1 + that tail`` with ``ρ`` a rigorous F4 bound of the
scaled kernel: a certified Lipschitz constant of the layer as evaluated (``eval_terms`` terms).

``terms`` counts the summands including the identity: the defaults 6 (training) and 13 (evaluation) are the
reference implementation's ``train_terms=5`` / ``eval_terms=12`` (the highest power of J).

**Channels and stride** (as SOC does).  :class:`SOCLayer` maps ``Cin → Cout`` with stride ``s``: the input is
rearranged by ``pixel_unshuffle`` (an orthogonal permutation; ``Cin·s²`` channels on an ``H/s × W/s`` grid), zero
channels are appended when ``Cout`` is larger (norm-preserving), the SOC acts on ``max(Cin·s², Cout)`` channels,
and the first ``Cout`` channels are kept when ``Cout`` is smaller (a coordinate projection: the map then has
orthonormal rows — every singular value is still 1, but it is not norm-preserving).

**SOC-TT.**  :class:`SOCTTConv2d` is ``L ∘ SOC ∘ F``: a 1×1 conv ``F`` (r1 × Cin), an SOC layer ``r1 → r2`` at the
layer's stride, and a 1×1 conv ``L`` (Cout × r2).  The frames are kept near-orthonormal by the orthogonal loss of
Senderovich et al. (eq. 11), :meth:`SOCTTConv2d.orthogonal_loss`; as in their code, a layer whose rank is at
least both channel counts has no frames (it is a plain :class:`SOCLayer`).

**MaxMin** sorts channel pairs ``(x_i, x_{i+C/2})`` into ``(min, max)``: a permutation of the input at every point,
hence 1-Lipschitz and gradient-norm-preserving.

None of these modules contain an ``nn.Conv2d``, so ``ttcompress.tt.conv_layers`` (decompose, spectrum) does not
list them: their spectra are fixed by construction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ttcompress.spectral.bounds import f4_reshapings
from ttcompress.tt import frames_deviation

__all__ = [
    "MaxMin", "SOCConv2d", "SOCLayer", "SOCTTConv2d", "series_tail", "skew_symmetric", "transpose_flip",
]


def transpose_flip(kernel: torch.Tensor) -> torch.Tensor:
    """Kernel of the adjoint of a stride-1 "same" conv: swap channels, flip both spatial axes."""
    return kernel.transpose(0, 1).flip(2, 3)


def skew_symmetric(kernel: torch.Tensor) -> torch.Tensor:
    """``½(W − transpose_flip(W))``: the kernel of a skew-symmetric conv operator (square, odd kernel)."""
    return 0.5 * (kernel - transpose_flip(kernel))


def series_tail(rho: float, terms: int) -> float:
    """``Σ_{i ≥ terms} ρⁱ/i!``: bound on ``‖exp(J) − Σ_{i<terms} Jⁱ/i!‖`` when ``‖J‖ ≤ ρ``."""
    if rho < 0 or terms < 1:
        raise ValueError(f"need rho ≥ 0 and terms ≥ 1, got {rho}, {terms}")
    term = 1.0
    for i in range(1, terms):
        term *= rho / i
    term *= rho / terms  # ρ^T / T!
    total, i = 0.0, terms
    while term > 1e-18 * max(total, 1e-300) or i < terms + 2:
        total += term
        i += 1
        term *= rho / i
        if i > terms + 10_000:
            break
    return total


def _matrix_norm_upper(matrix: torch.Tensor) -> float:
    """‖M‖₂ in float64, through the smaller Gram matrix (one symmetric eigenproblem), rounded up slightly."""
    m = matrix.detach().double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    top = float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0))
    return math.sqrt(top) * (1 + 1e-9) + 1e-300


class SOCConv2d(nn.Module):
    """``x ↦ Σ_{i<T} Jⁱx/i!`` with ``J`` the zero-padded same conv of the scaled skew kernel (orthogonal up to the
    truncation).  Square: ``channels → channels``, stride 1, odd ``kernel_size``, no bias.

    ``terms`` (training) and ``eval_terms`` (evaluation) count the summands including the identity.  The scale
    ``σ̂`` comes from power iteration on the four F4 reshapings with persistent vectors (buffers, saved in the
    state dict): ``init_iters`` iterations on the first training step and every ``update_freq`` training steps
    after it, ``update_iters`` otherwise; none in evaluation, except ``init_iters`` once for a layer whose
    vectors were never iterated (buffer ``initialized``).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        terms: int = 6,
        *,
        eval_terms: int = 13,
        correction: float | None = None,
        init_iters: int = 50,
        update_iters: int = 1,
        update_freq: int = 200,
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SOC needs an odd kernel size, got {kernel_size}")
        if terms < 1 or eval_terms < 1:
            raise ValueError("terms and eval_terms must be at least 1")
        self.channels = channels
        self.kernel_size = kernel_size
        self.terms, self.eval_terms = int(terms), int(eval_terms)
        self.correction = float(correction if correction is not None else (1.0 if kernel_size == 1 else 0.7))
        self.init_iters, self.update_iters, self.update_freq = int(init_iters), int(update_iters), int(update_freq)
        self.weight = nn.Parameter(torch.randn(channels, channels, kernel_size, kernel_size) / math.sqrt(channels))
        for i, r in enumerate(f4_reshapings(self.weight.detach())):
            u, v = torch.randn(r.shape[0]), torch.randn(r.shape[1])
            self.register_buffer(f"u{i}", u / u.norm())
            self.register_buffer(f"v{i}", v / v.norm())
        # 1.0 once the vectors have been iterated; saved, so a loaded layer evaluates exactly as it was saved
        self.register_buffer("initialized", torch.zeros(()))
        self._steps = 0

    # -- scale ---------------------------------------------------------------------------------------------------

    def _vectors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(getattr(self, f"u{i}"), getattr(self, f"v{i}")) for i in range(4)]

    @torch.no_grad()
    def power_iterate(self, iters: int) -> None:
        """Advance the persistent power-iteration vectors of the four reshapings of the skew kernel."""
        with torch.autocast(self.weight.device.type, enabled=False):
            mats = f4_reshapings(skew_symmetric(self.weight.detach()))
            for i, ((u, v), r) in enumerate(zip(self._vectors(), mats)):
                u, v = u.to(r.dtype), v.to(r.dtype)
                for _ in range(iters):
                    v = r.T @ u
                    v = v / v.norm().clamp_min(1e-30)
                    u = r @ v
                    u = u / u.norm().clamp_min(1e-30)
                # new tensors rather than in-place updates: a graph built on the old vectors stays valid
                setattr(self, f"u{i}", u)
                setattr(self, f"v{i}", v)
        self.initialized.fill_(1.0)

    def sigma(self, skew: torch.Tensor | None = None) -> torch.Tensor:
        """``σ̂ = min_i uᵢᵀ Rᵢ vᵢ`` (differentiable in the weight; the vectors are constants)."""
        skew = skew_symmetric(self.weight) if skew is None else skew
        estimates = [u @ (r @ v) for (u, v), r in zip(self._vectors(), f4_reshapings(skew))]
        return torch.stack(estimates).min()

    def normalized_kernel(self) -> torch.Tensor:
        """The kernel of ``J``: ``correction · A / σ̂`` (updating the power iteration as described above)."""
        if self.training:
            iters = self.init_iters if self._steps % self.update_freq == 0 else self.update_iters
            if iters > 0:
                self.power_iterate(iters)
            self._steps += 1
        elif not bool(self.initialized > 0.5):  # a new layer evaluated before any training step
            self.power_iterate(self.init_iters)
        with torch.autocast(self.weight.device.type, enabled=False):  # the scale in the weight's precision
            skew = skew_symmetric(self.weight)
            return self.correction * skew / self.sigma(skew).clamp_min(1e-12)

    # -- forward -------------------------------------------------------------------------------------------------

    def current_terms(self) -> int:
        return self.terms if self.training else self.eval_terms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.normalized_kernel().to(x.dtype)
        pad = self.kernel_size // 2
        out = term = x
        for i in range(1, self.current_terms()):
            term = F.conv2d(term, kernel, padding=pad) / i
            out = out + term
        return out

    @torch.no_grad()
    def lipschitz_bound(self, terms: int | None = None) -> float:
        """Certified ``‖S_T(J)‖ ≤ 1 + Σ_{i≥T} ρⁱ/i!`` for ``T = terms`` (default ``eval_terms``), with
        ``ρ = √(k²)·min ‖Rᵢ(kernel)‖₂`` (F4) of the kernel the layer uses in evaluation.  The two square reshapings
        (k·C × k·C) are included only while k·C ≤ 2048, to keep this cheap for wide layers."""
        was_training = self.training
        self.eval()
        try:
            kernel = self.normalized_kernel().detach()
        finally:
            self.train(was_training)
        r1, r2, r3, r4 = f4_reshapings(kernel)
        mats = [r3, r4] + ([r1, r2] if r1.shape[0] <= 2048 else [])
        rho = self.kernel_size * min(_matrix_norm_upper(m) for m in mats)
        return 1.0 + series_tail(rho, self.eval_terms if terms is None else terms)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, terms={self.terms}, "
                f"eval_terms={self.eval_terms}, correction={self.correction}")


def _pad_or_crop_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    c = x.shape[1]
    if channels > c:
        return F.pad(x, (0, 0, 0, 0, 0, channels - c))
    return x[:, :channels] if channels < c else x


class SOCLayer(nn.Module):
    """SOC from ``in_channels`` to ``out_channels`` with ``stride`` (pixel-unshuffle, zero channels or a channel
    projection around a square :class:`SOCConv2d`), plus an optional bias.  1-Lipschitz up to the series tail."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        bias: bool = True,
        terms: int = 6,
        *,
        eval_terms: int = 13,
        correction: float | None = None,
        **power: int,
    ) -> None:
        super().__init__()
        if stride < 1:
            raise ValueError(f"stride must be positive, got {stride}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, int(stride)
        self.core = SOCConv2d(max(in_channels * stride * stride, out_channels), kernel_size, terms,
                              eval_terms=eval_terms, correction=correction, **power)
        self.bias = nn.Parameter(torch.empty(out_channels).uniform_(-1, 1) / math.sqrt(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.pixel_unshuffle(x, self.stride)
        z = _pad_or_crop_channels(self.core(_pad_or_crop_channels(x, self.core.channels)), self.out_channels)
        if self.bias is not None:
            z = z + self.bias.view(1, -1, 1, 1).to(z.dtype)
        return z

    def lipschitz_bound(self) -> float:
        return self.core.lipschitz_bound()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"bias={self.bias is not None}")


class SOCTTConv2d(nn.Module):
    """SOC-TT: ``L ∘ SOC ∘ F`` with 1×1 frames ``F`` (r1 × Cin) and ``L`` (Cout × r2), ``r1 = min(rank, Cin)``,
    ``r2 = min(rank, Cout)``; the SOC core maps r1 → r2 at the layer's stride.  Frames start orthonormal
    (``nn.init.orthogonal_``); a layer with ``rank ≥ max(Cin, Cout)`` has none.  Bias after ``L``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        kernel_size: int = 3,
        stride: int = 1,
        bias: bool = True,
        terms: int = 6,
        *,
        eval_terms: int = 13,
        correction: float | None = None,
        **power: int,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, int(rank)
        self.kernel_size, self.stride = kernel_size, int(stride)
        self.has_frames = not (rank >= in_channels and rank >= out_channels)
        r1, r2 = (min(rank, in_channels), min(rank, out_channels)) if self.has_frames else (in_channels, out_channels)
        self.ranks = (r1, r2)
        if self.has_frames:
            self.frame_in = nn.Parameter(nn.init.orthogonal_(torch.empty(r1, in_channels)))
            self.frame_out = nn.Parameter(nn.init.orthogonal_(torch.empty(out_channels, r2)))
        else:
            self.register_parameter("frame_in", None)
            self.register_parameter("frame_out", None)
        self.core = SOCLayer(r1, r2, kernel_size, stride, bias=False, terms=terms, eval_terms=eval_terms,
                             correction=correction, **power)
        self.bias = nn.Parameter(torch.empty(out_channels).uniform_(-1, 1) / math.sqrt(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frame_in is not None:
            x = F.conv2d(x, self.frame_in.to(x.dtype)[:, :, None, None])
        z = self.core(x)
        if self.frame_out is not None:
            z = F.conv2d(z, self.frame_out.to(z.dtype)[:, :, None, None])
        if self.bias is not None:
            z = z + self.bias.view(1, -1, 1, 1).to(z.dtype)
        return z

    def frames(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F, L)``: F (r1×Cin, should have orthonormal rows), L (Cout×r2, orthonormal columns) — identity
        matrices (constants) for a layer without frames."""
        if self.frame_in is None:
            ref = self.core.core.weight
            return (torch.eye(self.in_channels, dtype=ref.dtype, device=ref.device),
                    torch.eye(self.out_channels, dtype=ref.dtype, device=ref.device))
        return self.frame_in, self.frame_out

    def orthogonal_terms(self) -> tuple[torch.Tensor, int]:
        """``(‖FFᵀ − I‖²_F + ‖LᵀL − I‖²_F, r1² + r2²)`` — summed over layers and divided, this is eq. 11."""
        if self.frame_in is None:
            return self.core.core.weight.new_zeros(()), 0
        return frames_deviation(self.frames())

    def orthogonal_loss(self) -> torch.Tensor:
        """``(‖FFᵀ − I‖²_F + ‖LᵀL − I‖²_F) / (r1² + r2²)``: mean squared deviation of the frames' Grams from I."""
        total, entries = self.orthogonal_terms()
        return total / max(entries, 1)

    @torch.no_grad()
    def lipschitz_bound(self) -> float:
        """``‖L‖₂ · (SOC core bound) · ‖F‖₂`` — exact frame norms, so valid whether or not they are orthonormal."""
        bound = self.core.lipschitz_bound()
        if self.frame_in is not None:
            bound *= _matrix_norm_upper(self.frame_in) * _matrix_norm_upper(self.frame_out)
        return bound

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, rank={self.rank}, ranks={self.ranks}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, frames={self.has_frames}")


class MaxMin(nn.Module):
    """Split the channels into halves ``a, b`` and return ``cat(min(a, b), max(a, b))`` (GroupSort of size 2)."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[self.dim]
        if n % 2:
            raise ValueError(f"MaxMin needs an even number of channels, got {n}")
        a, b = x.split(n // 2, self.dim)
        return torch.cat([torch.minimum(a, b), torch.maximum(a, b)], self.dim)
