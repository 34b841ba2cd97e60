"""FastClip: clip the top singular values of a conv *as it runs*, through its singular vectors (Boroojeny et al. 2024).

The exact clip of :mod:`ttcompress.spectral.periodic` works on the periodic operator and has to crop the result
back to the kernel's support, so the layer as it runs (zero padding, stride) only approximately meets the bound.
FastClip instead acts on the map the layer really computes and needs nothing but its forward pass:

1. the top ``k`` singular triplets ``A v_i = σ_i u_i`` of the operator come from PowerQR
   (:func:`ttcompress.spectral.power.top_singular`), warm-started from the vectors of the previous call;
2. for a kernel ``W`` the number ``s_i(W) = ⟨u_i, A_W v_i⟩`` is *linear* in ``W`` and equals ``σ_i`` now; its
   gradient ``G_i = ∇_W s_i`` is one backward pass of the conv;
3. the smallest change ``ΔW = Σ_j α_j G_j`` with ``s_i(W + ΔW) = C`` for every ``σ_i > C`` solves the small Gram
   system ``Σ_j ⟨G_i, G_j⟩ α_j = C − σ_i`` (minimum norm: ΔW lies in the span of the G_i; a pseudo-inverse with
   a cut-off, ``GRAM_RTOL``, for nearly parallel G_i);
4. the singular vectors of the new operator differ a little, so steps 1–3 repeat, warm-started, until
   ``σmax ≤ C·(1 + tol)`` or ``rounds`` rounds are done.

For a dense matrix ``G_i = u_i v_iᵀ`` (orthonormal), so one round with ``k`` at least the number of singular values
above C is the exact SVD clip; for a conv the ``G_i`` are those rank-one matrices projected onto the conv structure,
the step also moves the other singular values, hence the rounds.

What changes is the layer's *effective kernel*: an ``nn.Conv2d``'s weight, or a :class:`~ttcompress.tt.TTConv2d`'s
core after QR of its frames (written back with the orthonormal frames, as the periodic clip does; with
orthonormal frames the layer's nonzero singular values are the core's, for any padding).  With ``bn`` (an
``nn.BatchNorm2d`` that consumes the conv's output) the operator is the composition with BatchNorm's linear part in
eval mode, ``diag(γ/√(running_var + ε))``; the kernel still is what changes.  :func:`following_batchnorms` finds
which BatchNorm consumes which conv's output by following the tensors through one forward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ttcompress.errors import UserError
from ttcompress.kernel import apply_output_frame
from ttcompress.probe import probe
from ttcompress.spectral.power import ConvOperator, Triplets, conv_operator, top_singular
from ttcompress.tt import Frames, conv_layers, effective_factors, write_effective

__all__ = [
    "FastClipResult",
    "batchnorm_scale",
    "clip_operator",
    "fastclip",
    "fastclip_kernel",
    "following_batchnorms",
    "layer_sigma",
]

# Relative cut-off of the Gram matrix's pseudo-inverse.  Triplets of nearly equal σ are often near-translates of
# each other, and so are their gradients (Gram condition numbers of 1e6–1e10 on ResNet-20 with k = 4); solving
# such a system exactly makes huge opposite steps that undo each other.  Dropping the directions below 1 % of the
# largest treats near-copies as one constraint; the rounds take care of the rest.
GRAM_RTOL = 1e-2


@dataclass
class FastClipResult:
    """What one :func:`fastclip` call found and did."""

    sigma_before: float  # σmax estimate of the operator before (PowerQR, relative accuracy sv_tol)
    sigma_after: float  # ... after the last round
    rounds: int  # rounds that changed the kernel (0: the layer was already within C·(1+tol))
    products: int  # operator applications, all rounds
    change: float  # ‖ΔW‖_F of the effective kernel
    right: torch.Tensor  # (k, *input_shape): the last right singular vectors, to warm-start the next call
    converged: bool  # sigma_after ≤ C·(1+tol)


# --- the layer's kernel and operator ----------------------------------------------------------------------------------

def batchnorm_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """The eval-mode linear part of a BatchNorm, per channel: ``γ/√(running_var + ε)`` (γ = 1 without affine)."""
    if bn.running_var is None:
        raise ValueError("a BatchNorm without running statistics has no fixed linear part")
    scale = 1.0 / torch.sqrt(bn.running_var.detach() + bn.eps)
    return scale * bn.weight.detach() if bn.weight is not None else scale


def _output_map(frames: Frames, bn: nn.Module | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A matrix ``R`` (r × Cout_kernel) such that the operator is ``conv(R·W)`` up to an isometry on the output:
    None (identity) without BatchNorm; ``diag(d)`` for a conv; the triangular factor of ``diag(d)·Ql`` for a TT
    layer (``diag(d)·Ql = Q·R`` with Q orthonormal columns, which changes no singular value)."""
    if bn is None:
        return None
    d = batchnorm_scale(bn).to(dtype)
    if frames is None:
        return torch.diag(d)
    post = d[:, None] * frames[1].to(device=d.device, dtype=dtype)  # (Cout, r2)
    if post.shape[0] > post.shape[1]:
        post = torch.linalg.qr(post).R
    return post


