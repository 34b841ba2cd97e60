"""Power iteration on layers as they actually run (zero padding, stride, dilation), with persistent vectors.

The exact periodic spectra in :mod:`ttcompress.spectral.periodic` describe the circular convolution; a layer in a
network zero-pads.  Power iteration estimates σmax of the map the layer really computes, using only its forward
pass and its adjoint:

* forward  ``x ↦ conv2d(x, K)`` with the layer's stride, padding, dilation and groups;
* adjoint  ``y ↦ conv_transpose2d(y, K)`` with ``output_padding`` chosen to give back the input shape (a generic
  autograd vector-Jacobian product for padding modes and string paddings that ``conv_transpose2d`` cannot express).

``K`` is the layer's *effective* kernel: its weight, or for a :class:`~ttcompress.tt.TTConv2d` its core after the
frames are orthonormalised by QR (Theorem 3.2: the layer then has the core's nonzero singular values).

:class:`PowerIteration` keeps one vector per layer between calls (Gouk et al. 2021: one iteration per training
step suffices because the weights change slowly).  Its vectors start from a seeded generator so that every
data-parallel rank draws the same ones.  :func:`sigma_max_power` converges (to a relative ``tol``) for a one-off
estimate, with the Krylov space of the same products (Lanczos) instead of plain iteration, which crawls on conv
operators because their top singular values cluster.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ttcompress.kernel import ntuple

__all__ = [
    "ConvOperator",
    "LinearMap",
    "Operator",
    "PowerIteration",
    "Triplets",
    "conv_operator",
    "sigma_max_power",
    "top_singular",
]


class Operator(Protocol):
    """A linear map with its adjoint, acting on tensors of shape ``input_shape`` (a leading batch dim of 1)."""

    input_shape: tuple[int, ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def adjoint(self, y: torch.Tensor) -> torch.Tensor: ...


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclass(frozen=True)
class ConvOperator:
    """The linear part of a conv layer (no bias) on inputs of shape ``(1, *input_shape)``: 1, 2 or 3 spatial dims,
    from the kernel ``(Cout, Cin/groups, *k)``; stride, padding and dilation hold one int per spatial dim."""

    kernel: torch.Tensor  # (Cout, Cin/groups, *k)
    input_shape: tuple[int, ...]  # (Cin, *spatial)
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] | str = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"

    @property
    def dims(self) -> int:
        return self.kernel.ndim - 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel.to(x.dtype)
        conv = _CONV[self.dims]
        if self.padding_mode != "zeros" and not isinstance(self.padding, str):
            pads = [p for pad in reversed(self.padding) for p in (pad, pad)]
            x = F.pad(x, pads, mode=self.padding_mode)
            return conv(x, k, None, self.stride, 0, self.dilation, self.groups)
        return conv(x, k, None, self.stride, self.padding, self.dilation, self.groups)

    def _output_padding(self) -> tuple[int, ...] | None:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return None
        out = []
        for n, k, s, p, d in zip(self.input_shape[1:], self.kernel.shape[2:], self.stride, self.padding,
                                 self.dilation):
            m = (n + 2 * p - d * (k - 1) - 1) // s + 1
            out.append(n - ((m - 1) * s - 2 * p + d * (k - 1) + 1))
        return tuple(out)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        op = self._output_padding()
        if op is not None:
            return _CONV_T[self.dims](y, self.kernel.to(y.dtype), None, self.stride, self.padding, op, self.groups,
                                      self.dilation)
        # the map is linear, so its vector-Jacobian product at any point (zero) is the adjoint
        x = torch.zeros(y.shape[0], *self.input_shape, dtype=y.dtype, device=y.device, requires_grad=True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.forward(x), x, y)
        return grad


@dataclass(frozen=True)
class LinearMap:
    """A dense matrix ``W`` (out × in) acting on vectors of shape ``(1, in)``."""

    weight: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (int(self.weight.shape[1]),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype).T

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.weight.to(y.dtype)


def conv_operator(layer: nn.Module, input_hw: Sequence[int], kernel: torch.Tensor | None = None) -> ConvOperator:
    """The operator of ``layer`` (an ``nn.Conv1d/2d/3d`` or TT layer) on inputs of spatial size ``input_hw``
    (a leading channel count, if given, is ignored).

    ``kernel`` defaults to the layer's effective kernel (for a TT layer: the core after QR of the frames, computed
    in float64); pass one to reuse a core you already have.
    """
    if kernel is None:
        from ttcompress.spectral.network import effective_kernel

        kernel, _ = effective_kernel(layer)
    dims = kernel.ndim - 2
    spatial = tuple(int(v) for v in input_hw[-dims:])
    if len(input_hw) < dims:
        raise ValueError(f"a {dims}-D conv needs {dims} spatial sizes, got {tuple(input_hw)}")
    groups = int(getattr(layer, "groups", 1))
    padding = layer.padding if isinstance(layer.padding, str) else ntuple(layer.padding, dims)
    return ConvOperator(
        kernel=kernel.detach(),
        input_shape=(int(kernel.shape[1]) * groups, *spatial),
        stride=ntuple(layer.stride, dims),
        padding=padding,
        dilation=ntuple(layer.dilation, dims),
        groups=groups,
        padding_mode=getattr(layer, "padding_mode", "zeros"),
    )


def _seeded_unit(shape: Sequence[int], seed: int, key: str, device, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) & 0x7FFF_FFFF_FFFF)
    v = torch.randn(1, *shape, generator=g, dtype=torch.float64)
    return (v / v.norm()).to(device=device, dtype=dtype)


class PowerIteration:
    """Persistent power-iteration vectors, one per key (layer name), for σmax estimates that improve every call.

    ``estimate(key, op)`` runs ``iters`` iterations of ``v ← AᵀA v / ‖AᵀA v‖`` from the stored vector and returns
    ``σ̂ = ‖A v‖`` (a lower bound of σmax that converges to it).  A vector whose shape no longer fits the operator is
    redrawn.  Vectors start from ``(seed, key)`` on the CPU generator: identical on every rank and device.
    """

    def __init__(self, seed: int = 0, iters: int = 1) -> None:
        if iters < 1:
            raise ValueError(f"power iterations must be at least 1, got {iters}")
        self.seed = int(seed)
        self.iters = int(iters)
        self.vectors: dict[str, torch.Tensor] = {}

    @staticmethod
    def _reference(op: Operator) -> torch.Tensor | None:
        for attr in ("kernel", "weight"):
            ref = getattr(op, attr, None)
            if isinstance(ref, torch.Tensor):
                return ref
        return None

    def vector(self, key: str, op: Operator, device, dtype) -> torch.Tensor:
        v = self.vectors.get(key)
        if v is None or tuple(v.shape[1:]) != tuple(op.input_shape):
            v = _seeded_unit(op.input_shape, self.seed, key, device, dtype)
        return v.to(device=device, dtype=dtype)

    @torch.no_grad()
    def estimate(self, key: str, op: Operator, iters: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """σ̂ of ``op`` as a 0-dim tensor on the operator's device (no host synchronisation).

        Vectors live on the device and in the dtype of the operator's ``kernel``/``weight`` (CPU float32 for an
        operator without either), or in ``dtype`` when given.
        """
        ref = self._reference(op)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = dtype or (ref.dtype if ref is not None and ref.is_floating_point() else torch.float32)
        v = self.vector(key, op, device, dtype)
        for _ in range(self.iters if iters is None else iters):
            w = op.adjoint(op.forward(v))
            norm = w.norm()
            # a zero operator leaves the vector where it was (and σ̂ = 0)
            v = torch.where(norm > 0, w / norm.clamp_min(torch.finfo(dtype).tiny), v)
        self.vectors[key] = v
        return op.forward(v).norm()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "iters": self.iters,
                "vectors": {k: v.detach().cpu().clone() for k, v in self.vectors.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the vectors (the seed and iteration count stay as configured)."""
        self.vectors = {str(k): v.clone() for k, v in state.get("vectors", {}).items()}


