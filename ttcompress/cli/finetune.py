"""`ttcompress finetune`: one flag per setting of :class:`ttcompress.train.config.FinetuneConfig` (same name,
its default shown), parsed here and passed on; errors name the flags."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ttcompress.cli import app, handles_errors
from ttcompress.cli.common import ArchOpt, JsonOpt, KeyPrefixOpt
from ttcompress.train.config import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, DEVICES, OPTIMIZERS, FinetuneConfig


def flag(name: str) -> str:
    """The flag of setting ``name``: ``clip_to`` → ``--clip-to``."""
    return "--" + name.replace("_", "-")


def _default(name: str) -> str | None:
    """What the help shows as the default of setting ``name`` (from the configuration; None: not set)."""
    value = FinetuneConfig.__dataclass_fields__[name].default
    if isinstance(value, bool):
        return "on" if value else "off"
    return None if value is None else str(value)


def _opt(name: str, help: str, *, toggle: bool = False):
    """The option of setting ``name``: unset (None) unless given, so that a recipe's value stands."""
    decls = [f"{flag(name)}/--no-{name.replace('_', '-')}"] if toggle else [flag(name)]
    shown = _default(name)
    return typer.Option(None, *decls, help=help + (f" [default: {shown}]" if shown else ""), show_default=False)


_AUTO_LR = ", ".join(f"{v:g} {k}" for k, v in DEFAULT_LR.items())
_AUTO_WD = ", ".join(f"{v:g} {k}" for k, v in DEFAULT_WEIGHT_DECAY.items())

