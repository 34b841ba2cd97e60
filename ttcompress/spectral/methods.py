"""σmax of every conv of a network by several methods side by side, each timed per layer.

=========  ===========================================================  =====================================
method     what it computes                                             JSON field
=========  ===========================================================  =====================================
exact      all singular values of the *periodic* conv on the layer's     ``sigma_max``, ``sigma_min``, ``count``
           input size (FFT + SVD, strides by the polyphase split)
f4         Singla & Feizi's bound √(kh·kw)·min_i ‖R_i‖₂ on the          ``f4_bound``
           effective kernel (polyphase version for strides)
fourier    the sampled-symbol bound with its proven grid correction     ``fourier_bound``
gram       Gram iteration on every frequency block of the periodic      ``gram_bound``
           conv (strides by the polyphase split): a proven upper bound
           of the exact periodic σmax, ``gram_iters`` products
gram-zero  the Gram bound of a larger periodic conv that contains the   ``gram_zero_padding_bound``
           zero-padded layer as a submatrix: a proven upper bound of
           σmax as the layer runs
power      σmax of the layer *as it runs* (zero padding, stride,         ``power_zero_padding`` (and
           dilation): PowerQR / block Krylov on the implicit operator,  ``power_top_k`` with ``top_k``)
           converged to ``tol`` (1e-4) relative
=========  ===========================================================  =====================================

F4 and Fourier bound the layer's norm for zero *and* circular padding at every input size, so they are ≥ both the
exact periodic σmax and the zero-padding σmax; the last two are different operators and either can be larger.
``gram`` bounds the periodic σmax on the layer's input size, ``gram-zero`` the zero-padded one
(:mod:`ttcompress.spectral.gram`).

Every method works on the layer's *effective* kernel (:func:`~ttcompress.spectral.network.effective_kernel`): for a
TT layer the core after QR of its frames, which has the whole layer's nonzero singular values for any padding.  A
grouped conv is block diagonal over its groups, so its spectrum is the union of the groups' spectra and its norm the
largest group norm; the methods use that.  Where a method does not apply the field is ``None`` and
:attr:`LayerMethods.skipped` says why: the kernel bounds do not hold for ``reflect`` / ``replicate`` padding (those
paddings copy pixels, which can enlarge the norm), the Fourier bound is implemented for 2-D convs only and the Gram
bounds for 1-D and 2-D convs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ttcompress.errors import UserError
from ttcompress.kernel import Geometry, group_kernels
from ttcompress.progress import Progress
from ttcompress.spectral.bounds import f4_bound, fourier_bound
from ttcompress.spectral.gram import DEFAULT_ITERS, layer_gram_bound
from ttcompress.spectral.network import LayerSpectrum, each_layer, effective_kernel, layer_spectrum
from ttcompress.spectral.power import top_singular
from ttcompress.tt import TTConv

__all__ = ["METHODS", "LayerMethods", "layer_methods", "network_methods", "parse_methods"]

METHODS: tuple[str, ...] = ("exact", "f4", "fourier", "gram", "gram-zero", "power")
"""Method names in their canonical (display) order; ``"all"`` selects every one."""

POWER_TOL = 1e-4
_COPYING_PADDING = ("reflect", "replicate")


def parse_methods(names: str | Iterable[str] | None) -> tuple[str, ...]:
    """Method names from the user — repeated and/or comma-separated, ``all`` for every one — in canonical order.

    ``None`` or nothing gives ``("exact",)``.  An unknown name raises :class:`~ttcompress.errors.UserError`.
    """
    if names is None:
        names = []
    elif isinstance(names, str):
        names = [names]
    chosen: set[str] = set()
    for item in names:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name == "all":
                chosen.update(METHODS)
            elif name in METHODS:
                chosen.add(name)
            else:
                raise UserError(f"unknown spectrum method {name!r}; choose from {', '.join(METHODS)} or all")
    return tuple(m for m in METHODS if m in chosen) or ("exact",)


@dataclass
class LayerMethods:
    """One layer's results; a method that was not run (or does not apply) leaves its fields ``None``."""

    name: str
    kind: str  # "conv" | "tt"
    input_size: tuple[int, ...]  # one int per spatial dim
    stride: tuple[int, ...]
    methods: tuple[str, ...]
    spectrum: LayerSpectrum | None = None  # exact
    f4_bound: float | None = None
    fourier_bound: float | None = None
    gram_bound: float | None = None
    gram_zero_padding_bound: float | None = None
    power_zero_padding: float | None = None
    power_top_k: list[float] | None = None
    power_converged: bool | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per method that ran
    skipped: dict[str, str] = field(default_factory=dict)  # method → why it gives no value

    @property
    def sigma_max(self) -> float | None:
        return None if self.spectrum is None else self.spectrum.sigma_max

    def value(self, method: str) -> float | None:
        """The σmax (or bound) a method gave."""
        if method == "exact":
            return self.sigma_max
        return {"f4": self.f4_bound, "fourier": self.fourier_bound, "gram": self.gram_bound,
                "gram-zero": self.gram_zero_padding_bound, "power": self.power_zero_padding}[method]

    def ratio(self, method: str) -> float | None:
        """``value(method) / exact σmax`` (``None`` without both)."""
        value, exact = self.value(method), self.sigma_max
        if value is None or exact is None or exact == 0:
            return None
        return value / exact

    def to_json(self) -> dict:
        spec = self.spectrum
        return {
            "name": self.name, "kind": self.kind, "input_size": list(self.input_size), "stride": list(self.stride),
            "sigma_max": None if spec is None else spec.sigma_max,
            "sigma_min": None if spec is None else spec.sigma_min,
            "count": None if spec is None else spec.count,
            "f4_bound": self.f4_bound,
            "fourier_bound": self.fourier_bound,
            "gram_bound": self.gram_bound,
            "gram_zero_padding_bound": self.gram_zero_padding_bound,
            "power_zero_padding": self.power_zero_padding,
            "power_top_k": self.power_top_k,
            "power_converged": self.power_converged,
            "seconds": dict(self.seconds),
        }


