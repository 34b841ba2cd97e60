"""The finetune loop: cross-entropy + orthogonal loss, singular-value control, devices, AMP, DDP, resume.

    from ttcompress import load
    from ttcompress.train import FinetuneConfig, finetune

    loaded = load("r20-tt.safetensors")
    config = FinetuneConfig.from_recipe(None, data="cifar10", steps=200, clip_to=1.0)
    result = finetune(loaded, config, out_path="r20-ft.safetensors")

Files beside the output ``OUT`` (e.g. ``r20-ft.safetensors``):

* ``r20-ft.state.pt`` (OUT's suffix replaced by ``.state.pt``) — the resumable state (weights, optimizer, scheduler, AMP scaler, RNG, step,
  power-iteration vectors, timings, the configuration), written atomically every ``save_every`` steps, after the
  last step and before stopping on divergence; ``torch.load(..., weights_only=True)`` reads it.  It is **deleted**
  once the output is written (a finished run needs no state); ``resume`` without a state file starts afresh.
* ``r20-ft.log.csv`` — one row per step: ``step, epoch, loss, ce, ortho, f4, train_acc, lr, seconds`` (``loss`` is
  ``ce + orthogonal_k·ortho + f4_weight·f4``, f4 the sum of the convs' Fantastic-Four bounds); on resume, rows after
  the resumed step are dropped first.  ``r20-ft.tb/`` holds TensorBoard events with ``tensorboard`` set.

After the last step: the exact verification of every controlled layer (:meth:`Controller.enforce_bounds`:
re-projection, rescaling as the last resort), then ``bn_recalibrate`` training batches re-estimate the BatchNorm
running statistics for the final weights (the last projection changed them after the statistics were gathered;
the weights themselves are not touched), then the BatchNorm limit, the test accuracy, and the output.  With
``fastclip_to`` and ``clip_with_bn`` the convs are verified last, on the composition with the final BatchNorms.

Regulariser: ``f4_weight`` W adds ``W · Σ f4_bound`` over all convs (:func:`ttcompress.spectral.bounds.f4_penalty`,
Singla & Feizi's differentiable bound on each conv's σmax) to the loss.

Determinism: the data order and augmentation depend only on ``(seed, epoch, rank)``, the power-iteration vectors
are part of the state and the global RNG is restored, so a resumed run on the CPU ends with the same weights as an
uninterrupted one.  (Bit for bit with one thread; with two threads on a heavily loaded machine, about one run in ten
was seen to differ in the last bits from the others, the cause being in the CPU kernels rather than the state.)

Mixed precision: ``amp`` runs the forward pass under float16 autocast with a GradScaler, on CUDA only (asking for it
on the CPU is an error: CPU float16/bfloat16 autocast is rarely faster than float32).  Control always runs on the
float32 weights.

Data-parallel: under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, world size > 1) the process group is
initialised (nccl on CUDA, gloo on CPU), the model is wrapped in ``DistributedDataParallel``, every rank trains on
its own shard of each epoch and applies the same control; only rank 0 evaluates and writes files.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import csv
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ttcompress import checkpoint as ck
from ttcompress.control import BoundReport, Controller, check_control_combination, orthogonal_loss
from ttcompress.device import pick_device
from ttcompress.errors import DivergenceError, UserError
from ttcompress.progress import Progress, ensure

STATE_FORMAT = 1
OPTIMIZERS = ("sgd", "adam")
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-4}
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adam": 0.0}
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "parse_schedule", "run_paths"]


# --- configuration ----------------------------------------------------------------------------------------------------

_INT = {"epochs", "steps", "batch_size", "clip_every", "power_iters", "bn_recalibrate", "seed", "save_every",
        "fastclip_every", "fastclip_k", "fastclip_rounds"}
_FLOAT = {"lr", "momentum", "weight_decay", "schedule_epochs", "orthogonal_k", "clip_to", "divide_to", "bn_to",
          "linear_to", "f4_weight", "fastclip_to"}
_BOOL = {"nesterov", "augment", "amp", "resume", "tensorboard", "clip_with_bn"}
_STR = {"data", "data_root", "arch", "optimizer", "schedule", "device", "recipe", "description"}


@dataclass
class FinetuneConfig:
    """Every ``ttcompress finetune`` flag, with its default.  ``None`` means "not set" (or "automatic")."""

    data: str | None = None  # cifar10 | cifar100 | file.npz | image folder
    data_root: str | None = None  # where torchvision data sets live / are downloaded
    arch: str | None = None  # architecture of a foreign checkpoint (ttcompress files name their own)
    epochs: int | None = None  # run length: exactly one of epochs / steps
    steps: int | None = None
    batch_size: int = 128  # per process
    optimizer: str = "sgd"  # sgd | adam
    lr: float | None = None  # default 0.01 for sgd, 1e-4 for adam
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float | None = None  # default 1e-4 for sgd, 0 for adam
    schedule: str = "cosine"  # constant | cosine | multistep:M1,M2,...[:GAMMA] (milestones in epochs)
    schedule_epochs: float | None = None  # the epoch count multistep milestones refer to (see parse_schedule)
    orthogonal_k: float = 0.0  # weight of the orthogonal loss (paper: 1e5)
    f4_weight: float = 0.0  # weight of the Fantastic-Four bound sum Σ f4_bound over the convs (a regulariser)
    clip_to: float | None = None  # clip conv singular values at C ...
    clip_every: int = 100  # ... every N steps
    divide_to: float | None = None  # divide convs by max(1, σ̂/D) every step
    bn_to: float | None = None  # BatchNorm Lipschitz limit X
    linear_to: float | None = None  # linear layers' σmax limit Y
    power_iters: int = 1  # power iterations per step for division
    fastclip_to: float | None = None  # FastClip: the convs' σmax as they run (zero padding) to C ...
    fastclip_every: int = 100  # ... every N steps (Boroojeny et al.: 100) ...
    fastclip_k: int = 1  # ... top k singular values at a time ...
    fastclip_rounds: int = 10  # ... at most this many rounds per layer and call (and in the final verification)
    clip_with_bn: bool = False  # FastClip the composition conv → its BatchNorm (eval mode)
    bn_recalibrate: int = 20  # batches to re-estimate BatchNorm statistics after the final projection (0: off)
    augment: bool | None = None  # random crop (4 px) + flip; default: on for 32×32 images
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = False  # float16 autocast + GradScaler (CUDA only)
    seed: int = 0
    save_every: int = 500  # state file at least every N steps
    resume: bool = False  # continue from OUT.state.pt when present
    tensorboard: bool = False  # also write TensorBoard events to OUT.tb/
    recipe: str | None = None  # the recipe this configuration came from (set by from_recipe)
    description: str | None = None  # free text, for recipes

    # ---------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_recipe(cls, path: str | os.PathLike | None = None, **overrides: Any) -> FinetuneConfig:
        """Defaults from a YAML recipe (``None``: none), overridden by every keyword that is not ``None``.

        Recipe keys are field names (``clip_to`` or ``clip-to``); unknown keys are an error.  A ``steps`` override
        replaces the recipe's ``epochs`` (and vice versa); the recipe's ``epochs`` then stays the reference of its
        multistep milestones (``schedule_epochs``), so they scale with the run.
        """
        values: dict[str, Any] = {}
        recipe_path = None
        if path is not None:
            recipe_path = find_recipe(path)
            values = _read_recipe(recipe_path)
        given = {k.replace("-", "_"): v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - _field_names())
        if unknown:
            raise UserError(f"unknown finetune setting(s): {', '.join(unknown)}")
        given = {k: _coerce(k, v, "argument") for k, v in given.items()}
        if "steps" in given and "epochs" in values and "epochs" not in given:
            values.setdefault("schedule_epochs", values["epochs"])
            del values["epochs"]
        if "epochs" in given and "steps" in values and "steps" not in given:
            del values["steps"]
            values.pop("schedule_epochs", None)
        merged = {**values, **given}
        if recipe_path is not None:
            merged["recipe"] = str(recipe_path)
        config = cls(**merged)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise :class:`UserError` for anything inconsistent, with the flag to fix."""
        if not self.data:
            raise UserError("give the training data with --data (cifar10, cifar100, a .npz file or an image folder)")
        if (self.epochs is None) == (self.steps is None):
            if self.epochs is None:
                raise UserError("give the run length with --epochs E or --steps N (or a --recipe that sets one)")
            raise UserError("give either --epochs or --steps, not both")
        for name in ("epochs", "steps", "batch_size", "clip_every", "power_iters", "save_every", "fastclip_every",
                     "fastclip_k", "fastclip_rounds"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("lr", "clip_to", "divide_to", "bn_to", "linear_to", "schedule_epochs", "fastclip_to"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        if self.bn_recalibrate < 0:
            raise UserError(f"--bn-recalibrate must be a non-negative number of batches, got {self.bn_recalibrate}")
        if not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise UserError(f"--weight-decay must be non-negative, got {self.weight_decay}")
        for name in ("orthogonal_k", "f4_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"--{name.replace('_', '-')} must be a non-negative number, got {value}")
        check_control_combination(self.clip_to, self.divide_to, self.fastclip_to, self.clip_with_bn)
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise UserError("--nesterov needs --optimizer sgd with a positive --momentum")
        parse_schedule(self.schedule)
        device = self.device.lower()
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def resolved(self) -> FinetuneConfig:
        """A copy with the automatic defaults (lr, weight decay) filled in."""
        return replace(
            self,
            optimizer=self.optimizer.lower(),
            device=self.device.lower(),
            lr=DEFAULT_LR[self.optimizer.lower()] if self.lr is None else self.lr,
            weight_decay=DEFAULT_WEIGHT_DECAY[self.optimizer.lower()] if self.weight_decay is None else self.weight_decay,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _field_names() -> set[str]:
    return {f.name for f in fields(FinetuneConfig)}


def _coerce(name: str, value: Any, where: str) -> Any:
    def bad(kind: str) -> UserError:
        return UserError(f"{where}: {name} must be {kind}, got {value!r}")

    if value is None:
        return None
    if name in _BOOL:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if name in _INT:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise bad("an integer") from None
            if number.is_integer():
                return int(number)
        raise bad("an integer")
    if name in _FLOAT:
        if isinstance(value, bool):
            raise bad("a number")
        try:
            return float(value)  # YAML reads 1e5 (no dot) as a string
        except (TypeError, ValueError):
            raise bad("a number") from None
    if name in _STR:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    return value


def find_recipe(spec: str | os.PathLike) -> Path:
    """A recipe path as given, or a bare name (``wrn16-10-cifar10-clip1``) from the shipped ``recipes/``."""
    path = Path(os.path.expanduser(str(spec)))
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / path.name, RECIPES_DIR / f"{path.name}.yaml"):
        if str(spec) == path.name and candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    hint = f"; shipped recipes: {', '.join(shipped)}" if shipped else ""
    raise UserError(f"recipe {spec} not found{hint}")


def _read_recipe(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"recipe {path} is not valid YAML{where}") from None
    except OSError as exc:
        raise UserError(f"cannot read recipe {path}: {exc.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of settings (key: value), got {type(data).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(values) - (_field_names() - {"recipe"}))
    if unknown:
        known = ", ".join(sorted(_field_names() - {"recipe"}))
        raise UserError(f"recipe {path}: unknown key(s) {', '.join(unknown)}; known keys: {known}")
    return {k: _coerce(k, v, f"recipe {path}") for k, v in values.items()}


def parse_schedule(text: str) -> tuple[str, list[float], float]:
    """``constant`` | ``cosine`` (to 0 over the run) | ``multistep:M1,M2,...[:GAMMA]`` (γ default 0.1).

    Multistep milestones are epochs of a run of ``schedule_epochs`` epochs (default: the run's own length in
    epochs, so for ``--epochs`` runs they are plain epochs).  For a ``--steps`` run they fall at the same fraction
    of the run: milestone step = round(M · steps / schedule_epochs).
    """
    raw = str(text).strip().lower()
    if raw in ("constant", "cosine"):
        return raw, [], 1.0
    parts = raw.split(":")
    if parts[0] == "multistep" and len(parts) in (2, 3):
        try:
            milestones = sorted(float(m) for m in parts[1].split(",") if m.strip())
            gamma = float(parts[2]) if len(parts) == 3 else 0.1
        except ValueError:
            milestones, gamma = [], -1.0
        if milestones and all(m > 0 for m in milestones) and gamma > 0:
            return "multistep", milestones, gamma
    raise UserError(f"--schedule must be constant, cosine or multistep:M1,M2,...[:GAMMA] (milestones in epochs), "
                    f"got {text!r}")


def lr_factor(schedule: str, total_steps: int, steps_per_epoch: int,
              schedule_epochs: float | None = None) -> Callable[[int], float]:
    """The learning-rate multiplier after ``s`` optimizer steps (what the next step uses)."""
    kind, milestones, gamma = parse_schedule(schedule)
    if kind == "constant":
        return lambda s: 1.0
    if kind == "cosine":
        return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps))
    nominal = schedule_epochs or total_steps / steps_per_epoch
    marks = [round(m * total_steps / nominal) for m in milestones]
    return lambda s: gamma ** bisect.bisect_right(marks, s)


# --- result -------------------------------------------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    out_path: str
    log_path: str | None
    steps: int
    steps_per_epoch: int
    resumed_from: int
    final_loss: float | None
    train_accuracy: float | None  # mean batch accuracy over the last epoch's worth of steps (rank 0)
    test_accuracy_before: float | None
    test_accuracy: float | None
    test_images: int | None
    bounds: list[BoundReport]
    time_total: float  # this invocation, wall clock
    time_training: float  # forward/backward/optimizer, all invocations of the run
    time_control: float  # after-step control, all invocations
    control_breakdown: dict[str, float]
    time_verify: float  # final exact verification (re-projection, rescale)
    time_bn_recalibrate: float
    time_eval: float  # test accuracy before and after
    device: str
    world_size: int
    amp: bool
    config: dict
    notes: list[str] = field(default_factory=list)

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch

    @property
    def control_share(self) -> float:
        busy = self.time_training + self.time_control
        return self.time_control / busy if busy > 0 else 0.0

    @property
    def max_ratio(self) -> float | None:
        """max over controlled convs of σmax/bound after the final verification."""
        ratios = [b.sigma_after / b.bound for b in self.bounds if b.kind in ("conv", "tt")]
        return max(ratios) if ratios else None

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "bounds"}
        out["bounds"] = [b.to_json() for b in self.bounds]
        out["epochs"] = self.epochs
        out["control_share"] = self.control_share
        return out


# --- paths, logs ----------------------------------------------------------------------------------------------------------

def run_paths(out: str | os.PathLike) -> dict[str, Path]:
    """``{"state": OUT.state.pt, "log": OUT.log.csv, "tensorboard": OUT.tb}`` (OUT's suffix replaced)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix else out
    return {"state": Path(f"{stem}.state.pt"), "log": Path(f"{stem}.log.csv"), "tensorboard": Path(f"{stem}.tb")}


LOG_COLUMNS = ("step", "epoch", "loss", "ce", "ortho", "f4", "train_acc", "lr", "seconds")


class _CsvLog:
    def __init__(self, path: Path, start_step: int) -> None:
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
        self.writer.writerow(LOG_COLUMNS)
        self.writer.writerows(kept)
        self.fh.flush()

    def row(self, *values: Any) -> None:
        self.writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in values])
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


# --- distributed --------------------------------------------------------------------------------------------------------

@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def broadcast(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.broadcast(tensor, src=0)

    def all_finite(self, flag: torch.Tensor) -> bool:
        if self.active:
            import torch.distributed as dist

            flag = flag.float()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            # A gloo worker thread drops the last finished collective's tensors after the caller has moved on, and
            # that needs the GIL.  If the interpreter starts finalising first, the thread is killed inside the
            # destructor and the process aborts ("terminate called without an active exception", SIGABRT): seen
            # in 1 of 8 two-rank CPU runs, the abort in ProcessGroupGloo::runLoop per gdb.  Releasing the GIL for
            # a moment lets those threads finish.
            time.sleep(0.05)


def _setup_distributed(device_spec: str) -> tuple[_Dist, torch.device]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if dist.is_available() and dist.is_initialized():
        ctx = _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=False)
    elif world > 1 and "RANK" in os.environ:
        ctx = _Dist(int(os.environ["RANK"]), world, local_rank, owns_group=True)
    else:
        ctx = _Dist()
    device = _pick_device(device_spec, ctx)
    if ctx.owns_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return ctx, device


def _pick_device(spec: str, ctx: _Dist) -> torch.device:
    return pick_device(spec, ctx.local_rank if ctx.world_size > 1 else None)


# --- evaluation ---------------------------------------------------------------------------------------------------------------

def _accuracy(model: nn.Module, images, device: torch.device, batch_size: int, progress: Progress | None,
              description: str) -> float:
    try:
        from ttcompress import metrics
    except ImportError:  # pragma: no cover - metrics is part of the package; a plain loop as a fallback
        metrics = None
    if metrics is not None:
        logits = metrics.predict(model, images, batch_size=batch_size, device=device, progress=progress,
                                 description=description)
        return metrics.accuracy(logits, images.labels)
    correct = 0
    was = model.training
    model.eval()
    with torch.inference_mode():
        for x, y in images.batches(batch_size, device):
            correct += int((model(x).argmax(1) == y).sum())
    model.train(was)
    return correct / len(images)


def _test_split(spec: str, data_root: str | None, train):
    """The test split, or None when the source has none (an x/y npz or a folder without split folders)."""
    from ttcompress.data import load_split
    from ttcompress.errors import DataError

    try:
        test = load_split(spec, "test", data_root)
    except DataError:
        return None
    if test.source == train.source:
        return None
    return test


# --- the loop -------------------------------------------------------------------------------------------------------------------

def _make_optimizer(params, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _config_differences(old: dict, new: dict) -> list[str]:
    ignore = {"resume", "save_every", "device", "tensorboard", "recipe", "description"}
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in ignore and old.get(k) != new.get(k)]


def finetune(
    loaded: ck.LoadedModel,
    config: FinetuneConfig,
    *,
    out_path: str | os.PathLike,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Train ``loaded`` (in place) with the configured loss and control, verify the bounds, write ``out_path``.

    Returns a :class:`FinetuneResult`.  Raises :class:`~ttcompress.errors.DivergenceError` when the loss stops
    being finite (the last good state stays in the state file) and :class:`UserError` for bad settings or data.
    """
    started = time.perf_counter()
    cfg = config.resolved()
    cfg.validate()
    out = ck.check_output_path(out_path, loaded.source)
    ctx, device = _setup_distributed(cfg.device)
    try:
        return _finetune(loaded, cfg, out, progress if ctx.is_main else None, ctx, device, started)
    finally:
        ctx.close()


def _finetune(loaded: ck.LoadedModel, cfg: FinetuneConfig, out: Path, progress: Progress | None, ctx: _Dist,
              device: torch.device, started: float) -> FinetuneResult:
    from ttcompress.data import check_compatible, load_split, train_loader
    from ttcompress.fastclip import following_batchnorms
    from ttcompress.spectral.bounds import f4_penalty
    from ttcompress.spectral.network import layer_input_sizes

    paths = run_paths(out)
    notes: list[str] = []
    if cfg.amp and device.type != "cuda":
        raise UserError("--amp needs a CUDA device (float16 mixed precision); drop --amp to train on the CPU")
    torch.manual_seed(cfg.seed)

    train_set = load_split(cfg.data, "train", cfg.data_root)  # type: ignore[arg-type]
    test_set = _test_split(cfg.data, cfg.data_root, train_set)  # type: ignore[arg-type]
    if test_set is None:
        notes.append(f"{cfg.data} has no separate test split: no test accuracy")
    model, net = loaded.model.to(device), loaded.net
    check_compatible(train_set, model, device)
    image_shape = train_set.image_shape
    if list(image_shape) != list(loaded.meta.input_size):
        notes.append(f"input size set to the data's {image_shape} (was {tuple(loaded.meta.input_size)})")
        loaded.meta.input_size = list(image_shape)
    sizes = layer_input_sizes(model, image_shape, net)
    augment = cfg.augment if cfg.augment is not None else image_shape[1:] == (32, 32)

    loader = train_loader(train_set, cfg.batch_size, augment=augment, seed=cfg.seed, rank=ctx.rank,
                          world_size=ctx.world_size, device=device)
    per_epoch = len(loader)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch  # type: ignore[operator]

    eval_batch = max(256, cfg.batch_size)
    t_eval = 0.0
    acc_before = None
    if ctx.is_main and test_set is not None:
        t0 = time.perf_counter()
        acc_before = _accuracy(model, test_set, device, eval_batch, progress, "evaluate (before)")
        t_eval += time.perf_counter() - t0

    optimizer = _make_optimizer(net.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(cfg.schedule, total, per_epoch, cfg.schedule_epochs))
    scaler = torch.amp.GradScaler("cuda") if cfg.amp else None
    batchnorms = following_batchnorms(model, image_shape, net) if cfg.clip_with_bn else None
    controller = Controller.from_config(cfg, net, sizes, sync=ctx.broadcast if ctx.active else None,
                                        batchnorms=batchnorms)
    if cfg.orthogonal_k > 0 and not _has_frames(net):
        notes.append("--orthogonal-k has no effect: the network has no TT layers")
    if cfg.clip_with_bn:
        alone = [c.name for c in controller.convs if c.bn is None]
        if alone:
            notes.append(f"--clip-with-bn: {len(alone)} of {len(controller.convs)} convs feed no BatchNorm directly "
                         f"and are clipped alone ({', '.join(alone[:4])}{', …' if len(alone) > 4 else ''})")

    # --- resume ---------------------------------------------------------------------------------------------------------
    step, t_train, resumed_from = 0, 0.0, 0
    if cfg.resume and paths["state"].exists():
        try:
            state = torch.load(paths["state"], map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which and how to recover
            raise UserError(f"cannot read the state file {paths['state']} ({type(exc).__name__}); delete it to "
                            "start over") from None
        if state.get("format") != STATE_FORMAT or state.get("total_steps") is None:
            raise UserError(f"{paths['state']} is not a ttcompress finetune state file")
        diffs = _config_differences(state.get("config", {}), cfg.to_dict())
        if diffs:
            notes.append("resumed with changed settings: " + "; ".join(diffs))
        ck.load_state_into(net, state["model"], loaded.meta.arch)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        controller.load_state_dict(state["controller"])
        _set_rng_state(state["rng"], device)
        step = resumed_from = int(state["step"])
        t_train = float(state.get("timings", {}).get("training", 0.0))
        if step > total:
            raise UserError(f"{paths['state']} is at step {step}, past this run's {total} steps")
    elif cfg.resume:
        notes.append(f"--resume: no state file {paths['state']}; started from the beginning")

    train_model: nn.Module = model
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    log = _CsvLog(paths["log"], step) if ctx.is_main else None
    writer = _tensorboard(paths["tensorboard"], step) if (ctx.is_main and cfg.tensorboard) else None
    last_saved = step if resumed_from else -1

    def save_state(at: int) -> None:
        nonlocal last_saved
        if not ctx.is_main or at == last_saved:
            return
        if not _finite_state(net):  # never replace a good state by a broken one
            _diverged(at, at // per_epoch, None, net, save_state, last_saved, paths["state"])
        state = {
            "format": STATE_FORMAT,
            "step": at,
            "total_steps": total,
            "steps_per_epoch": per_epoch,
            "model": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "rng": _rng_state(device),
            "controller": controller.state_dict(),
            "config": cfg.to_dict(),
            "timings": {"training": t_train},
            "source": str(loaded.source) if loaded.source else None,
        }
        ck.atomic_write(paths["state"], lambda tmp: torch.save(state, tmp))
        last_saved = at

    k, f4_weight = cfg.orthogonal_k, cfg.f4_weight

    def autocast():
        if scaler is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.float16)

    recent_acc: collections.deque[float] = collections.deque(maxlen=per_epoch)
    loss_value = None
    epoch = step // per_epoch
    skip = step % per_epoch
    try:
        with ensure(progress).task("finetune", total=total) as advance:
            if step:
                advance(step)
            while step < total:
                loader.set_epoch(epoch)
                for i, (x, y) in enumerate(loader):
                    if i < skip:
                        continue  # resuming mid-epoch: replay the epoch's data order and augmentation draws
                    t0 = time.perf_counter()
                    train_model.train()
                    with autocast():
                        logits = train_model(x)
                        ce = F.cross_entropy(logits.float(), y)
                    ortho = orthogonal_loss(net) if k > 0 else ce.new_zeros(())
                    f4 = f4_penalty(net) if f4_weight > 0 else ce.new_zeros(())
                    loss = ce
                    if k > 0:
                        loss = loss + k * ortho
                    if f4_weight > 0:
                        loss = loss + f4_weight * f4
                    if not ctx.all_finite(torch.isfinite(loss.detach())):
                        _diverged(step, epoch, float(loss.detach()), net, save_state, last_saved, paths["state"])
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
                    step += 1
                    loss_value = float(loss.detach())
                    acc = float((logits.detach().argmax(1) == y).float().mean())
                    t_train += time.perf_counter() - t0
                    controller.after_step(step)
                    recent_acc.append(acc)
                    seconds = t_train + sum(controller.timings.values())
                    if log is not None:
                        log.row(step, step / per_epoch, loss_value, float(ce.detach()), float(ortho.detach()),
                                float(f4.detach()), acc, lr, seconds)
                    if writer is not None:
                        for tag, value in (("loss", loss_value), ("ce", float(ce)), ("ortho", float(ortho)),
                                           ("f4", float(f4)), ("train_acc", acc), ("lr", lr)):
                            writer.add_scalar(tag, value, step)
                    advance(1, epoch=f"{step / per_epoch:.2f}", loss=loss_value,
                            acc=sum(recent_acc) / len(recent_acc), lr=lr)
                    if step % cfg.save_every == 0:
                        save_state(step)
                    if step >= total:
                        break
                skip = 0
                epoch += 1
        save_state(step)  # a crash during verification or evaluation resumes here
    finally:
        if log is not None:
            log.close()
        if writer is not None:
            writer.close()

    # --- verification, evaluation, output (rank 0) ---------------------------------------------------------------------
    t0 = time.perf_counter()
    t_recal = 0.0
    bounds: list[BoundReport] = []
    if controller.active and ctx.is_main:
        recalibrate = None
        if controller.convs and cfg.bn_recalibrate > 0:
            def recalibrate() -> None:
                nonlocal t_recal
                start = time.perf_counter()
                loader.set_epoch(epoch + 1)
                recalibrate_bn(model, loader, cfg.bn_recalibrate)
                t_recal = time.perf_counter() - start
        bounds = controller.enforce_bounds(recalibrate=recalibrate)
    t_verify = time.perf_counter() - t0 - t_recal
    convs = [b for b in bounds if b.kind in ("conv", "tt")]
    fixed = [b for b in convs if b.reprojections or b.rescale is not None]
    if fixed:
        rescaled = [b for b in fixed if b.rescale is not None]
        if cfg.fastclip_to is not None:
            what = (f"above σmax ≤ {fixed[0].bound:g}·1.001 as they run{' with their BatchNorm' if cfg.clip_with_bn else ''}"
                    f" (up to {max(b.sigma_before for b in fixed):.4g}); FastClip rounds")
        else:
            what = (f"above σmax ≤ {fixed[0].bound:g}·1.01 after the last projection "
                    f"(up to {max(b.sigma_before for b in fixed):.4g}); re-projected")
        notes.append(f"final verification: {len(fixed)} of {len(convs)} convs were {what}"
                     + (f", {len(rescaled)} also rescaled (down to ×{min(b.rescale for b in rescaled):.3g})"
                        if rescaled else ""))
    acc_after = None
    if ctx.is_main:
        if test_set is not None:
            t0 = time.perf_counter()
            acc_after = _accuracy(model, test_set, device, eval_batch, progress, "evaluate")
            t_eval += time.perf_counter() - t0
        model.eval()
        entry = ck.history_entry("finetune", checkpoint=str(loaded.source) if loaded.source else None,
                                 **cfg.to_dict())
        ck.save(loaded, out, entry)
        paths["state"].unlink(missing_ok=True)
    ctx.barrier()
    model.to("cpu").eval()
    return FinetuneResult(
        out_path=str(out),
        log_path=str(paths["log"]) if ctx.is_main else None,
        steps=total,
        steps_per_epoch=per_epoch,
        resumed_from=resumed_from,
        final_loss=loss_value,
        train_accuracy=sum(recent_acc) / len(recent_acc) if recent_acc else None,
        test_accuracy_before=acc_before,
        test_accuracy=acc_after,
        test_images=len(test_set) if test_set is not None else None,
        bounds=bounds,
        time_total=time.perf_counter() - started,
        time_training=t_train,
        time_control=sum(controller.timings.values()),
        control_breakdown=dict(controller.timings),
        time_verify=t_verify,
        time_bn_recalibrate=t_recal,
        time_eval=t_eval,
        device=str(device),
        world_size=ctx.world_size,
        amp=cfg.amp,
        config=cfg.to_dict(),
        notes=notes,
    )


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


def _has_frames(net: nn.Module) -> bool:
    from ttcompress.tt import TTConv2d

    return any(isinstance(m, TTConv2d) or callable(getattr(m, "orthogonal_terms", None)) for m in net.modules())


def _tensorboard(path: Path, step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(path), purge_step=step + 1 if step else None)


def _finite_state(net: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in net.state_dict().values() if t.is_floating_point())


def _diverged(step: int, epoch: int, value: float | None, net: nn.Module, save_state, last_saved: int,
              state_path: Path):
    """Keep the last good state and stop with a message that says what to do (``value``: the bad loss, or None
    when the weights themselves stopped being finite)."""
    if _finite_state(net):
        save_state(step)
        kept = f"the state after step {step} (the last good one) is in {state_path}"
    elif last_saved >= 0:
        kept = f"the last good state (step {last_saved}) is in {state_path}"
    else:
        kept = "no good state was saved"
    what = f"the loss became {value} at step {step + 1}" if value is not None else \
        f"the weights stopped being finite after step {step}"
    raise DivergenceError(
        f"training diverged: {what} (epoch {epoch + 1}); stopped, nothing "
        f"written to the output. {kept[0].upper() + kept[1:]}. Lower --lr (or --orthogonal-k) and re-run with "
        "--resume, or start over without it"
    )
