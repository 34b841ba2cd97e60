"""Tensor-train (TT) convolutions: ``last ∘ core ∘ first`` with orthonormal outer frames, in 1, 2 or 3 spatial dims.

A conv kernel ``W`` (Cout, Cin, *k) is written as ``W[o,c,i] = Σ_{a,b} L[o,b] G[b,a,i] F[a,c]`` (``i`` the
multi-index of a filter tap): the TT decomposition with the filter modes merged into one core (equivalently
Tucker-2).  ``F`` (r1×Cin) runs as a 1×1 conv ``first``, ``G`` as the k×k conv ``core`` (the layer's
stride/padding/dilation), ``L`` (Cout×r2) as the 1×1 conv ``last`` carrying the original bias.  With orthonormal
frames the layer's nonzero singular values are those of the core (Theorem 3.2), which is what makes exact control
affordable.  :class:`TTConv1d`, :class:`TTConv2d` and :class:`TTConv3d` replace ``nn.Conv1d/2d/3d``; they share
:class:`TTConv`, which is what code that works in any dimension should test for.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import ClassVar, Iterable, Iterator, Mapping

import torch
from torch import nn

from ttcompress import kernel as K
from ttcompress.errors import UserError

DENSE_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def frames_deviation(frames: Iterable[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(Σ‖MMᵀ − I‖²_F, Σ entries of MMᵀ)`` over the frame matrices, each taken on its smaller side (the side that
    can be orthonormal: a first frame's rows, a last frame's columns).  Differentiable."""
    total, entries = None, 0
    for frame in frames:
        m = frame if frame.shape[0] <= frame.shape[1] else frame.T
        gram = m @ m.T
        dev = ((gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)) ** 2).sum()
        total = dev if total is None else total + dev
        entries += gram.numel()
    if total is None:
        raise ValueError("no frames")
    return total, entries


class TTConv(nn.Module):
    """``last(core(first(x)))``; behaves like the ``nn.ConvNd`` it replaces (same attributes, same output).

    Subclasses fix the number of spatial dims (``dims``) and the ``nn.ConvNd`` class of the three convs; the state
    dict keys are ``first.weight``, ``core.weight``, ``last.weight`` and ``last.bias`` in every dimension.
    """

    dims: ClassVar[int]
    conv_class: ClassVar[type[nn.Module]]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        ranks: tuple[int, int],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if type(self) is TTConv:
            raise TypeError("TTConv is abstract: use TTConv1d, TTConv2d or TTConv3d (or tt_class(dims))")
        r1, r2 = ranks
        d = self.dims
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = K.ntuple(kernel_size, d)
        self.stride, self.dilation = K.ntuple(stride, d), K.ntuple(dilation, d)
        self.padding = padding if isinstance(padding, str) else K.ntuple(padding, d)
        self.padding_mode = padding_mode
        self.groups = 1
        conv = self.conv_class
        self.first = conv(in_channels, r1, 1, bias=False)
        self.core = conv(
            r1, r2, self.kernel_size, stride=self.stride, padding=self.padding, dilation=self.dilation,
            bias=False, padding_mode=padding_mode,
        )
        self.last = conv(r2, out_channels, 1, bias=bias)

    @property
    def ranks(self) -> tuple[int, int]:
        return (self.first.out_channels, self.core.out_channels)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.last.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    def dense_weight(self) -> torch.Tensor:
        """The equivalent ``(Cout, Cin, *k)`` kernel."""
        return K.compose_tt(K.as_matrix(self.first.weight), self.core.weight, K.as_matrix(self.last.weight))

    def frames(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F, L)``: the first frame (r1×Cin, should have orthonormal rows) and last frame (Cout×r2, orthonormal
        columns)."""
        return K.as_matrix(self.first.weight), K.as_matrix(self.last.weight)

    def orthogonal_terms(self) -> tuple[torch.Tensor, int]:
        """``(Σ‖MMᵀ − I‖²_F, entries)`` over both frames (:func:`frames_deviation`): the layer's share of the
        orthogonal loss (paper eq. 11).  Differentiable."""
        return frames_deviation(self.frames())

    @torch.no_grad()
    def set_factors(self, first: torch.Tensor, core: torch.Tensor, last: torch.Tensor) -> None:
        """Write factors (F: r1×Cin, G: r2×r1×k…, L: Cout×r2), zero-padding ranks that came out smaller."""
        r1, r2 = self.ranks
        f = first.new_zeros(r1, self.in_channels)
        f[: first.shape[0]] = first
        g = core.new_zeros(r2, r1, *self.kernel_size)
        g[: core.shape[0], : core.shape[1]] = core
        ell = last.new_zeros(self.out_channels, r2)
        ell[:, : last.shape[1]] = last
        self.first.weight.copy_(K.as_1x1(f, self.dims))
        self.core.weight.copy_(g)
        self.last.weight.copy_(K.as_1x1(ell, self.dims))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, ranks={self.ranks}, "
                f"stride={self.stride}")


class TTConv1d(TTConv):
    """TT form of an ``nn.Conv1d``: ``(Cout, Cin, k)`` kernels."""

    dims = 1
    conv_class = nn.Conv1d


class TTConv2d(TTConv):
    """TT form of an ``nn.Conv2d``: ``(Cout, Cin, kh, kw)`` kernels."""

    dims = 2
    conv_class = nn.Conv2d


class TTConv3d(TTConv):
    """TT form of an ``nn.Conv3d``: ``(Cout, Cin, kd, kh, kw)`` kernels (volumetric data)."""

    dims = 3
    conv_class = nn.Conv3d


_TT_CLASSES: dict[int, type[TTConv]] = {1: TTConv1d, 2: TTConv2d, 3: TTConv3d}


def tt_class(dims: int) -> type[TTConv]:
    """The TT layer class for ``dims`` spatial dims (1, 2 or 3)."""
    try:
        return _TT_CLASSES[dims]
    except KeyError:
        raise ValueError(f"TT layers exist for 1, 2 or 3 spatial dims, not {dims}") from None


def _positive_qr(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR with diag(R) ≥ 0, so frames that are already orthonormal come back unchanged (R = I).

    Householder QR may flip the sign of any column of Q; the operator does not care, but rewriting a layer with
    sign-flipped frames during training would turn the optimizer's momentum for those rows against them."""
    q, r = torch.linalg.qr(matrix)
    d = torch.sign(torch.diagonal(r))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return q * d, r * d.unsqueeze(1)