@dataclass(frozen=True)
class Triplets:
    """The top ``k`` singular triplets of an operator: ``A right[i] = values[i] · left[i]`` (unit vectors)."""

    values: torch.Tensor  # (k,) float64, descending
    right: torch.Tensor  # (k, *input_shape): unit inputs v_i
    left: torch.Tensor  # (k, *output_shape): unit outputs u_i
    residuals: torch.Tensor  # (k,) ‖Aᵀu_i − σ_i v_i‖: some singular value lies within it of σ_i
    products: int  # operator applications (forward + adjoint, per vector)
    converged: bool


def _orthonormalize(block: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Columns of ``block`` (n × b) made orthogonal to ``basis`` (n × m, orthonormal) and to each other (twice-
    repeated classical Gram-Schmidt, then QR); directions that vanish numerically are dropped.

    "Vanish" means a remainder at rounding level (a few ulps of the largest column).  A looser cut drops real
    information: after a restart the remainders of ``AᵀA X`` are the Ritz residuals, which are tiny and nearly
    parallel once ``X`` is almost converged, and cutting them at ``1e-10`` stalled σ₂ at a residual of ``4e-8``
    when σ₂ and σ₃ were 0.4 % apart.  A kept noise column is harmless: the second pass makes it orthonormal."""
    scale = float(block.norm(dim=0).max()) if block.numel() else 0.0
    cut = 16 * torch.finfo(block.dtype).eps
    for _ in range(2):
        if block.shape[1] == 0 or scale == 0.0:
            return block[:, :0]
        if basis is not None and basis.shape[1]:
            block = block - basis @ (basis.T @ block)
        q, r = torch.linalg.qr(block)
        diag = torch.diagonal(r)
        keep = diag.abs() > cut * scale
        block = (q * torch.where(diag < 0, -1.0, 1.0).to(q.dtype))[:, keep]
        scale = 1.0
    return block


@torch.no_grad()
def top_singular(
    layer: nn.Module | Operator,
    input_shape: Sequence[int] | None = None,
    k: int = 1,
    *,
    tol: float = 1e-4,
    max_restarts: int = 50,
    block: int | None = None,
    krylov: int | None = None,
    start: torch.Tensor | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Triplets:
    """Top ``k`` singular values and vectors of a layer as it runs (zero padding, stride, dilation): PowerQR.

    Subspace iteration with QR (Boroojeny et al. 2024) on ``AᵀA``, accelerated by a block Krylov space: each round
    orthonormalises ``X, AᵀA X, (AᵀA)² X, …`` (``krylov`` blocks of ``block`` vectors, QR against everything
    before), takes the Rayleigh–Ritz triplets from the SVD of ``A Q`` (singular values directly, no squared
    condition number) and restarts from the top ``block`` right Ritz vectors.  It stops when every one of the top
    ``k`` triplets has ``‖Aᵀu − σv‖ ≤ tol·σ`` (``Av = σu`` holds by construction), so each σ_i is within
    ``tol·σ_i`` of a singular value of ``A``; ``converged`` says whether that happened within ``max_restarts``.

    ``layer`` is an ``nn.Conv2d``/``TTConv2d`` with ``input_shape`` its input ``(H, W)`` (or ``(C, H, W)``), an
    ``nn.Linear``, or an :class:`Operator`.  ``start`` (``(j, *input_shape)``, e.g. the ``right`` vectors of an
    earlier call) warm-starts the block; the rest is drawn from ``seed``.  A warm start is first tested alone, so
    vectors that still fit cost only ``2·block`` operator applications.
    """
    op = _as_operator(layer, input_shape)
    ref = PowerIteration._reference(op)
    device = ref.device if ref is not None else torch.device("cpu")
    shape = tuple(int(d) for d in op.input_shape)
    n = math.prod(shape)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, n)
    p = min(n, block if block is not None else (k if k == 1 else k + max(2, k // 2)))
    if p < k:
        raise ValueError(f"block ({p}) must be at least k ({k})")
    steps = krylov if krylov is not None else (24 if p == 1 else max(3, 48 // p))
    steps = max(2, min(steps, n // p + 1))

    def forward(cols: torch.Tensor) -> torch.Tensor:  # (n, b) → (m, b)
        out = op.forward(cols.T.reshape(-1, *shape))
        return out.reshape(cols.shape[1], -1).T

    def adjoint(cols: torch.Tensor) -> torch.Tensor:  # (m, b) → (n, b)
        back = op.adjoint(cols.T.reshape(-1, *out_shape))
        return back.reshape(cols.shape[1], -1).T

    probe = op.forward(torch.zeros(1, *shape, dtype=dtype, device=device))
    out_shape = tuple(probe.shape[1:])
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + 7919) & 0x7FFF_FFFF_FFFF)
    x = torch.randn(n, p, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if start is not None:
        if tuple(start.shape[1:]) != shape:
            raise ValueError(f"start vectors of shape {tuple(start.shape[1:])} do not fit the operator's input {shape}")
        warm = start.reshape(len(start), -1)[:p].T.to(device=device, dtype=dtype)
        x[:, : warm.shape[1]] = warm
    x = _orthonormalize(x, None)
    products = 0
    values = residuals = right = left = None
    converged = False
    for round_ in range(max(1, max_restarts) + (start is not None)):
        last = basis = x
        # a warm start is first checked on its own (Rayleigh–Ritz on the start block): an answer that is already
        # converged then costs one forward and one adjoint per vector
        for _ in range(0 if start is not None and round_ == 0 else steps - 1):
            if basis.shape[1] >= n:
                break
            nxt = _orthonormalize(adjoint(forward(last)), basis)
            products += 2 * last.shape[1]
            if nxt.shape[1] == 0:  # an invariant subspace: the Ritz values are exact
                break
            last = nxt
            basis = torch.cat([basis, nxt], dim=1)
        image = forward(basis)  # (m, b)
        products += basis.shape[1]
        u, s, wh = torch.linalg.svd(image, full_matrices=False)
        top = min(p, len(s))
        v = basis @ wh[:top].T  # right Ritz vectors (n, top)
        u = u[:, :top]
        s = s[:top]
        back = adjoint(u)
        products += top
        res = (back - v * s).norm(dim=0)
        values, residuals, right, left = s, res, v, u
        kk = min(k, top)
        if bool((res[:kk] <= tol * s[:kk].clamp_min(torch.finfo(dtype).tiny)).all()) or float(s[0]) == 0.0:
            converged = True
            break
        x = v if v.shape[1] == p else _orthonormalize(torch.cat([v, torch.randn(n, p - v.shape[1], generator=g,
                                                                             dtype=torch.float64).to(v)], 1), None)
    kk = min(k, len(values))
    return Triplets(
        values=values[:kk].double().cpu(),
        right=right[:, :kk].T.reshape(kk, *shape),
        left=left[:, :kk].T.reshape(kk, *out_shape),
        residuals=residuals[:kk].double().cpu(),
        products=products,
        converged=converged,
    )


def _as_operator(layer: nn.Module | Operator, input_shape: Sequence[int] | None) -> Operator:
    if isinstance(layer, nn.Linear):
        return LinearMap(layer.weight.detach())
    if isinstance(layer, nn.Module):
        if input_shape is None:
            raise ValueError("give the layer's input size (H, W)")
        takes = int(getattr(layer, "in_channels", 0))
        dims = len(getattr(layer, "kernel_size", (0, 0)))
        if len(input_shape) == dims + 1 and takes and int(input_shape[0]) != takes:
            raise ValueError(f"input has {input_shape[0]} channels but the layer takes {takes}")
        return conv_operator(layer, input_shape)
    return layer


def sigma_max_power(
    layer: nn.Module | Operator,
    input_shape: Sequence[int] | None = None,
    iters: int = 50,
    tol: float = 1e-4,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    krylov: int = 24,
) -> float:
    """σmax of a layer as it runs, to relative accuracy ``tol``: :func:`top_singular` with ``k = 1`` (a single
    vector: restarted Lanczos on ``AᵀA``, ``krylov`` steps per round, at most ``iters`` rounds).

    Plain power iteration needs thousands of steps on conv operators, whose top singular values cluster (σ(f) is
    continuous in the frequency); the Krylov space of the same products ``AᵀA v`` converges in a few dozen.
    """
    found = top_singular(layer, input_shape, 1, tol=tol, max_restarts=iters, block=1, krylov=krylov, seed=seed,
                         dtype=dtype)
    return float(found.values[0])
