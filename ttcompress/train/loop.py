"""The training loop: :func:`train_step` (one batch: forward, loss, backward, optimizer and scheduler step) and
:func:`train_loop` (the epochs, resuming mid-epoch, the hooks of :mod:`ttcompress.train.hooks`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import torch
from torch import nn

from ttcompress.errors import UserError
from ttcompress.train.hooks import Hook, StepInfo
from ttcompress.train.loss import Objective
from ttcompress.train.state import RunState

__all__ = ["train_loop", "train_step"]


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, objective: Objective,
               optimizer: torch.optim.Optimizer, scheduler, scaler, hooks: Sequence[Hook], run: RunState
               ) -> tuple[float, dict[str, float]]:
    """One optimizer step on one batch; returns ``(loss, metrics)``.  With ``scaler`` (a GradScaler) the forward
    pass runs under float16 autocast.  The hooks' ``before_update`` see the loss before anything changes."""
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.float16) if scaler is not None else contextlib.nullcontext()
    with autocast:
        logits = model(images)
        ce = objective.ce(logits, labels)
    loss, terms = objective.terms(model, images, labels, logits, ce)
    for hook in hooks:
        hook.before_update(run, loss)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    scheduler.step()
    metrics = {name: float(value.detach()) for name, value in terms.items()}
    metrics["train_acc"] = float((logits.detach().argmax(1) == labels).float().mean())
    metrics["lr"] = lr
    return float(loss.detach()), metrics


def train_loop(run: RunState, model: nn.Module, batches, objective: Objective, hooks: Sequence[Hook]) -> float | None:
    """Train from ``run.step`` to ``run.total``; returns the last step's loss (None when no step was left).

    ``batches`` yields ``(images, labels)`` on the training device, one epoch per iteration, and has
    ``set_epoch(epoch)`` (a resumed run replays the epoch's data order and augmentation draws up to its step).
    """
    loss = None
    epoch, skip = divmod(run.step, run.per_epoch)
    with contextlib.ExitStack() as stack:
        for hook in hooks:
            hook.open(run, stack)
        while run.step < run.total:
            batches.set_epoch(epoch)
            seen = 0
            for i, (x, y) in enumerate(batches):
                seen += 1
                if i < skip:
                    continue  # resuming mid-epoch: replay the epoch's data order and augmentation draws
                t0 = time.perf_counter()
                loss, metrics = train_step(model, x, y, objective, run.optimizer, run.scheduler, run.scaler, hooks,
                                           run)
                run.step += 1
                run.training_time += time.perf_counter() - t0
                info = StepInfo(run.step, run.step / run.per_epoch, loss, metrics)
                for hook in hooks:
                    hook.after_step(run, info)
                if run.step >= run.total:
                    break
            if not seen:
                raise UserError(f"the training data ran out after {run.step} of {run.total} steps")
            skip = 0
            epoch += 1
    return loss
