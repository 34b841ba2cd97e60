"""What happens around each training step, as hooks the loop (:mod:`ttcompress.train.loop`) calls at named points:

* ``open(run, stack)`` — once, when the loop starts (open files and progress tasks on ``stack``, which closes
  them however the loop ends);
* ``before_update(run, loss)`` — the batch's loss is computed, nothing has changed yet;
* ``after_step(run, info)`` — after optimizer step ``run.step`` (:class:`StepInfo`: the step's metrics).

The built-in hooks, in the order the finetune run uses them: :class:`DivergenceGuard`, :class:`ControlHook`,
:class:`CsvHook`, :class:`TensorBoardHook`, :class:`ProgressHook`, :class:`SaveHook`; ``finetune(hooks=...)``
appends more.  **Add a logged metric**: put it in ``StepInfo.metrics`` (from
:func:`ttcompress.train.loop.train_step` or an earlier hook); TensorBoard writes every metric, the CSV log the
columns it was opened with (a loss term of :mod:`ttcompress.train.loss` becomes one by itself; name others to
:class:`CsvHook`).
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field

import torch

from ttcompress.progress import Progress, ensure
from ttcompress.train.distributed import Dist
from ttcompress.train.state import LOG_COLUMNS, RunState

__all__ = ["ControlHook", "CsvHook", "DivergenceGuard", "Hook", "ProgressHook", "SaveHook", "StepInfo",
           "TensorBoardHook"]


@dataclass
class StepInfo:
    """One optimizer step: ``loss`` and the metrics logged with it (``ce``, ``ortho``, ``f4``, …, ``train_acc``,
    ``lr``: the rate the step used)."""

    step: int
    epoch: float  # fractional epochs done
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


class Hook:
    """A hook does nothing at any point unless it says otherwise."""

    def open(self, run: RunState, stack: contextlib.ExitStack) -> None:
        pass

    def before_update(self, run: RunState, loss: torch.Tensor) -> None:
        pass

    def after_step(self, run: RunState, info: StepInfo) -> None:
        pass


class DivergenceGuard(Hook):
    """Stops the run when the loss stops being finite on any rank, keeping the last good state
    (:meth:`RunState.diverged`)."""

    def __init__(self, dist: Dist) -> None:
        self.dist = dist

    def before_update(self, run: RunState, loss: torch.Tensor) -> None:
        if not self.dist.all_finite(torch.isfinite(loss.detach())):
            run.diverged(float(loss.detach()))


class ControlHook(Hook):
    """Singular-value control after every step (:meth:`ttcompress.control.Controller.after_step`).

    ``reset_momentum``: a layer the control rewrote holds other weights than the optimizer state was accumulated
    for — a TT layer even other factors (orthonormal frames from a QR, the triangular parts folded into the core) —
    so that state (SGD momentum, Adam moments) would push them the wrong way; it is dropped and starts again from
    the next gradient."""

    def __init__(self, reset_momentum: bool = True) -> None:
        self.reset_momentum = reset_momentum

    def after_step(self, run: RunState, info: StepInfo) -> None:
        rewritten = run.controller.after_step(info.step)
        if self.reset_momentum:
            for layer in rewritten:
                for p in layer.parameters():
                    run.optimizer.state.pop(p, None)


def _seconds(run: RunState) -> float:
    return run.training_time + sum(run.controller.timings.values())


class CsvHook(Hook):
    """One row per step: ``step, epoch, loss, <terms>, train_acc, lr, seconds`` (training plus control time)."""

    def __init__(self, terms: tuple[str, ...] = ("ce", "ortho", "f4")) -> None:
        self.columns = LOG_COLUMNS[:3] + tuple(terms) + LOG_COLUMNS[-3:]
        self.log = None

    def open(self, run: RunState, stack: contextlib.ExitStack) -> None:
        self.log = run.files.open_log(run.step, self.columns)
        if self.log is not None:
            stack.callback(self.log.close)

    def after_step(self, run: RunState, info: StepInfo) -> None:
        if self.log is not None:
            values = {"step": info.step, "epoch": info.epoch, "loss": info.loss, "seconds": _seconds(run),
                      **info.metrics}
            self.log.row(*(values[c] for c in self.columns))


class TensorBoardHook(Hook):
    """Every metric as a TensorBoard scalar."""

    def __init__(self) -> None:
        self.writer = None

    def open(self, run: RunState, stack: contextlib.ExitStack) -> None:
        self.writer = run.files.open_tensorboard(run.step)
        if self.writer is not None:
            stack.callback(self.writer.close)

    def after_step(self, run: RunState, info: StepInfo) -> None:
        if self.writer is not None:
            for tag, value in (("loss", info.loss), *info.metrics.items()):
                self.writer.add_scalar(tag, value, info.step)


class ProgressHook(Hook):
    """The ``finetune`` progress task: epoch, loss, the mean training accuracy over the last epoch's worth of
    steps (also the run's reported training accuracy) and the learning rate."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = ensure(progress)
        self.recent: collections.deque[float] = collections.deque()
        self.advance = None

    @property
    def accuracy(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None

    def open(self, run: RunState, stack: contextlib.ExitStack) -> None:
        self.recent = collections.deque(maxlen=run.per_epoch)
        self.advance = stack.enter_context(self.progress.task("finetune", total=run.total))
        if run.step:
            self.advance(run.step)

    def after_step(self, run: RunState, info: StepInfo) -> None:
        self.recent.append(info.metrics["train_acc"])
        assert self.advance is not None
        self.advance(1, epoch=f"{info.epoch:.2f}", loss=info.loss, acc=self.accuracy, lr=info.metrics["lr"])


class SaveHook(Hook):
    """The resumable state every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every = int(every)

    def after_step(self, run: RunState, info: StepInfo) -> None:
        if info.step % self.every == 0:
            run.save()
