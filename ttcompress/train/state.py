"""The run state: what a run must keep to resume bit for bit, its file format, and every file the run writes.

Files beside the output ``OUT`` (e.g. ``r20-ft.safetensors``), all written from here (:class:`RunFiles`):

* ``r20-ft.state.pt`` (OUT's suffix replaced by ``.state.pt``) — the resumable state (weights, optimizer,
  scheduler, AMP scaler, RNG, step, control state, timings, the configuration), written atomically every
  ``save_every`` steps, after the last step and before stopping on divergence; read with
  ``torch.load(..., weights_only=True)`` and checked (:func:`check_state`) before anything is restored.  It is
  **deleted** once the output is written.
* ``r20-ft.log.csv`` — one row per step (opened only when the loop starts, so a run that fails before leaves the
  previous log as it was); on resume, rows after the resumed step are dropped first.
* ``r20-ft.tb/`` — TensorBoard events (with ``tensorboard``).
* ``OUT`` itself, once the run is done.

Determinism: the data order and augmentation depend only on ``(seed, epoch, rank)``, the control state (power
iteration and FastClip vectors) is part of the state and the global RNG is restored, so a resumed run on the CPU
ends with the same weights as an uninterrupted one (bit for bit with one thread).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from ttcompress import checkpoint as ck
from ttcompress.control import Controller
from ttcompress.errors import DivergenceError, UserError
from ttcompress.outputs import atomic_write

__all__ = ["LOG_COLUMNS", "STATE_FORMAT", "CsvLog", "RunFiles", "RunState", "check_state", "run_paths"]

STATE_FORMAT = 2  # 2: the control state per method (controller.methods.NAME)
LOG_COLUMNS = ("step", "epoch", "loss", "ce", "ortho", "f4", "train_acc", "lr", "seconds")
# settings a resumed run may change without a note
_FREE_TO_CHANGE = {"resume", "save_every", "device", "tensorboard", "recipe", "description"}


def run_paths(out: str | os.PathLike) -> dict[str, Path]:
    """``{"state": OUT.state.pt, "log": OUT.log.csv, "tensorboard": OUT.tb}`` (OUT's suffix replaced)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix else out
    return {"state": Path(f"{stem}.state.pt"), "log": Path(f"{stem}.log.csv"), "tensorboard": Path(f"{stem}.tb")}


class CsvLog:
    """The per-step CSV log; rows after ``start_step`` of an earlier log are dropped (a resumed run)."""

    def __init__(self, path: Path, start_step: int, columns: tuple[str, ...] = LOG_COLUMNS) -> None:
        self.path = path
        kept: list[list[str]] = []
        if start_step > 0 and path.exists():
            with open(path, newline="") as fh:
                rows = list(csv.reader(fh))
            for row in rows[1:]:
                try:
                    if int(row[0]) <= start_step:
                        kept.append(row)
                except (ValueError, IndexError):
                    continue
        self.fh = open(path, "w", newline="")
        self.writer = csv.writer(self.fh)
        self.writer.writerow(columns)
        self.writer.writerows(kept)
        self.fh.flush()

    def row(self, *values: Any) -> None:
        self.writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in values])
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


