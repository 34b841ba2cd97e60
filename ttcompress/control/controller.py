"""The controller: the configured control methods of one network, when they run, and what they cost.

Built once per run (:meth:`Controller.from_config`, or with the methods' settings as keywords); the training
loop calls :meth:`Controller.after_step` after every optimizer step and :meth:`Controller.enforce_bounds` once
before saving.  Data-parallel training: every rank runs the same control on the same (all-reduced) weights; the
few scalars that depend on rank-local state go through ``sync`` (a broadcast from rank 0).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ttcompress.control.base import METHODS, ControlContext, ControlMethod, Sync, method_settings, registered
from ttcompress.control.layers import Layers, discover
from ttcompress.control.report import BoundReport
from ttcompress.kernel import Pair

__all__ = ["Controller", "check_combination"]


def check_combination(settings: Any) -> None:
    """Every registered method's check of its settings (``settings``: a mapping, or an object with the settings
    as attributes, such as a finetune configuration)."""
    values = _settings_of(settings)
    for cls in registered():
        cls.check(values)


def _settings_of(source: Any) -> dict[str, Any]:
    defaults = method_settings()
    if isinstance(source, Mapping):
        return {k: source.get(k, d) for k, d in defaults.items()}
    return {k: getattr(source, k, d) for k, d in defaults.items()}


def _sync_device(t: torch.Tensor | None) -> None:
    if t is not None and t.is_cuda:
        torch.cuda.synchronize(t.device)


class Controller:
    """The control methods (:mod:`ttcompress.control.methods`) switched on by ``settings`` for ``net``.

    ``input_sizes`` maps conv/TT layer names to the spatial size of their input; convs it does not name (they
    never run) are not controlled.  ``clip_dtype`` is used for the training-time projections, ``verify_dtype``
    for the final verification; ``sync`` makes a tensor equal on all ranks.  ``batchnorms`` (conv name →
    BatchNorm name, :func:`ttcompress.fastclip.following_batchnorms`) is needed with ``clip_with_bn``.
    """

    def __init__(self, net: nn.Module, input_sizes: dict[str, Pair], *, seed: int = 0, sync: Sync | None = None,
                 clip_dtype: torch.dtype = torch.float32, verify_dtype: torch.dtype = torch.float64,
                 max_reprojections: int = 3, tolerance: float = 0.01, batchnorms: dict[str, str] | None = None,
                 total_steps: int = 0, **settings: Any) -> None:
        unknown = sorted(set(settings) - set(method_settings()))
        if unknown:
            raise TypeError(f"Controller got unknown setting(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(method_settings()))}")
        values = _settings_of(settings)
        check_combination(values)
        self.net = net
        self.settings = values
        self.ctx = ControlContext(seed=int(seed), sync=sync, clip_dtype=clip_dtype, verify_dtype=verify_dtype,
                                  max_reprojections=int(max_reprojections), tolerance=float(tolerance),
                                  total_steps=int(total_steps))
        self.layers: Layers = discover(net, input_sizes, batchnorms)
        self.methods: list[ControlMethod] = [m for cls in registered()
                                             if (m := cls.build(values, self.layers, self.ctx)) is not None]
        self.timings = {name: 0.0 for name in METHODS}

    @classmethod
    def from_config(cls, config: Any, net: nn.Module, input_sizes: dict[str, Pair], sync: Sync | None = None,
                    batchnorms: dict[str, str] | None = None, total_steps: int = 0) -> Controller:
        """Build from anything with the methods' settings as attributes (a finetune configuration);
        ``total_steps`` is the run's length (bound schedules follow it)."""
        return cls(net, input_sizes, seed=getattr(config, "seed", 0), sync=sync, batchnorms=batchnorms,
                   total_steps=total_steps, max_reprojections=getattr(config, "final_reprojections", 3),
                   **_settings_of(config))

    def __getitem__(self, name: str) -> ControlMethod:
        """The method registered as ``name`` (KeyError when it is off)."""
        for method in self.methods:
            if method.name == name:
                return method
        raise KeyError(name)

    @property
    def convs(self) -> list:
        """Every conv (:class:`~ttcompress.control.layers.ControlledConv`) some method controls, once each."""
        seen: dict[str, object] = {}
        for method in self.methods:
            for conv in method.convs:
                seen.setdefault(conv.name, conv)
        return list(seen.values())

    @property
    def skipped(self) -> dict[str, str]:
        """Convs no method controls although conv control is on, with the reason (e.g. 1-D and 3-D convs)."""
        return dict(self.layers.skipped) if any(m.convs for m in self.methods) else {}

    @property
    def active(self) -> bool:
        return any(m.active for m in self.methods)

    @torch.no_grad()
    def after_step(self, step: int) -> list[nn.Module]:
        """Control after optimizer step number ``step`` (1-based): every method that is due, in registry order.
        Returns the conv layers a method rewrote (a projection or division; TT layers also get fresh orthonormal
        frames, so their factors change coordinates)."""
        ref = next(self.net.parameters(), None)
        self.ctx.step = step
        rewritten: dict[str, nn.Module] = {}
        for method in self.methods:
            if method.active and method.due(step):
                _sync_device(ref)
                start = time.perf_counter()
                method.apply()
                _sync_device(ref)
                self.timings[method.name] = self.timings.get(method.name, 0.0) + time.perf_counter() - start
                rewritten.update((c.name, c.layer) for c in method.convs)
        return list(rewritten.values())

    @torch.no_grad()
    def enforce_bounds(self, *, recalibrate: Callable[[], None] | None = None) -> list[BoundReport]:
        """Make every controlled layer meet its bound and report what it took, in method order.

        Each method verifies in its phase: before ``recalibrate()`` (e.g. re-estimating the BatchNorm statistics
        for the final weights), after it (the BatchNorm limit, which reads the running variances), or last
        (FastClip of the composition conv → BatchNorm).  No collectives: under DDP only the rank that saves calls
        it.
        """
        found: dict[str, list[BoundReport]] = {}
        for phase in sorted({m.verify_phase for m in self.methods} | {1}):
            if phase == 1 and recalibrate is not None:
                recalibrate()
            for method in self.methods:
                if method.verify_phase == phase:
                    found[method.name] = method.verify()
        return [r for m in self.methods for r in found.get(m.name, [])]

    def state_dict(self) -> dict:
        return {"timings": dict(self.timings), "methods": {m.name: m.state_dict() for m in self.methods}}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; ValueError when it is not one."""
        timings, methods = state.get("timings", {}), state.get("methods", {})
        if not isinstance(timings, dict) or not isinstance(methods, dict) or \
                not all(isinstance(v, dict) for v in methods.values()):
            raise ValueError("not a controller state")
        self.timings.update({str(k): float(v) for k, v in timings.items()})
        for method in self.methods:
            method.load_state_dict(methods.get(method.name, {}))
