"""``finetune``: set a run up (data, model, optimizer, control, run state), run the loop, finalize.

    from ttcompress import load
    from ttcompress.train import FinetuneConfig, finetune

    loaded = load("r20-tt.safetensors")
    config = FinetuneConfig.from_recipe(None, data="cifar10", steps=200, clip_to=1.0)
    result = finetune(loaded, config, out_path="r20-ft.safetensors")

The model may also be a plain ``nn.Module`` and the data any iterable of ``(images, labels)`` batches; without
``out_path`` nothing is written and the trained model comes back in the result.

Mixed precision: ``amp`` runs the forward pass under float16 autocast with a GradScaler, on CUDA only (asking for
it on the CPU is an error).  Control always runs on the float32 weights.

Data-parallel: under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, world size > 1) the model is
wrapped in ``DistributedDataParallel``, every rank trains on its own shard of each epoch and applies the same
control; only rank 0 evaluates and writes files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttcompress import checkpoint as ck
from ttcompress.control import BoundReport, Controller, has_frames
from ttcompress.errors import SettingError, UserError
from ttcompress.progress import Progress
from ttcompress.train.config import FinetuneConfig
from ttcompress.train.distributed import Dist, setup_distributed
from ttcompress.train.finalize import Verification, accuracy, verification_note, verify
from ttcompress.train.hooks import (ControlHook, CsvHook, DivergenceGuard, Hook, ProgressHook, SaveHook,
                                   TensorBoardHook)
from ttcompress.train.loop import train_loop
from ttcompress.train.loss import ExtraLoss, Objective
from ttcompress.train.schedule import lr_factor
from ttcompress.train.state import RunFiles, RunState, run_paths
from ttcompress.distill import AUTO, Distillation, load_teacher
from ttcompress.outputs import guard

__all__ = ["FinetuneResult", "finetune"]


@dataclass
class FinetuneResult:
    out_path: str | None
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
    time_teacher: float  # of that, the teacher's forward passes (distillation), this invocation
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
    model: nn.Module | None = field(default=None, repr=False)  # the trained model (on the CPU, eval mode)

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
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("bounds", "model")}
        out["bounds"] = [b.to_json() for b in self.bounds]
        out["epochs"] = self.epochs
        out["control_share"] = self.control_share
        return out


def finetune(
    model: ck.LoadedModel | nn.Module,
    config: FinetuneConfig,
    *,
    out_path: str | os.PathLike | None = None,
    data: Iterable | None = None,
    extra_loss: ExtraLoss | None = None,
    hooks: Sequence[Hook] = (),
    progress: Progress | None = None,
) -> FinetuneResult:
    """Train ``model`` (in place) with the configured loss and control, verify the bounds, write ``out_path``.

    ``model``: a loaded model (:func:`ttcompress.load`) or any ``nn.Module`` (then ``out_path`` must be None).
    ``data``: an iterable of ``(images, labels)`` batches instead of ``config.data`` (no test accuracy then).
    ``extra_loss(model, images, labels, logits)``: a scalar added to the loss (logged as ``extra``).
    ``out_path`` None: no file is written (no state file either) and the result's ``model`` is the trained one.
    ``hooks``: more :class:`~ttcompress.train.hooks.Hook` s, called after the built-in ones.

    Raises :class:`~ttcompress.errors.DivergenceError` when the loss stops being finite (the last good state stays
    in the state file) and :class:`~ttcompress.errors.UserError` for bad settings, data or state files.
    """
    started = time.perf_counter()
    cfg = config.resolved()
    cfg.validate(data_given=data is not None)
    loaded = model if isinstance(model, ck.LoadedModel) else None
    if loaded is None and not isinstance(model, nn.Module):
        raise UserError(f"finetune takes a loaded model or an nn.Module, got {type(model).__name__}")
    if loaded is None and out_path is not None:
        raise UserError("writing the output needs the model's metadata: pass a loaded model (ttcompress.load), or "
                        "out_path=None to get the trained model back")
    ck.check_finite((loaded.net if loaded is not None else model).state_dict())
    out = Path(out_path) if out_path is not None else None
    dist, device = setup_distributed(cfg.device)
    try:
        # every file the run writes, checked against every file it reads before any work; rank 0 holds the locks
        with guard(_outputs(out, cfg), inputs=_inputs(loaded, cfg), folders=_output_folders(out, cfg),
                   lock=dist.is_main):
            return _finetune(model, loaded, cfg, out, data, extra_loss, list(hooks),
                             progress if dist.is_main else None, dist, device, started)
    finally:
        dist.close()


def _outputs(out: Path | None, cfg: FinetuneConfig) -> list[tuple[str, Path]]:
    if out is None:
        return []
    paths = run_paths(out)
    return [("out", out), ("out (its state file)", paths["state"]), ("out (its log)", paths["log"])]


def _output_folders(out: Path | None, cfg: FinetuneConfig) -> list[tuple[str, Path, tuple[str, ...]]]:
    if out is None or not cfg.tensorboard:
        return []
    return [("out (its TensorBoard folder)", run_paths(out)["tensorboard"], ())]


def _inputs(loaded: ck.LoadedModel | None, cfg: FinetuneConfig) -> list[Path | None]:
    from ttcompress.archs import source_file

    arch = cfg.arch or (loaded.meta.arch if loaded is not None else None)
    teacher = None if cfg.teacher in (None, AUTO) else Path(cfg.teacher)
    data = Path(cfg.data) if cfg.data and Path(cfg.data).exists() else None
    return [loaded.source if loaded is not None else None, data, source_file(arch) if arch else None,
            Path(cfg.recipe) if cfg.recipe else None, teacher,
            source_file(cfg.teacher_arch) if cfg.teacher_arch else None]


class _Batches:
    """An iterable of ``(images, labels)`` as the loop wants it: on ``device``, with ``set_epoch``."""

    def __init__(self, batches: Iterable, device: torch.device) -> None:
        self.batches, self.device = batches, device

    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.batches, "set_epoch", None)):
            self.batches.set_epoch(epoch)

    def __iter__(self):
        for x, y in self.batches:
            yield x.to(self.device), y.to(self.device)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def _first_shape(batches: Iterable) -> tuple[int, ...]:
    for x, _ in batches:
        return tuple(int(v) for v in x.shape[1:])
    raise UserError("the training data has no batches")


def _finetune(model_in: ck.LoadedModel | nn.Module, loaded: ck.LoadedModel | None, cfg: FinetuneConfig,
              out: Path | None, data: Iterable | None, extra_loss: ExtraLoss | None, more_hooks: list[Hook],
              progress: Progress | None,
              dist: Dist, device: torch.device, started: float) -> FinetuneResult:
    from ttcompress.data import check_compatible, load_split, train_loader
    from ttcompress.fastclip import following_batchnorms
    from ttcompress.spectral.network import layer_input_sizes

    notes: list[str] = []
    if cfg.amp and device.type != "cuda":
        raise SettingError("amp needs a CUDA device (float16 mixed precision); drop amp to train on the CPU", "amp")
    torch.manual_seed(cfg.seed)

    # --- data and model ----------------------------------------------------------------------------------------
    model = (loaded.model if loaded is not None else model_in).to(device)  # type: ignore[union-attr]
    net = loaded.net if loaded is not None else model
    test_set = None
    if data is None:
        train_set = load_split(cfg.data, "train", cfg.data_root)  # type: ignore[arg-type]
        test_set = _test_split(cfg.data, cfg.data_root, train_set)  # type: ignore[arg-type]
        if test_set is None:
            notes.append(f"{cfg.data} has no separate test split: no test accuracy")
        check_compatible(train_set, model, device)
        image_shape = tuple(train_set.image_shape)
    else:
        image_shape = _first_shape(data)
    if loaded is not None and list(image_shape) != list(loaded.meta.input_size):
        notes.append(f"input size set to the data's {image_shape} (was {tuple(loaded.meta.input_size)})")
        loaded.meta.input_size = list(image_shape)
    sizes = layer_input_sizes(model, image_shape, net)
    if data is None:
        augment = cfg.augment if cfg.augment is not None else image_shape[1:] == (32, 32)
        batches = train_loader(train_set, cfg.batch_size, augment=augment, seed=cfg.seed, rank=dist.rank,
                               world_size=dist.world_size, device=device)
    else:
        batches = _Batches(data, device)
    if data is None or hasattr(data, "__len__"):
        per_epoch = len(batches)
    elif cfg.steps is not None:  # a generator: one "epoch" is the whole run
        per_epoch = cfg.steps
    else:
        raise UserError("data without a length (a generator) needs the run length in steps, not epochs")
    if per_epoch < 1:
        raise UserError("the training data has no batches")
    total = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch  # type: ignore[operator]

    eval_batch = max(256, cfg.batch_size)
    t_eval = 0.0
    acc_before = None
    if dist.is_main and test_set is not None:
        t0 = time.perf_counter()
        acc_before = accuracy(model, test_set, device, eval_batch, progress, "evaluate (before)")
        t_eval += time.perf_counter() - t0

    # --- optimizer, control, state -------------------------------------------------------------------------------
    optimizer = _make_optimizer(net.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(cfg.schedule, total, per_epoch, cfg.schedule_epochs))
    scaler = torch.amp.GradScaler("cuda") if cfg.amp else None
    bn_map = following_batchnorms(model, image_shape, net) if cfg.clip_with_bn else None
    controller = Controller.from_config(cfg, net, sizes, sync=dist.broadcast if dist.active else None,
                                        batchnorms=bn_map, total_steps=total)
    distill = _distillation(cfg, loaded, device)
    if cfg.orthogonal_k > 0 and not has_frames(net):
        notes.append("--orthogonal-k has no effect: the network has no TT layers")
    if cfg.clip_with_bn:
        convs = controller.convs
        alone = [c.name for c in convs if c.bn is None]
        if alone:
            notes.append(f"--clip-with-bn: {len(alone)} of {len(convs)} convs feed no BatchNorm directly "
                         f"and are clipped alone ({', '.join(alone[:4])}{', …' if len(alone) > 4 else ''})")
    run = RunState(net=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler, controller=controller,
                   device=device, total=total, per_epoch=per_epoch, config=cfg.to_dict(),
                   files=RunFiles(out, writes=dist.is_main), notes=notes,
                   source=str(loaded.source) if loaded is not None and loaded.source else None,
                   arch=loaded.meta.arch if loaded is not None else None)
    if cfg.resume and not run.resume():
        notes.append(f"--resume: no state file {run.files.state_path}; started from the beginning")

    # --- the loop ------------------------------------------------------------------------------------------------
    train_model: nn.Module = model
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    objective = Objective(net, cfg.orthogonal_k, cfg.f4_weight, extra_loss, distill, cfg.gram_weight, sizes)
    shown = ProgressHook(progress)
    hooks = [DivergenceGuard(dist), ControlHook(cfg.reset_momentum), CsvHook(objective.columns),
             *([TensorBoardHook()] if cfg.tensorboard else []), shown, SaveHook(cfg.save_every), *more_hooks]
    try:
        final_loss = train_loop(run, train_model, batches, objective, hooks)
    finally:
        if distill is not None:
            distill.close()  # the layer term's hooks on the student
    run.save()  # a crash during verification or evaluation resumes here

    # --- verify, evaluate, save (rank 0) --------------------------------------------------------------------------
    # the BatchNorm recalibration reads the epoch after the last one's order (whether or not the run resumed)
    checked = verify(controller, model, batches, (total - 1) // per_epoch + 2, cfg.bn_recalibrate) \
        if dist.is_main else Verification()
    note = verification_note(checked.bounds, cfg.clip_with_bn)
    if note:
        notes.append(note)
    acc_after = None
    if dist.is_main:
        if test_set is not None:
            t0 = time.perf_counter()
            acc_after = accuracy(model, test_set, device, eval_batch, progress, "evaluate")
            t_eval += time.perf_counter() - t0
        model.eval()
        if loaded is not None and out is not None:
            entry = ck.history_entry("finetune", checkpoint=str(loaded.source) if loaded.source else None,
                                     **cfg.to_dict())
            run.files.write_output(loaded, entry)
    dist.barrier()
    model.to("cpu").eval()
    return FinetuneResult(
        out_path=str(out) if out is not None else None,
        log_path=str(run.files.paths["log"]) if run.files.writes else None,
        steps=total,
        steps_per_epoch=per_epoch,
        resumed_from=run.resumed_from,
        final_loss=final_loss,
        train_accuracy=shown.accuracy,
        test_accuracy_before=acc_before,
        test_accuracy=acc_after,
        test_images=len(test_set) if test_set is not None else None,
        bounds=checked.bounds,
        time_total=time.perf_counter() - started,
        time_training=run.training_time,
        time_teacher=distill.seconds if distill is not None else 0.0,
        time_control=sum(controller.timings.values()),
        control_breakdown=dict(controller.timings),
        time_verify=checked.time_verify,
        time_bn_recalibrate=checked.time_bn_recalibrate,
        time_eval=t_eval,
        device=str(device),
        world_size=dist.world_size,
        amp=cfg.amp,
        config=cfg.to_dict(),
        notes=notes,
        model=model,
    )


def _distillation(cfg: FinetuneConfig, loaded: ck.LoadedModel | None, device: torch.device) -> Distillation | None:
    """The distillation term when ``teacher`` is set: the teacher loaded safely and checked against the student."""
    if cfg.teacher is None:
        return None
    if loaded is None:
        raise SettingError("teacher needs the student's metadata: pass a loaded model (ttcompress.load)", "teacher")
    teacher, _ = load_teacher(cfg.teacher, loaded, arch=cfg.teacher_arch)
    return Distillation(teacher.model, cfg.kd_alpha, cfg.kd_temperature, cfg.kd_features,
                        student_net=loaded.net, teacher_net=teacher.net).to(device)


def _make_optimizer(params, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def _test_split(spec: str, data_root: str | None, train: Any):
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