def orthonormal_factors(layer: TTConv, dtype: torch.dtype = torch.float64):
    """QR of both frames with the triangular factors folded into the core (Alg. 1, steps 1–3).

    Returns ``(Qf, G', Ql)`` with ``Qf`` (r1'×Cin) orthonormal rows, ``Ql`` (Cout×r2') orthonormal columns and
    ``compose_tt(Qf, G', Ql) == layer.dense_weight()``; r1' = min(r1, Cin), r2' = min(r2, Cout).  Any number of
    spatial dims.
    """
    f, ell = (t.detach().to(dtype) for t in layer.frames())
    qf, rf = _positive_qr(f.T)  # F = Rfᵀ Qfᵀ
    ql, rl = _positive_qr(ell)  # L = Ql Rl
    core = layer.core.weight.detach().to(dtype)
    core = K.apply_output_frame(K.apply_input_frame(core, rf), rl)
    return qf.T, core, ql


Frames = tuple[torch.Tensor, torch.Tensor] | None


def effective_factors(layer: nn.Module, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, Frames]:
    """``(kernel, frames)``: a conv's own weight (frames None), or a TT layer's core after QR of its frames with
    the orthonormal frames ``(Qf, Ql)`` — the kernel that carries the layer's nonzero singular values (Theorem 3.2)
    and what to write it back with.  Detached, in ``dtype`` (default: the weight's own for a conv, float64 for a
    TT layer)."""
    if isinstance(layer, TTConv):
        qf, core, ql = orthonormal_factors(layer, dtype=torch.float64 if dtype is None else dtype)
        return core, (qf, ql)
    weight = layer.weight.detach()
    return (weight if dtype is None else weight.to(dtype)), None


@torch.no_grad()
def write_effective(layer: nn.Module, kernel: torch.Tensor, frames: Frames) -> None:
    """Write a kernel from :func:`effective_factors` back (a TT layer gets the orthonormal frames with it)."""
    if frames is None:
        layer.weight.copy_(kernel)
    else:
        layer.set_factors(frames[0], kernel, frames[1])  # type: ignore[operator]


# --- TT-SVD -------------------------------------------------------------------------------------------------------

def _rank_for_energy(s2: torch.Tensor, energy: float) -> int:
    """Smallest r whose leading squared singular values ``s2`` (descending) hold ``energy`` of the total."""
    e = torch.cumsum(s2, 0)
    if e[-1] <= 0:
        return 1
    return int(torch.searchsorted(e / e[-1], torch.tensor(energy, dtype=e.dtype) - 1e-12).item()) + 1