def _kernel_bound(layer: nn.Module, bound, dtype: torch.dtype) -> float:
    kernel, _ = effective_kernel(layer)
    geometry = Geometry.of(layer)
    with torch.no_grad():
        return max(float(bound(k.to(dtype), geometry.stride, geometry.dilation))
                   for k in group_kernels(kernel, int(getattr(layer, "groups", 1))))


def layer_methods(
    name: str,
    layer: nn.Module,
    input_hw: Sequence[int],
    methods: Sequence[str] = ("exact",),
    *,
    dtype: torch.dtype = torch.float32,
    top_k: int | None = None,
    tol: float = POWER_TOL,
    gram_iters: int = DEFAULT_ITERS,
) -> LayerMethods:
    """Run ``methods`` (names from :data:`METHODS`) on one conv / TT layer with ``input_hw`` inputs (one int per
    spatial dim; every method for 2-D layers, all but ``fourier`` for 1-D / 3-D ones).

    ``dtype`` is the precision of the exact spectrum and of the kernel bounds; power iteration always runs in
    float64 to relative tolerance ``tol``.  ``top_k`` makes ``power`` find the top ``k`` singular values of the
    running layer (``power_top_k``) instead of σmax alone.  ``gram_iters`` is the number of Gram products of
    ``gram`` and ``gram-zero`` (always float64).  Each method's wall time (effective kernel included) goes to
    ``seconds``.
    """
    methods = parse_methods(methods)
    if top_k is not None and top_k < 1:
        raise UserError(f"top-k must be at least 1, got {top_k}")
    if gram_iters < 1:
        raise UserError(f"gram iterations must be at least 1, got {gram_iters}")
    geometry = Geometry.of(layer)
    kind = "tt" if isinstance(layer, TTConv) else "conv"
    out = LayerMethods(name, kind, tuple(int(v) for v in input_hw), tuple(geometry.stride), methods)
    padding_mode = str(getattr(layer, "padding_mode", "zeros"))
    for method in methods:
        if method == "fourier" and len(geometry.stride) != 2:
            out.skipped[method] = f"{len(geometry.stride)}-D conv (the Fourier bound is implemented for 2-D convs)"
            continue
        if method in ("gram", "gram-zero") and len(geometry.stride) == 3:
            out.skipped[method] = "3-D conv (the Gram bounds are implemented for 1-D and 2-D convs)"
            continue
        if method in ("f4", "fourier", "gram-zero") and padding_mode in _COPYING_PADDING:
            out.skipped[method] = f"{padding_mode} padding (the kernel bounds assume zero or circular padding)"
            continue
        if method == "gram" and any(n % s for n, s in zip(out.input_size, geometry.stride)):
            out.skipped[method] = "input size not divisible by the stride (no periodic operator)"
            continue
        start = time.perf_counter()
        if method == "exact":
            out.spectrum = layer_spectrum(name, layer, out.input_size, dtype=dtype)  # groups: union of spectra
        elif method == "f4":
            out.f4_bound = _kernel_bound(layer, f4_bound, dtype)
        elif method == "fourier":
            out.fourier_bound = _kernel_bound(layer, fourier_bound, dtype)
        elif method in ("gram", "gram-zero"):
            try:
                value = float(layer_gram_bound(layer, out.input_size, zero_padding=method == "gram-zero",
                                               iters=gram_iters))
            except ValueError as err:  # circular padding with more outputs than the periodic conv
                out.skipped[method] = str(err)
                continue
            if method == "gram":
                out.gram_bound = value
            else:
                out.gram_zero_padding_bound = value
        else:
            found = top_singular(layer, out.input_size, top_k or 1, tol=tol)
            out.power_zero_padding = float(found.values[0])
            out.power_converged = bool(found.converged)
            if top_k is not None:
                out.power_top_k = [float(v) for v in found.values]
        out.seconds[method] = time.perf_counter() - start
    return out


def network_methods(
    model: nn.Module,
    input_size: Sequence[int],
    methods: Sequence[str] = ("exact",),
    *,
    net: nn.Module | None = None,
    dtype: torch.dtype = torch.float32,
    top_k: int | None = None,
    tol: float = POWER_TOL,
    gram_iters: int = DEFAULT_ITERS,
    progress: Progress | None = None,
) -> list[LayerMethods]:
    """:func:`layer_methods` on every conv and TT layer of ``net`` (default ``model``), each on the input size it
    sees when ``model`` runs on ``input_size`` (C, H, W) inputs."""
    methods = parse_methods(methods)
    return each_layer(model, input_size,
                      lambda name, layer, size: layer_methods(name, layer, size, methods, dtype=dtype, top_k=top_k,
                                                              tol=tol, gram_iters=gram_iters),
                      net=net, progress=progress)