def clip_operator(layer: nn.Module, input_hw: Sequence[int], kernel: torch.Tensor,
                  post: torch.Tensor | None = None) -> ConvOperator:
    """The operator FastClip works on: ``layer``'s geometry with ``kernel``, followed by ``post`` on the channels."""
    return conv_operator(layer, input_hw, kernel if post is None else apply_output_frame(kernel, post.to(kernel)))


def layer_sigma(
    layer: nn.Module,
    input_hw: Sequence[int],
    *,
    bn: nn.Module | None = None,
    k: int = 1,
    block: int | None = None,
    tol: float = 1e-4,
    start: torch.Tensor | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Triplets:
    """Top ``k`` singular triplets of the layer as it runs (with ``bn``: of the composition conv → BatchNorm), by
    :func:`~ttcompress.spectral.power.top_singular` (``block`` vectors, ``start`` warm-starts) to relative ``tol``."""
    kernel, frames = effective_factors(layer, dtype)
    op = clip_operator(layer, input_hw, kernel, _output_map(frames, bn, dtype))
    return top_singular(op, k=k, block=block, tol=tol, start=_fitting(start, op), seed=seed, dtype=dtype)


# --- the algorithm ------------------------------------------------------------------------------------------------------

def _fitting(start: torch.Tensor | None, op: ConvOperator) -> torch.Tensor | None:
    """``start`` when its vectors fit the operator's input (a layer whose shape changed starts afresh)."""
    if start is None or tuple(start.shape[1:]) != tuple(op.input_shape):
        return None
    return start


def _gradients(op: ConvOperator, kernel: torch.Tensor, post: torch.Tensor | None, found: Triplets,
               index: torch.Tensor) -> torch.Tensor:
    """``(m, kernel.numel())``: ``∇_W ⟨u_i, A_W v_i⟩`` for the triplets in ``index`` (one conv backward each)."""
    grads = []
    with torch.enable_grad():
        for i in index.tolist():
            w = kernel.detach().requires_grad_(True)
            eff = w if post is None else apply_output_frame(w, post.to(w))
            out = dataclasses.replace(op, kernel=eff).forward(found.right[i : i + 1].to(w))
            (g,) = torch.autograd.grad((out * found.left[i : i + 1].to(w)).sum(), w)
            grads.append(g.reshape(-1))
    return torch.stack(grads)


def fastclip_kernel(
    layer: nn.Module,
    input_hw: Sequence[int],
    kernel: torch.Tensor,
    bound: float,
    *,
    post: torch.Tensor | None = None,
    k: int = 1,
    rounds: int = 10,
    tol: float = 1e-3,
    sv_tol: float = 1e-4,
    start: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, FastClipResult]:
    """FastClip of ``kernel`` (in ``layer``'s geometry on ``input_hw`` inputs, followed by the channel map ``post``)
    at ``bound``; returns the new kernel (same dtype and device) and what it did.  Does not touch ``layer``.

    Works in ``kernel``'s dtype.  ``start`` (``(j, *input)``, e.g. an earlier result's ``right``) warm-starts PowerQR.
    """
    if not bound > 0:
        raise ValueError(f"bound must be positive, got {bound}")
    if k < 1 or rounds < 0:
        raise ValueError(f"need k ≥ 1 and rounds ≥ 0, got k={k}, rounds={rounds}")
    dtype = kernel.dtype
    original = kernel.detach()
    current = original.clone()
    op = clip_operator(layer, input_hw, current, post)
    found = top_singular(op, k=k, tol=sv_tol, start=_fitting(start, op), seed=seed, dtype=dtype)
    products = found.products
    before = float(found.values[0])
    limit = bound * (1 + tol)
    done = 0
    while float(found.values[0]) > limit and done < rounds:
        active = torch.nonzero(found.values > bound).reshape(-1)
        grads = _gradients(op, current, post, found, active)  # (m, n)
        gram = grads @ grads.T
        target = (bound - found.values[active]).to(grads)
        alpha = torch.linalg.pinv(gram, hermitian=True, rtol=GRAM_RTOL) @ target
        current = current + (alpha @ grads).reshape(current.shape)
        done += 1
        op = clip_operator(layer, input_hw, current, post)
        found = top_singular(op, k=k, tol=sv_tol, start=found.right, seed=seed + done, dtype=dtype)
        products += found.products + len(active)
    after = float(found.values[0])
    return current, FastClipResult(
        sigma_before=before, sigma_after=after, rounds=done, products=products,
        change=float((current - original).double().norm()), right=found.right.detach(),
        converged=after <= limit,
    )


@torch.no_grad()
def fastclip(
    layer: nn.Module,
    input_hw: Sequence[int],
    bound: float,
    *,
    bn: nn.Module | None = None,
    k: int = 1,
    rounds: int = 10,
    tol: float = 1e-3,
    sv_tol: float = 1e-4,
    start: torch.Tensor | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> FastClipResult:
    """Clip the top singular values of ``layer`` as it runs on ``input_hw`` inputs (an ``nn.Conv2d`` or
    :class:`~ttcompress.tt.TTConv2d`; with ``bn``: of the composition with that BatchNorm in eval mode) at
    ``bound``, in place: rounds of the minimum-norm kernel change that puts the top ``k`` values above ``bound`` at
    ``bound``, until ``σmax ≤ bound·(1 + tol)`` (PowerQR estimate to relative ``sv_tol``) or ``rounds`` rounds.

    A layer already within ``bound·(1 + tol)`` is not written.  Computes in ``dtype``; ``start`` warm-starts.
    """
    if getattr(layer, "groups", 1) != 1:
        raise ValueError("FastClip supports groups=1 only")
    kernel, frames = effective_factors(layer, dtype)
    post = _output_map(frames, bn, dtype)
    new, result = fastclip_kernel(layer, input_hw, kernel, bound, post=post, k=k, rounds=rounds, tol=tol,
                                  sv_tol=sv_tol, start=start, seed=seed)
    if result.rounds:
        write_effective(layer, new, frames)
    return result


# --- which BatchNorm follows which conv -----------------------------------------------------------------------------------

def following_batchnorms(model: nn.Module, input_shape: Sequence[int], net: nn.Module | None = None) -> dict[str, str]:
    """``{conv name: BatchNorm name}`` for every conv / TT layer of ``net`` whose output tensor goes, unchanged,
    straight into a BatchNorm with running statistics — found with hooks during one forward pass of ``model`` on
    a zero input of shape ``input_shape`` (C, H, W), so module names and nesting do not matter.

    An output changed in place before the BatchNorm (e.g. by an in-place ReLU) does not count.  A conv whose output
    feeds two BatchNorms is refused (the composition would not be one operator).
    """
    net = model if net is None else net
    bn_names = {id(m): n for n, m in net.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None}
    outputs: dict[int, tuple[str, torch.Tensor, int]] = {}
    found: dict[str, list[str]] = {}

    def produced(name):
        def hook(_module, _args, out):
            if isinstance(out, torch.Tensor):
                outputs[id(out)] = (name, out, out._version)
        return hook

    def consumes(_module, args):
        x = args[0] if args else None
        entry = outputs.get(id(x)) if isinstance(x, torch.Tensor) else None
        if entry is not None and entry[1] is x and x._version == entry[2]:
            found.setdefault(entry[0], []).append(bn_names[id(_module)])

    handles = [layer.register_forward_hook(produced(name)) for name, layer in conv_layers(net)]
    handles += [m.register_forward_pre_hook(consumes) for m in net.modules() if id(m) in bn_names]
    probe(model, input_shape, handles)
    pairs = {}
    for conv, bns in found.items():
        if len(set(bns)) > 1:
            raise UserError(f"the output of {conv} feeds several BatchNorms ({', '.join(sorted(set(bns)))}); "
                            "--clip-with-bn needs one BatchNorm per conv")
        pairs[conv] = bns[0]
    return pairs