def _left_singular(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors (all p of them, a full orthonormal basis) and squared singular values (descending) of
    a p × q matrix, from the eigendecomposition of its p × p Gram matrix in float64.

    For the unfoldings here (p = channels ≤ a few thousand, q = p·k² or more) this is 10–30× faster than LAPACK's
    SVD of the wide matrix, and only the leading subspaces are used, which the Gram matrix resolves to float64
    precision."""
    gram = matrix @ matrix.T
    s2, u = torch.linalg.eigh(gram)
    return u.flip(1), s2.flip(0).clamp_min(0)


@dataclass
class TTFactors:
    first: torch.Tensor  # (r1, Cin), orthonormal rows
    core: torch.Tensor  # (r2, r1, *k)
    last: torch.Tensor  # (Cout, r2), orthonormal columns

    @property
    def ranks(self) -> tuple[int, int]:
        return (self.first.shape[0], self.core.shape[0])

    def dense(self) -> torch.Tensor:
        return K.compose_tt(self.first, self.core, self.last)


def input_whitening(moment: torch.Tensor, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, H⁻¹)``: the symmetric square root of an input second-moment matrix ``Σ`` (Cin × Cin) and its inverse,
    in float64, with the eigenvalues of ``Σ`` floored at ``floor`` × the largest (channels that never fire, e.g.
    after a ReLU, would make ``H`` singular; what the floor adds cannot change which directions matter)."""
    s = moment.detach().double()
    s = (s + s.T) / 2
    values, vectors = torch.linalg.eigh(s)
    top = float(values.max()) if values.numel() else 0.0
    if not top > 0:
        raise UserError("the calibration images give a conv an input that is zero everywhere")
    values = values.clamp_min(floor * top).sqrt()
    return (vectors * values) @ vectors.T, (vectors / values) @ vectors.T


def tt_svd(
    weight: torch.Tensor, rank: int | None = None, energy: float | None = None, refine: int = 2,
    ranks: tuple[int, int] | None = None, input_moment: torch.Tensor | None = None,
) -> TTFactors:
    """TT-SVD of one kernel, then ``refine`` alternating sweeps (HOOI) that can only lower the error.

    ``weight`` is ``(Cout, Cin, *k)`` with 1, 2 or 3 spatial dims (``∏k`` below is the number of taps).
    Step 1: SVD of the Cin × (∏k·Cout) unfolding → ``first`` = top-r1 left singular vectors (transposed).
    Step 2: SVD of the (r1·∏k) × Cout unfolding of the remainder → ``last`` = top-r2 right singular vectors.
    The TT-SVD result already has the optimal core for its frames (it is ``W ×_in FᵀF ×_out LLᵀ``), so each sweep
    (best frame given the other) never increases ‖W − W_tt‖.  Computed in float64.
    ``ranks = (r1, r2)`` fixes both ranks separately (capped at Cin and Cout) instead of ``rank`` / ``energy``.

    Data-aware (``input_moment`` = ``Σ = E[x xᵀ]`` of the layer's input channels, :mod:`ttcompress.activations`):
    the error that matters is the one the layer makes on its inputs, ``E‖(W − W_tt)·x‖² = ‖(W − W_tt) ×_in H‖²``
    with ``H = Σ^½``.  The same TT-SVD and sweeps run on ``W ×_in H`` (so ranks and energies are those of the
    whitened kernel); its input frame ``F_H`` maps back as ``F_H·H⁻¹``, whose QR (``Qᵀ`` orthonormal rows, the
    triangular factor folded into the core) gives the frames orthonormal again: the same operator, the same form.
    """
    if sum(v is not None for v in (rank, energy, ranks)) != 1:
        raise UserError("give exactly one of --rank and --energy")
    if input_moment is not None:
        half, inverse = input_whitening(input_moment)
        factors = tt_svd(K.apply_input_frame(weight.detach().double(), half), rank, energy, refine, ranks)
        q, r = _positive_qr((factors.first @ inverse).T)  # F_H·H⁻¹ = Rᵀ Qᵀ
        return TTFactors(q.T.contiguous(), K.apply_input_frame(factors.core, r).contiguous(), factors.last)
    w = weight.detach().double()
    if w.ndim < 3:
        raise ValueError(f"expected a (Cout, Cin, *k) kernel, got shape {tuple(w.shape)}")
    cout, cin = w.shape[:2]
    u1, s1 = _left_singular(K.unfold_input(w))
    if ranks is not None:
        r1 = min(ranks[0], cin)
    else:
        r1 = min(rank, cin) if rank is not None else _rank_for_energy(s1, energy)  # type: ignore[arg-type]
    first = u1[:, :r1].T.contiguous()
    remainder = K.apply_input_frame(w, first)  # (Cout, r1, *k)
    u2, s2 = _left_singular(K.unfold_output(remainder))  # right singular vectors of the (r1·∏k) × Cout one
    if ranks is not None:
        r2 = min(ranks[1], cout)
    else:
        r2 = min(rank, cout) if rank is not None else _rank_for_energy(s2, energy)  # type: ignore[arg-type]
    last = u2[:, :r2].contiguous()
    for _ in range(refine):
        first = _left_singular(K.unfold_input(K.apply_output_frame(w, last.T)))[0][:, :r1].T.contiguous()
        last = _left_singular(K.unfold_output(K.apply_input_frame(w, first)))[0][:, :r2].contiguous()
    core = K.apply_output_frame(K.apply_input_frame(w, first), last.T)
    return TTFactors(first, core, last)


def unfolding_energies(weight: torch.Tensor, input_moment: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared singular values (descending, float64) of a kernel's input-mode (Cin × ∏k·Cout) and output-mode
    (Cout × Cin·∏k) unfoldings: what truncating r1 and r2 discards (the HOSVD bound
    ‖W − W_tt‖² ≤ Σ_{i>r1} s_in,i² + Σ_{j>r2} s_out,j²) — of the whitened kernel ``W ×_in Σ^½`` when the
    input's second moment ``Σ`` is given, as :func:`tt_svd` truncates it."""
    w = weight.detach().double()
    if input_moment is not None:
        w = K.apply_input_frame(w, input_whitening(input_moment)[0])
    return _left_singular(K.unfold_input(w))[1], _left_singular(K.unfold_output(w))[1]


def relative_error(factors: TTFactors, weight: torch.Tensor) -> float:
    """‖W_tt − W‖_F / ‖W‖_F in float64."""
    w = weight.detach().double()
    return float(torch.linalg.norm(factors.dense() - w) / torch.linalg.norm(w).clamp_min(1e-300))


def tt_params(cin: int, cout: int, kernel_size: Iterable[int], ranks: tuple[int, int], bias: bool) -> int:
    """Parameters of a TT layer with these channels, kernel size (one int per spatial dim) and ranks."""
    r1, r2 = ranks
    return r1 * cin + r2 * r1 * math.prod(kernel_size) + cout * r2 + (cout if bias else 0)


# --- whole networks -----------------------------------------------------------------------------------------------

def conv_layers(net: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every ``nn.Conv1d/2d/3d`` and TT layer (:class:`TTConv`) by module path, in ``named_modules`` order
    (children of a TT layer are not listed separately).  Code that handles only some dimensions checks
    :func:`ttcompress.kernel.spatial_dims` of each layer."""
    skip_prefixes: list[str] = []
    for name, module in net.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, TTConv):
            skip_prefixes.append(name + ".")
            yield name, module
        elif isinstance(module, DENSE_CONVS):
            yield name, module


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@dataclass
class LayerReport:
    name: str
    shape: list[int]
    ranks: list[int] | None
    rel_error: float
    params_before: int
    params_after: int
    reason: str | None = None

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in ("name", "shape", "ranks", "rel_error", "params_before", "params_after")}
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class DecomposeReport:
    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def compression(self) -> float:
        return self.params_before / max(self.params_after, 1)

    def to_json(self) -> dict:
        return {
            "layers": [layer.to_json() for layer in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "compression": self.compression,
        }


def tt_like(conv: nn.Module, ranks: tuple[int, int]) -> TTConv:
    """An (uninitialised) TT layer of these ranks with the geometry of ``conv`` (an ``nn.Conv1d/2d/3d``), on the
    conv's device and dtype."""
    return tt_class(K.spatial_dims(conv))(
        conv.in_channels, conv.out_channels, conv.kernel_size, tuple(ranks), stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)


def tt_from_conv(conv: nn.Module, factors: TTFactors) -> TTConv:
    """The TT layer of the same dimension as ``conv`` (an ``nn.Conv1d/2d/3d``) with the given factors and its bias."""
    layer = tt_like(conv, factors.ranks)
    with torch.no_grad():
        layer.set_factors(*(t.to(conv.weight.dtype) for t in (factors.first, factors.core, factors.last)))
        if conv.bias is not None:
            layer.last.bias.copy_(conv.bias)
    layer.train(conv.training)
    return layer


def dense_reason(name: str, conv: nn.Module, skip: Iterable[str] = ()) -> str | None:
    """Why a layer of :func:`conv_layers` cannot be decomposed at any rank ("already TT", "skipped by --skip",
    grouped), or None when it can."""
    if isinstance(conv, TTConv):
        return "already TT"
    if any(fnmatch.fnmatchcase(name, p) for p in skip):
        return "skipped by --skip"
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups})"
    if type(conv) not in DENSE_CONVS:  # e.g. timm's Conv2dSame (own padding), StdConv2d (standardised weights)
        return f"custom conv class {type(conv).__name__} (it may compute more than a plain conv)"
    return None


def decompose(
    net: nn.Module,
    *,
    rank: int | None = None,
    energy: float | None = None,
    skip: Iterable[str] = (),
    refine: int = 2,
    ranks: Mapping[str, tuple[int, int]] | None = None,
    input_moments: Mapping[str, torch.Tensor] | None = None,
) -> DecomposeReport:
    """Replace, in place, every groups=1 ``nn.Conv1d/2d/3d`` of ``net`` that TT would shrink by the TT layer of the
    same dimension (:class:`TTConv1d`, :class:`TTConv2d`, :class:`TTConv3d`).

    ``rank`` caps r1 ≤ min(rank, Cin), r2 ≤ min(rank, Cout); ``energy`` keeps that fraction of the squared singular
    values of each unfolding; ``ranks`` maps layer names to their own ``(r1, r2)`` (a plan such as
    :func:`ttcompress.budget.allocate` makes) and leaves every other layer dense.  ``skip`` holds glob patterns of
    module names to leave dense.  ``input_moments`` maps layer names to the second moment of their input channels
    (:func:`ttcompress.activations.input_moments`): those layers are truncated where their inputs live
    (data-aware, see :func:`tt_svd`); the others as before.
    """
    if sum(v is not None for v in (rank, energy, ranks)) != 1:
        raise UserError("give exactly one of --rank and --energy")
    if rank is not None and rank <= 0:
        raise UserError(f"--rank must be a positive integer, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise UserError(f"--energy must be in (0, 1], got {energy}")
    if ranks is not None and any(min(r) <= 0 for r in ranks.values()):
        raise UserError("every per-layer rank must be a positive integer")
    patterns = list(skip)
    report = DecomposeReport()
    report.params_before = sum(p.numel() for p in net.parameters())
    for name, conv in list(conv_layers(net)):
        cout, cin, size = conv.out_channels, conv.in_channels, tuple(conv.kernel_size)
        params = sum(p.numel() for p in conv.parameters())
        entry = LayerReport(name, [cout, cin, *size], None, 0.0, params, params)
        report.layers.append(entry)
        if isinstance(conv, TTConv):
            entry.ranks = list(conv.ranks)
        entry.reason = dense_reason(name, conv, patterns)
        if entry.reason is not None:
            continue
        if ranks is not None and name not in ranks:
            entry.reason = "not chosen by the allocation"
            continue
        planned = None if ranks is None else tuple(ranks[name])
        moment = None if input_moments is None else input_moments.get(name)
        factors = tt_svd(conv.weight, rank=rank, energy=energy, refine=refine, ranks=planned, input_moment=moment)
        after = tt_params(cin, cout, size, factors.ranks, conv.bias is not None)
        if after >= params:
            entry.reason = f"ranks {list(factors.ranks)} would not shrink it"
            continue
        entry.ranks = list(factors.ranks)
        entry.rel_error = relative_error(factors, conv.weight)
        entry.params_after = after
        set_module(net, name, tt_from_conv(conv, factors))
    report.params_after = sum(p.numel() for p in net.parameters())
    return report


def tt_ranks(net: nn.Module) -> dict[str, list[int]]:
    return {name: list(m.ranks) for name, m in conv_layers(net) if isinstance(m, TTConv)}


def apply_tt_structure(net: nn.Module, ranks: dict[str, list[int]]) -> None:
    """Turn the named convs into (uninitialised) TT layers of the given ranks, to load a saved TT state dict.

    The dimension of each TT layer is that of the dense conv the architecture has under that name, so the metadata
    (``{name: [r1, r2]}``) is the same in 1, 2 and 3 dims and files written before 1-D/3-D support load unchanged."""
    for name, (r1, r2) in ranks.items():
        try:
            conv = net.get_submodule(name)
        except AttributeError as exc:
            raise UserError(f"metadata names TT layer {name!r}, which the architecture does not have") from exc
        if not isinstance(conv, DENSE_CONVS):
            raise UserError(f"metadata names TT layer {name!r}, which is not a Conv1d/2d/3d in the architecture")
        set_module(net, name, tt_like(conv, (r1, r2)))
