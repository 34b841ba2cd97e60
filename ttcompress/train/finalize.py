"""After the last step: verify → recalibrate BatchNorm → evaluate → save.

The exact verification of every controlled layer (:meth:`ttcompress.control.Controller.enforce_bounds`:
re-projection, rescaling as the last resort) comes first; in its middle, ``bn_recalibrate`` training batches
re-estimate the BatchNorm running statistics for the final weights (the last projection changed them after the
statistics were gathered; the weights themselves are not touched), then the BatchNorm limit; with ``fastclip_to``
and ``clip_with_bn`` the convs are verified last, on the composition with the final BatchNorms.  Then the test
accuracy, and the output (:meth:`ttcompress.train.state.RunFiles.write_output`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ttcompress.control import BoundReport, Controller
from ttcompress.progress import Progress

__all__ = ["Verification", "accuracy", "recalibrate_bn", "verification_note", "verify"]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches, count: int) -> int:
    """Re-estimate every BatchNorm's running statistics as the plain average over ``count`` training batches.

    The final projection changes the conv weights after the last step, which leaves the running statistics
    describing the previous weights; this refreshes them (the weights are not touched).  Returns the number of
    batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or count <= 0:
        return 0
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    used = 0
    try:
        for x, _ in batches:
            if used >= count:
                break
            model(x)
            used += 1
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was_training)
    return used


@dataclass
class Verification:
    bounds: list[BoundReport] = field(default_factory=list)
    time_verify: float = 0.0
    time_bn_recalibrate: float = 0.0


def verify(controller: Controller, model: nn.Module, batches, epoch: int, recalibrate_batches: int) -> Verification:
    """The final verification, with the BatchNorm recalibration on ``batches`` (epoch ``epoch``'s order) when
    there are convs under control and ``recalibrate_batches`` > 0."""
    done = Verification()
    if not controller.active:
        return done
    t0 = time.perf_counter()
    recalibrate = None
    if controller.convs and recalibrate_batches > 0:
        def recalibrate() -> None:
            start = time.perf_counter()
            batches.set_epoch(epoch)
            recalibrate_bn(model, batches, recalibrate_batches)
            done.time_bn_recalibrate = time.perf_counter() - start
    done.bounds = controller.enforce_bounds(recalibrate=recalibrate)
    done.time_verify = time.perf_counter() - t0 - done.time_bn_recalibrate
    return done


def verification_note(bounds: list[BoundReport], clip_with_bn: bool) -> str | None:
    """One line on the convs the final verification had to fix, or None."""
    convs = [b for b in bounds if b.kind in ("conv", "tt")]
    fixed = [b for b in convs if b.reprojections or b.rescale is not None]
    if not fixed:
        return None
    rescaled = [b for b in fixed if b.rescale is not None]
    scale = f"×{min(b.rescale for b in rescaled):.3g}" if rescaled else ""
    if "-padded" in fixed[0].operator:
        what = (f"above σmax ≤ {fixed[0].bound:g}·1.001 as they run{' with their BatchNorm' if clip_with_bn else ''}"
                f" (up to {max(b.sigma_before for b in fixed):.4g}); FastClip rounds")
    else:
        what = (f"above σmax ≤ {fixed[0].bound:g}·1.01 after the last projection "
                f"(up to {max(b.sigma_before for b in fixed):.4g}); re-projected")
    if not any(b.reprojections for b in fixed):  # final_reprojections 0: straight to the rescale
        return (f"final verification: {len(fixed)} of {len(convs)} convs were {what.rsplit(';', 1)[0]}; rescaled "
                f"(down to {scale})")
    return (f"final verification: {len(fixed)} of {len(convs)} convs were {what}"
            + (f", {len(rescaled)} also rescaled (down to {scale})" if rescaled else ""))


def accuracy(model: nn.Module, images, device: torch.device, batch_size: int, progress: Progress | None,
             description: str) -> float:
    """Top-1 accuracy of ``model`` on an image set."""
    from ttcompress import metrics

    logits = metrics.predict(model, images, batch_size=batch_size, device=device, progress=progress,
                             description=description)
    return metrics.accuracy(logits, images.labels)