class RunFiles:
    """Every file a run reads back or writes: the state file, the log, TensorBoard events and the output.

    ``out`` None: a run that writes nothing (the state stays in memory).  ``writes`` False: a rank other than 0.
    """

    def __init__(self, out: Path | None, writes: bool = True) -> None:
        self.out = out
        self.writes = writes and out is not None
        self.paths = run_paths(out) if out is not None else {}

    @property
    def state_path(self) -> Path | None:
        return self.paths.get("state")

    def has_state(self) -> bool:
        return self.state_path is not None and self.state_path.exists()

    def read_state(self) -> dict:
        path = self.state_path
        assert path is not None
        try:
            with warnings.catch_warnings():  # torch's own pickle-protocol notes: the one line below says enough
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which and how to recover
            raise UserError(f"cannot read the state file {path} ({type(exc).__name__}); delete it to start over") \
                from None
        return state

    def write_state(self, state: dict) -> None:
        if self.writes:
            atomic_write(self.paths["state"], lambda tmp: torch.save(state, tmp))

    def open_log(self, start_step: int, columns: tuple[str, ...]) -> CsvLog | None:
        return CsvLog(self.paths["log"], start_step, columns) if self.writes else None

    def open_tensorboard(self, step: int):
        if not self.writes:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("tensorboard needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(str(self.paths["tensorboard"]), purge_step=step + 1 if step else None)

    def write_output(self, loaded: ck.LoadedModel, entry: dict) -> None:
        """The trained model to ``out``; the state file is then deleted (a finished run needs no state)."""
        if self.writes:
            assert self.out is not None
            ck.save(loaded, self.out, entry)
            self.paths["state"].unlink(missing_ok=True)


def _kind(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def check_state(state: Any, path: Path, total: int) -> None:
    """Refuse a state file that is not a finetune state of this format, or whose step is outside ``0..total``, with
    one line (:class:`UserError`).  Whether its contents fit the model is checked when they are restored."""
    def bad(what: str) -> UserError:
        return UserError(f"{path} is not a usable ttcompress finetune state file ({what}); delete it to start over")

    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise bad("wrong format")
    for key, kind in (("step", int), ("total_steps", int), ("model", dict), ("optimizer", dict),
                      ("scheduler", dict), ("rng", dict), ("controller", dict)):
        if not _kind(state.get(key), kind):
            raise bad(f"{key} missing or of the wrong type")
    for key, kind in (("scaler", dict), ("config", dict), ("timings", dict)):
        if key in state and not _kind(state[key], kind):
            raise bad(f"{key} of the wrong type")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        raise bad("model is not a mapping of names to tensors")
    if not isinstance(state["rng"].get("torch"), torch.Tensor) or state["rng"]["torch"].dtype != torch.uint8:
        raise bad("rng state missing or of the wrong type")
    training = state.get("timings", {}).get("training", 0.0)
    if not _kind(training, (int, float)) or not math.isfinite(training) or training < 0:
        raise bad("timings of the wrong type")
    step = state["step"]
    if not 0 <= step <= total:
        raise UserError(f"{path} is at step {step}, outside this run's 0..{total} steps; delete it to start over")


@dataclass
class RunState:
    """What a run must keep to resume bit for bit, and where it is saved (``files``).

    ``step`` counts the optimizer steps done; ``training_time`` the seconds of forward/backward/optimizer over
    every invocation of the run.
    """

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    controller: Controller
    device: torch.device
    total: int
    per_epoch: int
    config: dict
    files: RunFiles
    source: str | None = None
    arch: str | None = None
    step: int = 0
    resumed_from: int = 0
    training_time: float = 0.0
    last_saved: int = -1
    notes: list[str] = field(default_factory=list)

    # --- format -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "total_steps": self.total,
            "steps_per_epoch": self.per_epoch,
            "model": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "rng": self.rng_state(),
            "controller": self.controller.state_dict(),
            "config": dict(self.config),
            "timings": {"training": self.training_time},
            "source": self.source,
        }

    def load_state_dict(self, state: dict, path: Path) -> None:
        """Restore everything from a checked state (:func:`check_state`); one line when it does not fit."""
        try:
            ck.load_state_into(self.net, state["model"], self.arch or "this model")
        except UserError as exc:
            raise UserError(f"{path} holds the weights of another model ({exc}); delete it to start over") from None
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.controller.load_state_dict(state["controller"])
            self.set_rng_state(state["rng"])
        except Exception as exc:  # anything malformed inside the containers torch or the controller reads
            raise UserError(f"{path} does not fit this run ({type(exc).__name__} while restoring it); delete it to "
                            "start over") from None
        self.step = self.resumed_from = int(state["step"])
        self.training_time = float(state.get("timings", {}).get("training", 0.0))
        self.last_saved = self.step
        diffs = [f"{k}: {state.get('config', {}).get(k)!r} → {self.config.get(k)!r}"
                 for k in sorted(set(state.get("config", {})) | set(self.config))
                 if k not in _FREE_TO_CHANGE and state.get("config", {}).get(k) != self.config.get(k)]
        if diffs:
            self.notes.append("resumed with changed settings: " + "; ".join(diffs))

    # --- RNG --------------------------------------------------------------------------------------------------------

    def rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    # --- saving and loading -------------------------------------------------------------------------------------

    def resume(self) -> bool:
        """Continue from the state file when there is one; False when there is none."""
        if not self.files.has_state():
            return False
        path = self.files.state_path
        assert path is not None
        state = self.files.read_state()
        check_state(state, path, self.total)
        self.load_state_dict(state, path)
        return True

    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.net.state_dict().values() if t.is_floating_point())

    def save(self) -> None:
        """Write the state of the current step, unless already written; weights that stopped being finite end the
        run instead (:meth:`diverged`: a good state is never replaced by a broken one)."""
        if not self.files.writes or self.step == self.last_saved:
            return
        if not self.finite():
            self.diverged(None)
        self.files.write_state(self.state_dict())
        self.last_saved = self.step

    def diverged(self, loss: float | None) -> NoReturn:
        """Keep the last good state and stop with a message that says what to do (``loss``: the bad loss of the
        step about to be taken, or None when the weights themselves stopped being finite)."""
        path = self.files.state_path
        if not self.files.writes:
            kept = "no state file is kept (this run writes no files)"
        elif self.finite():
            self.save()
            kept = f"the state after step {self.step} (the last good one) is in {path}"
        elif self.last_saved >= 0:
            kept = f"the last good state (step {self.last_saved}) is in {path}"
        else:
            kept = "no good state was saved"
        what = f"the loss became {loss} at step {self.step + 1}" if loss is not None else \
            f"the weights stopped being finite after step {self.step}"
        raise DivergenceError(
            f"training diverged: {what} (epoch {self.step // self.per_epoch + 1}); stopped, nothing "
            f"written to the output. {kept[0].upper() + kept[1:]}. Lower lr (or orthogonal_k) and re-run with "
            "resume, or start over without it", "lr", "orthogonal_k", "resume"
        )