@app.command()
@handles_errors
def finetune(
    checkpoint: Path = typer.Argument(..., help="Model to train (.safetensors from ttcompress, or any with --arch)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output .safetensors file (state, log beside it)."),
    data: Optional[str] = _opt("data", "cifar10, cifar100, a .npz file (train_x/train_y [+ test_x/test_y] or x/y) "
                               "or an image folder (train/ test/ or classes)."),
    data_root: Optional[str] = _opt("data_root", "Folder of the torchvision data sets (default "
                                    "~/.cache/ttcompress/data; downloads when it can)."),
    recipe: Optional[str] = _opt("recipe", "YAML file of defaults (e.g. recipes/NAME.yaml or NAME); flags given "
                                 "here override it."),
    epochs: Optional[int] = _opt("epochs", "Run length in epochs (or --steps)."),
    steps: Optional[int] = _opt("steps", "Run length in optimizer steps (or --epochs)."),
    batch_size: Optional[int] = _opt("batch_size", "Batch size per process."),
    optimizer: Optional[str] = _opt("optimizer", " or ".join(OPTIMIZERS) + "."),
    lr: Optional[float] = _opt("lr", f"Learning rate. [default: {_AUTO_LR}]"),
    momentum: Optional[float] = _opt("momentum", "SGD momentum."),
    nesterov: Optional[bool] = _opt("nesterov", "Nesterov momentum (SGD).", toggle=True),
    weight_decay: Optional[float] = _opt("weight_decay", f"L2 weight decay. [default: {_AUTO_WD}]"),
    schedule: Optional[str] = _opt("schedule", "constant, cosine or multistep:M1,M2,...[:GAMMA] (milestones in "
                                   "epochs; a --steps run places them at the same fraction of the run)."),
    schedule_epochs: Optional[float] = _opt("schedule_epochs", "The epoch count multistep milestones refer to "
                                            "(default: the run's; set when --steps replaces a recipe's epochs)."),
    orthogonal_k: Optional[float] = _opt("orthogonal_k", "Weight K of the orthogonal loss on TT frames (paper: "
                                         "1e5)."),
    f4_weight: Optional[float] = _opt("f4_weight", "Weight W of the regulariser W·Σ F4 bound (Singla & Feizi's "
                                      "differentiable bound on each conv's σmax)."),
    gram_weight: Optional[float] = _opt("gram_weight", "Weight W of the regulariser W·Σ Gram bound (each conv's "
                                        "periodic σmax on the input size it sees, Gram iteration; differentiable)."),
    clip_to: Optional[float] = _opt("clip_to", "Clip every conv's exact singular values at C (TT layers: their "
                                    "core after QR)."),
    clip_every: Optional[int] = _opt("clip_every", "Clip every N steps."),
    divide_to: Optional[float] = _opt("divide_to", "After every step divide each conv by max(1, σ̂/D), σ̂ by power "
                                      "iteration (Gouk et al.)."),
    bn_to: Optional[float] = _opt("bn_to", "BatchNorm limit: γ ← γ / max(1, max|γ/√(var+ε)|/X)."),
    linear_to: Optional[float] = _opt("linear_to", "Limit the linear layers' σmax to Y (divided with "
                                      "--divide-to, else clipped)."),
    power_iters: Optional[int] = _opt("power_iters", "Power iterations per step for --divide-to."),
    fastclip_to: Optional[float] = _opt("fastclip_to", "FastClip (Boroojeny et al. 2024): bring each conv's top "
                                        "singular values as it runs (its padding, stride) to C through its "
                                        "singular vectors. Instead of --clip-to/--divide-to."),
    fastclip_every: Optional[int] = _opt("fastclip_every", "FastClip every N steps."),
    fastclip_k: Optional[int] = _opt("fastclip_k", "Singular values FastClip moves at once."),
    fastclip_rounds: Optional[int] = _opt("fastclip_rounds", "FastClip rounds per layer and call, and in the final "
                                          "verification before rescaling."),
    clip_with_bn: Optional[bool] = _opt("clip_with_bn", "With --fastclip-to: clip the composition of each conv "
                                        "with the BatchNorm that consumes its output (eval mode)."),
    bound_schedule: Optional[str] = _opt("bound_schedule", "Reach the --clip-to/--divide-to/--fastclip-to bound "
                                         "gradually: linear:F or cosine:F lowers each conv's bound from its own "
                                         "starting σmax over the first fraction F of the run (the saved model still "
                                         "meets the bound exactly)."),
    teacher: Optional[str] = _opt("teacher", "Distil from this checkpoint (the teacher runs in eval mode on the same "
                                  "batches); auto: the checkpoint this file was decomposed from, refused if it "
                                  "changed since."),
    teacher_arch: Optional[str] = _opt("teacher_arch", "Architecture of a foreign --teacher checkpoint (as --arch)."),
    kd_alpha: Optional[float] = _opt("kd_alpha", "Weight of the distillation term T²·KL(teacher ‖ student), added "
                                     "to the cross-entropy."),
    kd_temperature: Optional[float] = _opt("kd_temperature", "Softmax temperature T of the distillation term."),
    kd_features: Optional[float] = _opt("kd_features", "Weight of the layer term: the relative squared error of "
                                        "each decomposed layer's output against the teacher's layer of the same "
                                        "name, on the same batch."),
    reset_momentum: Optional[bool] = _opt("reset_momentum", "After a control step rewrites a conv (a TT layer: new "
                                          "orthonormal frames), drop the optimizer's momentum for its weights.",
                                          toggle=True),
    final_reprojections: Optional[int] = _opt("final_reprojections", "Final verification: exact re-projections of "
                                              "a conv above its bound before it is rescaled (0: rescale at once, "
                                              "which the BatchNorm recalibration absorbs for convs that feed one)."),
    bn_recalibrate: Optional[int] = _opt("bn_recalibrate", "Training batches to re-estimate BatchNorm statistics "
                                         "after the final projection (0: off)."),
    augment: Optional[bool] = _opt("augment", "Random crop (4-pixel padding) and flip. [default: on for 32×32 "
                                   "images]", toggle=True),
    device: Optional[str] = _opt("device", ", ".join(DEVICES[:-1]) + " or " + DEVICES[-1] + "."),
    amp: Optional[bool] = _opt("amp", "float16 mixed precision (CUDA only).", toggle=True),
    seed: Optional[int] = _opt("seed", "Seed of data order, augmentation and power iteration."),
    save_every: Optional[int] = _opt("save_every", "Write the resumable state OUT.state.pt every N steps."),
    resume: Optional[bool] = _opt("resume", "Continue from OUT.state.pt (same command, after a crash)."),
    tensorboard: Optional[bool] = _opt("tensorboard", "Also write TensorBoard events to OUT.tb/."),
    arch: Optional[str] = ArchOpt,
    key_prefix: Optional[str] = KeyPrefixOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Train a (TT) model with cross-entropy + orthogonal loss under exact singular-value control.

    Writes OUT and, beside it, NAME.log.csv (per step) and while running NAME.state.pt (resumable state, deleted
    at the end), NAME being OUT without its suffix.  Under torchrun it trains data-parallel (rank 0 writes).

    Example: ttcompress finetune r20-tt.safetensors --data cifar10 --steps 2000 --clip-to 1 -o r20-ft.safetensors

    Example: ttcompress finetune r20-tt.safetensors --data cifar10 --steps 2000 --fastclip-to 1 --clip-with-bn -o r20-fc.safetensors
    """
    settings = {k: v for k, v in locals().items() if k in FinetuneConfig.__dataclass_fields__}
    from ttcompress.cli.common import load_model
    from ttcompress.errors import TTCompressError
    from ttcompress.train import finetune as run_finetune
    from ttcompress.ui import RichProgress, err_console, out_console, print_json, table

    try:
        config = FinetuneConfig.from_recipe(settings.pop("recipe"), **settings)
        loaded = load_model(checkpoint, config.arch, None, None, False, key_prefix=key_prefix)
        result = run_finetune(loaded, config, out_path=out, progress=RichProgress())
    except TTCompressError as exc:
        if not exc.settings:
            raise
        raise type(exc)(exc.render(flag)) from None
    if result.world_size > 1 and result.log_path is None:
        return  # not rank 0: rank 0 reports
    if as_json:
        print_json(result.to_json())
        return

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.2f}%"

    rows = [
        ["steps", f"{result.steps} ({result.epochs:.2f} epochs of {result.steps_per_epoch} steps)"
         + (f", resumed at {result.resumed_from}" if result.resumed_from else "")],
        ["final loss", "—" if result.final_loss is None else f"{result.final_loss:.4f}"],
        ["train accuracy (last epoch)", pct(result.train_accuracy)],
        ["test accuracy before → after" + (f" ({result.test_images} images)" if result.test_images else ""),
         f"{pct(result.test_accuracy_before)} → {pct(result.test_accuracy)}"],
        ["time: training / control", f"{result.time_training:.1f} s / {result.time_control:.1f} s "
         f"({100 * result.control_share:.1f}% control)"
         + (f"; teacher {result.time_teacher:.1f} s of the training" if result.time_teacher else "")],
        ["time: verification / BN recalibration / evaluation",
         f"{result.time_verify:.1f} s / {result.time_bn_recalibrate:.1f} s / {result.time_eval:.1f} s"],
        ["device", result.device + (f" ×{result.world_size}" if result.world_size > 1 else "")
         + (" (amp)" if result.amp else "")],
    ]
    out_console.print(table(f"finetune {checkpoint.name}", ["", "value"], rows, justify_numbers=False))
    if result.bounds:
        brows = [[b.name, b.kind, b.operator, f"{b.bound:g}", f"{b.sigma_before:.4f}", f"{b.sigma_after:.4f}",
                  b.action] for b in result.bounds]
        title = ("final verification (σmax as the layers run, PowerQR to 1e-4)" if config.fastclip_to is not None
                 else "final verification (exact σmax)")
        out_console.print(table(title, ["layer", "kind", "operator", "bound", "before", "after", "action"], brows))
    for note in result.notes:
        err_console.print(f"note: {note}", highlight=False, soft_wrap=True)
    err_console.print(f"wrote {result.out_path}" + (f" (log {result.log_path})" if result.log_path else ""))
