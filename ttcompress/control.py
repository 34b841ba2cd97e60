"""What happens to a network's singular values during training: clipping, division, BatchNorm and linear limits.

A :class:`Controller` is built once per run from the network and the spatial input size of every conv (from
:func:`ttcompress.spectral.network.layer_input_sizes`).  The training loop calls :meth:`Controller.after_step`
after every optimizer step and :meth:`Controller.enforce_bounds` once before saving.

* **clip** (``clip_to`` C, every ``clip_every`` steps; Sedghi et al. 2019 with strides, Senderovich et al. 2022):
  for each conv, the exact singular values of its periodic strided operator are clipped at C, the operator is
  transformed back and cropped to the kernel's support.  A TT layer is first brought to orthonormal frames by QR
  (the triangular factors folded into the core), only the core is clipped, and the layer is rewritten with the
  orthonormal frames: its operator is then exactly the clipped core's (Theorem 3.2).  Runs on the training
  device, batched over frequencies by :func:`ttcompress.spectral.periodic.clip`.
* **divide** (``divide_to`` D, every step; Gouk et al. 2021): each conv (TT: its core after QR) is divided by
  ``max(1, σ̂/D)`` with σ̂ from power iteration on the layer as it runs (zero padding), one iteration per step from
  vectors kept between steps.
* **bn** (``bn_to`` X, every step): ``γ ← γ / max(1, max|γ/√(running_var+ε)|/X)`` (Gouk's BatchNorm limit).
* **linear** (``linear_to`` Y): every ``nn.Linear`` — divided by its power-iteration σ̂ every step when dividing,
  otherwise its exact singular values are clipped at Y (on the clip schedule, or every step without ``clip_to``).
* **fastclip** (``fastclip_to`` C, every ``fastclip_every`` steps; Boroojeny et al. 2024): the top singular values
  of each conv *as it runs* (zero padding, stride; TT: its core after QR) are brought to C through their singular
  vectors, :func:`ttcompress.fastclip.fastclip`, warm-started from the vectors kept per layer (part of the state).
  With ``clip_with_bn`` the operator is the conv followed by its BatchNorm in eval mode (the BatchNorm found by
  :func:`ttcompress.fastclip.following_batchnorms`; the map is passed in as ``batchnorms``).  It replaces clip and
  divide (combining them is refused).

The crop makes a single clip approximate, so :meth:`Controller.enforce_bounds` verifies every controlled conv with
its exact spectrum, re-projects up to ``max_reprojections`` times and rescales as a last resort, and reports what
each layer needed.  The conv bound is ``clip_to``, or ``divide_to`` without clipping, or the smaller of the two.
With FastClip the verification is on the operator FastClip controls (zero-padded, with BatchNorm under
``clip_with_bn``): σmax by PowerQR to 1e-4, more FastClip rounds above ``C·(1 + 1e-3)``, rescaling as the last
resort; under ``clip_with_bn`` it comes after the BatchNorm recalibration and limit, which change the composition.

Data-parallel training: every rank runs the same control on the same (all-reduced) weights.  Power-iteration
vectors start from the same seed on every rank; the few scalars that depend on rank-local state (σ̂ and the
BatchNorm running variances, which each rank updates from its own batch) go through ``sync`` (a broadcast from
rank 0) so that all ranks apply exactly the same factors, and clipped weights are broadcast likewise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ttcompress.errors import UserError
from ttcompress.fastclip import fastclip, layer_sigma
from ttcompress.kernel import Geometry, Pair
from ttcompress.spectral.periodic import clip as clip_kernel
from ttcompress.spectral.periodic import singular_values
from ttcompress.spectral.power import LinearMap, PowerIteration, conv_operator
from ttcompress.tt import TTConv2d, conv_layers, effective_factors, write_effective

Sync = Callable[[torch.Tensor], None]  # in place: make the tensor equal on every rank (broadcast from rank 0)

__all__ = ["BoundReport", "Controller", "check_control_combination", "orthogonal_loss"]

FASTCLIP_TOL = 1e-3  # FastClip's target: σmax ≤ C·(1 + FASTCLIP_TOL) ...
FASTCLIP_SV_TOL = 1e-4  # ... with σmax from PowerQR to this relative accuracy


# --- orthogonal loss (paper eq. 11) ---------------------------------------------------------------------------------

def orthogonal_loss(net: nn.Module) -> torch.Tensor:
    """Mean squared non-orthonormality of the TT frames (paper eq. 11, without the factor k).

    For every TT layer: ``‖F Fᵀ − I‖²_F`` for the first frame F (r1×Cin, orthonormal rows) and ``‖LᵀL − I‖²_F``
    for the last frame L (Cout×r2, orthonormal columns); summed over layers and divided by the total number of
    Gram entries (``Σ r1² + r2²``).  Every layer with frames takes part through its ``orthogonal_terms()`` method
    returning ``(sum of squared deviations, entry count)`` (TT layers of any dimension, SOC-TT layers).  Differentiable; 0 for a network
    without such layers.
    """
    total: torch.Tensor | None = None
    entries = 0
    for module in net.modules():
        if callable(getattr(module, "orthogonal_terms", None)):
            dev, count = module.orthogonal_terms()
            if count:
                total = dev if total is None else total + dev
                entries += int(count)
    if total is None or entries == 0:
        param = next(net.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total / entries


# --- reports ----------------------------------------------------------------------------------------------------------

@dataclass
class BoundReport:
    """What the final verification found and did for one controlled layer."""

    name: str
    kind: str  # "conv" | "tt" | "linear" | "bn"
    bound: float
    sigma_before: float  # exact σmax (conv: periodic spectrum; linear: matrix; bn: max |γ/√(var+ε)|)
    sigma_after: float
    reprojections: int = 0  # periodic: re-projections; fastclip: FastClip rounds
    rescale: float | None = None  # factor applied as the last resort
    operator: str = "periodic"  # what σ is of: periodic | zero-padded | zero-padded+bn | matrix | bn

    @property
    def action(self) -> str:
        did = (f"FastClip ×{self.reprojections}" if self.operator.startswith("zero-padded")
               else f"re-projected ×{self.reprojections}")
        if self.rescale is not None:
            return f"{did}, rescaled ×{self.rescale:.4g}" if self.reprojections else f"rescaled ×{self.rescale:.4g}"
        if self.reprojections:
            return did
        return "ok"

    def to_json(self) -> dict:
        out = asdict(self)
        out["action"] = self.action
        return out


# --- helpers --------------------------------------------------------------------------------------------------------

@dataclass
class _Conv:
    name: str
    layer: nn.Module
    input_size: Pair
    bn: nn.Module | None = None  # the BatchNorm composed with the conv (FastClip with clip_with_bn)

    @property
    def is_tt(self) -> bool:
        return isinstance(self.layer, TTConv2d)

    @property
    def geometry(self) -> Geometry:
        return Geometry.of(self.layer)


def _exact_sigma(conv: _Conv, kernel: torch.Tensor, dtype: torch.dtype) -> float:
    return float(singular_values(kernel, conv.input_size, conv.geometry, dtype=dtype)[0])


def _matrix_clip(weight: torch.Tensor, bound: float) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return ((u * s.clamp(max=bound)) @ vh).to(weight.dtype)


def _bn_norm(bn: nn.BatchNorm2d) -> torch.Tensor:
    return (bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)).abs().max()


def _sync_device(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


# --- the controller ---------------------------------------------------------------------------------------------------

class Controller:
    """Applies the configured singular-value control to ``net`` during training; see the module docstring.

    ``input_sizes`` maps conv/TT layer names to the spatial size of their input; convs it does not name (they
    never run) are not controlled.  ``clip_dtype`` is used for the training-time clips (float32: complex64 SVDs);
    the final verification uses ``verify_dtype`` (float64).  ``sync`` makes a tensor equal on all ranks.
    ``batchnorms`` (conv name → BatchNorm name, from :func:`ttcompress.fastclip.following_batchnorms`) is needed
    with ``clip_with_bn``; convs it does not name are clipped alone.
    """

    def __init__(
        self,
        net: nn.Module,
        input_sizes: dict[str, Pair],
        *,
        clip_to: float | None = None,
        clip_every: int = 100,
        divide_to: float | None = None,
        bn_to: float | None = None,
        linear_to: float | None = None,
        power_iters: int = 1,
        seed: int = 0,
        clip_dtype: torch.dtype = torch.float32,
        verify_dtype: torch.dtype = torch.float64,
        max_reprojections: int = 3,
        tolerance: float = 0.01,
        sync: Sync | None = None,
        fastclip_to: float | None = None,
        fastclip_every: int = 100,
        fastclip_k: int = 1,
        fastclip_rounds: int = 10,
        clip_with_bn: bool = False,
        batchnorms: dict[str, str] | None = None,
    ) -> None:
        for flag, value in (("--clip-to", clip_to), ("--divide-to", divide_to), ("--bn-to", bn_to),
                            ("--linear-to", linear_to), ("--fastclip-to", fastclip_to)):
            if value is not None and not value > 0:
                raise UserError(f"{flag} must be positive, got {value}")
        for flag, value in (("--clip-every", clip_every), ("--fastclip-every", fastclip_every),
                            ("--fastclip-k", fastclip_k), ("--fastclip-rounds", fastclip_rounds)):
            if value < 1:
                raise UserError(f"{flag} must be a positive integer, got {value}")
        check_control_combination(clip_to, divide_to, fastclip_to, clip_with_bn)
        if clip_with_bn and batchnorms is None:
            raise UserError("clip_with_bn needs the conv → BatchNorm map: pass "
                            "batchnorms=following_batchnorms(model, input_shape, net)")
        self.net = net
        self.clip_to, self.clip_every, self.divide_to = clip_to, int(clip_every), divide_to
        self.bn_to, self.linear_to = bn_to, linear_to
        self.fastclip_to, self.fastclip_every = fastclip_to, int(fastclip_every)
        self.fastclip_k, self.fastclip_rounds, self.clip_with_bn = int(fastclip_k), int(fastclip_rounds), clip_with_bn
        self.batchnorms = dict(batchnorms or {}) if clip_with_bn else {}
        self.clip_dtype, self.verify_dtype = clip_dtype, verify_dtype
        self.max_reprojections, self.tolerance = int(max_reprojections), float(tolerance)
        self.sync = sync
        self.seed = int(seed)
        self.power = PowerIteration(seed=seed, iters=power_iters)
        self.fastclip_vectors: dict[str, torch.Tensor] = {}  # right singular vectors per conv, for warm starts
        self.timings = {"clip": 0.0, "divide": 0.0, "fastclip": 0.0, "bn": 0.0, "linear": 0.0}

        self.convs: list[_Conv] = []
        self.skipped: dict[str, str] = {}  # layer name → why it is not controlled
        if self.conv_bound is not None:
            for name, layer in conv_layers(net):
                if name not in input_sizes:
                    continue
                if len(layer.kernel_size) != 2:  # 1-D / 3-D convs: spectra yes, clipping/division not (yet)
                    self.skipped[name] = f"{len(layer.kernel_size)}-D conv: clipping and division support 2-D only"
                    continue
                if getattr(layer, "groups", 1) != 1:
                    raise UserError(f"layer {name} is a grouped conv (groups={layer.groups}); singular-value "
                                    "control supports groups=1 only")
                size = tuple(int(v) for v in input_sizes[name])
                (s1, s2) = Geometry.of(layer).stride
                if fastclip_to is None and (size[0] % s1 or size[1] % s2):  # FastClip needs no periodic spectrum
                    raise UserError(f"layer {name}: input size {size[0]}×{size[1]} is not divisible by its stride "
                                    f"{s1}×{s2}; exact spectra need an input size that is a multiple of the stride")
                bn = net.get_submodule(self.batchnorms[name]) if name in self.batchnorms else None
                self.convs.append(_Conv(name, layer, (size[0], size[1]), bn))
        if self.skipped:
            import warnings

            warnings.warn("singular-value control skips " + "; ".join(f"{n}: {why}" for n, why in self.skipped.items()),
                          UserWarning, stacklevel=2)
        self.linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)] if linear_to else []
        self.bns = [(n, m) for n, m in net.named_modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.running_var is not None
                    ] if bn_to else []

    @classmethod
    def from_config(cls, config, net: nn.Module, input_sizes: dict[str, Pair], sync: Sync | None = None,
                    batchnorms: dict[str, str] | None = None) -> Controller:
        """Build from anything with the :class:`ttcompress.train.FinetuneConfig` control fields."""
        return cls(net, input_sizes, clip_to=config.clip_to, clip_every=config.clip_every,
                   divide_to=config.divide_to, bn_to=config.bn_to, linear_to=config.linear_to,
                   power_iters=config.power_iters, seed=config.seed, sync=sync,
                   fastclip_to=getattr(config, "fastclip_to", None),
                   fastclip_every=getattr(config, "fastclip_every", 100), fastclip_k=getattr(config, "fastclip_k", 1),
                   fastclip_rounds=getattr(config, "fastclip_rounds", 10),
                   clip_with_bn=bool(getattr(config, "clip_with_bn", False)), batchnorms=batchnorms)

    @property
    def conv_bound(self) -> float | None:
        bounds = [b for b in (self.clip_to, self.divide_to, self.fastclip_to) if b is not None]
        return min(bounds) if bounds else None

    @property
    def active(self) -> bool:
        return bool(self.convs or self.linears or self.bns)

    # --- every step ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Control after optimizer step number ``step`` (1-based): divide/bn/linear every step, clip every N."""
        clip_now = self.clip_to is not None and step % self.clip_every == 0
        if self.divide_to is not None and self.convs:
            self._timed("divide", self.divide_convs)
        if clip_now and self.convs:
            self._timed("clip", self.clip_convs)
        if self.fastclip_to is not None and step % self.fastclip_every == 0 and self.convs:
            self._timed("fastclip", self.fastclip_convs)
        if self.linears:
            if self.divide_to is not None:
                self._timed("linear", self.divide_linears)
            elif clip_now or self.clip_to is None:
                self._timed("linear", self.clip_linears)
        if self.bns:
            self._timed("bn", self.limit_bn)

    def _timed(self, key: str, fn: Callable[[], None]) -> None:
        ref = next(self.net.parameters())
        _sync_device(ref)
        start = time.perf_counter()
        fn()
        _sync_device(ref)
        self.timings[key] += time.perf_counter() - start

    def _broadcast(self, tensors: Iterable[torch.Tensor]) -> None:
        if self.sync is None:
            return
        for t in tensors:
            self.sync(t)

    def _conv_params(self, conv: _Conv) -> list[torch.Tensor]:
        return [p.data for p in conv.layer.parameters() if p.dim() > 1]

    @torch.no_grad()
    def clip_convs(self, bound: float | None = None) -> None:
        """One Sedghi projection of every controlled conv at ``bound`` (default: the conv bound)."""
        bound = self.conv_bound if bound is None else bound
        for conv in self.convs:
            work = torch.float64 if conv.is_tt else conv.layer.weight.dtype
            kernel, frames = effective_factors(conv.layer, work)
            clipped = clip_kernel(kernel, conv.input_size, bound, conv.geometry, dtype=self.clip_dtype)
            write_effective(conv.layer, clipped, frames)
            self._broadcast(self._conv_params(conv))

    @torch.no_grad()
    def fastclip_convs(self, rounds: int | None = None) -> None:
        """FastClip of every controlled conv at ``fastclip_to`` (at most ``rounds`` rounds, default
        ``fastclip_rounds``), warm-started from and updating the kept singular vectors."""
        assert self.fastclip_to is not None
        for conv in self.convs:
            result = fastclip(conv.layer, conv.input_size, self.fastclip_to, bn=conv.bn, k=self.fastclip_k,
                              rounds=self.fastclip_rounds if rounds is None else rounds, tol=FASTCLIP_TOL,
                              sv_tol=FASTCLIP_SV_TOL, start=self.fastclip_vectors.get(conv.name), seed=self.seed,
                              dtype=self.clip_dtype)
            self.fastclip_vectors[conv.name] = result.right
            self._broadcast(self._conv_params(conv))

    @torch.no_grad()
    def divide_convs(self) -> None:
        """Gouk's division: every conv (TT: its core after QR) by ``max(1, σ̂/D)``, σ̂ by power iteration."""
        assert self.divide_to is not None
        prepared = []
        sigmas = []
        for conv in self.convs:
            kernel, frames = effective_factors(conv.layer, torch.float64 if conv.is_tt else conv.layer.weight.dtype)
            dtype = next(conv.layer.parameters()).dtype  # iterate in the training precision
            op = conv_operator(conv.layer, conv.input_size, kernel.to(dtype))
            sigmas.append(self.power.estimate(conv.name, op).to(torch.float64))
            prepared.append((conv, kernel, frames))
        sigma = torch.stack(sigmas)
        if self.sync is not None:
            self.sync(sigma)
        factors = torch.clamp(sigma / self.divide_to, min=1.0)
        for (conv, kernel, frames), factor in zip(prepared, factors):
            write_effective(conv.layer, kernel / factor.to(kernel.dtype), frames)

    @torch.no_grad()
    def divide_linears(self) -> None:
        assert self.linear_to is not None
        sigma = torch.stack([self.power.estimate(name, LinearMap(m.weight.detach())).to(torch.float64)
                             for name, m in self.linears])
        if self.sync is not None:
            self.sync(sigma)
        for (_, m), s in zip(self.linears, sigma):
            m.weight.div_(torch.clamp(s / self.linear_to, min=1.0).to(m.weight.dtype))

    @torch.no_grad()
    def clip_linears(self) -> None:
        assert self.linear_to is not None
        for _, m in self.linears:
            m.weight.copy_(_matrix_clip(m.weight.detach(), self.linear_to))
            self._broadcast([m.weight.data])

    @torch.no_grad()
    def limit_bn(self) -> None:
        assert self.bn_to is not None
        norms = torch.stack([_bn_norm(m).to(torch.float64) for _, m in self.bns])
        if self.sync is not None:
            self.sync(norms)
        for (_, m), norm in zip(self.bns, norms):
            m.weight.div_(torch.clamp(norm / self.bn_to, min=1.0).to(m.weight.dtype))

    # --- final verification -------------------------------------------------------------------------------------

    @torch.no_grad()
    def enforce_bounds(
        self,
        net: nn.Module | None = None,
        input_sizes: dict[str, Pair] | None = None,
        *,
        recalibrate: Callable[[], None] | None = None,
    ) -> list[BoundReport]:
        """Make every controlled layer meet its bound exactly (up to ``tolerance``) and report what it took.

        Convs: exact σmax of the periodic operator (``verify_dtype``); above ``bound·(1+tolerance)`` the kernel is
        re-projected (clip at the bound, crop) up to ``max_reprojections`` times, then rescaled by bound/σmax.
        Linear layers: exact SVD, clipped when above.  Then ``recalibrate()`` if given (e.g. re-estimating the
        BatchNorm statistics for the final weights), and last the exact BatchNorm limit, which reads the running
        variances.  ``net``/``input_sizes`` default to the ones the controller was built with.  No collectives:
        under DDP only the rank that saves needs to call it.

        With FastClip the convs are checked as they run instead (:meth:`_verify_fastclip`), and under
        ``clip_with_bn`` after the recalibration and the BatchNorm limit, so that the composition verified is
        the one saved; the conv reports still come first.
        """
        if (net is not None and net is not self.net) or input_sizes is not None:
            sizes = input_sizes if input_sizes is not None else {c.name: c.input_size for c in self.convs}
            other = Controller(self.net if net is None else net, sizes, clip_to=self.clip_to, clip_every=self.clip_every,
                               divide_to=self.divide_to, bn_to=self.bn_to, linear_to=self.linear_to,
                               verify_dtype=self.verify_dtype, max_reprojections=self.max_reprojections,
                               tolerance=self.tolerance, seed=self.seed, fastclip_to=self.fastclip_to,
                               fastclip_every=self.fastclip_every, fastclip_k=self.fastclip_k,
                               fastclip_rounds=self.fastclip_rounds, clip_with_bn=self.clip_with_bn,
                               batchnorms=self.batchnorms if self.clip_with_bn else None)
            other.fastclip_vectors = dict(self.fastclip_vectors)
            return other.enforce_bounds(recalibrate=recalibrate)
        convs_last = self.fastclip_to is not None and self.clip_with_bn
        reports: list[BoundReport] = [] if convs_last else self._verify_convs()
        for name, m in self.linears:
            assert self.linear_to is not None
            before = float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
            report = BoundReport(name, "linear", self.linear_to, before, before, operator="matrix")
            if before > self.linear_to * (1 + self.tolerance):
                m.weight.copy_(_matrix_clip(m.weight.detach(), self.linear_to))
                report.reprojections = 1
                report.sigma_after = float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
            reports.append(report)
        if recalibrate is not None:
            recalibrate()
        if self.bns:
            before = [float(_bn_norm(m)) for _, m in self.bns]
            sync, self.sync = self.sync, None  # verification runs on one rank (the one that saves): no collectives
            try:
                self.limit_bn()
            finally:
                self.sync = sync
            for (name, m), b in zip(self.bns, before):
                assert self.bn_to is not None
                reports.append(BoundReport(name, "bn", self.bn_to, b, float(_bn_norm(m)),
                                           rescale=self.bn_to / b if b > self.bn_to else None, operator="bn"))
        if convs_last:
            reports[:0] = self._verify_convs()
        return reports

    def _verify_convs(self) -> list[BoundReport]:
        if self.fastclip_to is not None:
            return [self._verify_fastclip(conv) for conv in self.convs]
        reports: list[BoundReport] = []
        bound = self.conv_bound
        limit = None if bound is None else bound * (1 + self.tolerance)
        for conv in self.convs:
            assert bound is not None and limit is not None
            kernel, frames = effective_factors(conv.layer, self.verify_dtype)
            sigma = before = _exact_sigma(conv, kernel, self.verify_dtype)
            report = BoundReport(conv.name, "tt" if conv.is_tt else "conv", bound, before, before)
            changed = False
            while sigma > limit and report.reprojections < self.max_reprojections:
                kernel = clip_kernel(kernel, conv.input_size, bound, conv.geometry, dtype=self.verify_dtype)
                sigma = _exact_sigma(conv, kernel, self.verify_dtype)
                report.reprojections += 1
                changed = True
            if sigma > limit:
                report.rescale = bound / sigma
                kernel = kernel * report.rescale
                sigma = _exact_sigma(conv, kernel, self.verify_dtype)
                changed = True
            if changed:
                write_effective(conv.layer, kernel, frames)
            report.sigma_after = sigma
            reports.append(report)
        return reports

    def _verify_fastclip(self, conv: _Conv) -> BoundReport:
        """σmax of the conv as it runs (with its BatchNorm under ``clip_with_bn``) by PowerQR to relative 1e-4 in
        ``verify_dtype``; above ``C·(1 + 1e-3)``: up to ``fastclip_rounds`` FastClip rounds, then rescaling by
        C/σmax (the operator is linear in the kernel, so that lands σmax on C)."""
        assert self.fastclip_to is not None
        bound, dtype = self.fastclip_to, self.verify_dtype
        limit = bound * (1 + FASTCLIP_TOL)
        # the kept vectors plus one seeded random vector, so that a top direction new since the last clip is not
        # missed for want of a component in the start block
        k = self.fastclip_k

        def measure(start):
            return layer_sigma(conv.layer, conv.input_size, bn=conv.bn, k=k, block=k + 1, tol=FASTCLIP_SV_TOL,
                               start=start, seed=self.seed, dtype=dtype)

        found = measure(self.fastclip_vectors.get(conv.name))
        sigma = before = float(found.values[0])
        report = BoundReport(conv.name, "tt" if conv.is_tt else "conv", bound, before, before,
                             operator="zero-padded+bn" if conv.bn is not None else "zero-padded")
        start = found.right
        if sigma > limit:
            result = fastclip(conv.layer, conv.input_size, bound, bn=conv.bn, k=k, rounds=self.fastclip_rounds,
                              tol=FASTCLIP_TOL, sv_tol=FASTCLIP_SV_TOL, start=start, seed=self.seed, dtype=dtype)
            report.reprojections = result.rounds
            found = measure(result.right)
            sigma, start = float(found.values[0]), found.right
        if sigma > limit:
            report.rescale = bound / sigma
            kernel, frames = effective_factors(conv.layer, dtype)
            write_effective(conv.layer, kernel * report.rescale, frames)
            found = measure(start)
            sigma = float(found.values[0])
        self.fastclip_vectors[conv.name] = found.right
        report.sigma_after = sigma
        return report

    # --- state ----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"power": self.power.state_dict(), "timings": dict(self.timings),
                "fastclip": {k: v.detach().cpu().clone() for k, v in self.fastclip_vectors.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.power.load_state_dict(state.get("power", {}))
        self.timings.update({k: float(v) for k, v in state.get("timings", {}).items()})
        self.fastclip_vectors = {str(k): v.clone() for k, v in state.get("fastclip", {}).items()}


def check_control_combination(clip_to: float | None, divide_to: float | None, fastclip_to: float | None,
                              clip_with_bn: bool) -> None:
    """Refuse conv controls that do not go together (a :class:`UserError` naming the flags)."""
    if clip_with_bn and fastclip_to is None:
        raise UserError("--clip-with-bn needs --fastclip-to C (it clips the composition conv → BatchNorm)")
    if fastclip_to is not None and (clip_to is not None or divide_to is not None):
        other = "--clip-to" if clip_to is not None else "--divide-to"
        raise UserError(f"--fastclip-to and {other} both control the convs' singular values (as they run vs "
                        f"{'periodic' if clip_to is not None else 'divided by a power-iteration estimate'}); "
                        "give one of them")
