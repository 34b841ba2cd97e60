"""`ttcompress finetune`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ttcompress.cli import app, handles_errors
from ttcompress.cli.common import ArchOpt, JsonOpt, KeyPrefixOpt


@app.command()
@handles_errors
def finetune(
    checkpoint: Path = typer.Argument(..., help="Model to train (.safetensors from ttcompress, or any with --arch)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output .safetensors file (state, log beside it)."),
    data: Optional[str] = typer.Option(None, "--data", help="cifar10, cifar100, a .npz file (train_x/train_y "
                                       "[+ test_x/test_y] or x/y) or an image folder (train/ test/ or classes)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Folder of the torchvision data sets "
                                            "(default ~/.cache/ttcompress/data; downloads when it can)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="YAML file of defaults (e.g. recipes/NAME.yaml or "
                                         "NAME); flags given here override it."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Run length in epochs (or --steps)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Run length in optimizer steps (or --epochs)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size per process. [default: 128]"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd or adam. [default: sgd]"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate. [default: 0.01 sgd, 1e-4 adam]"),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD momentum. [default: 0.9]"),
    nesterov: Optional[bool] = typer.Option(None, "--nesterov/--no-nesterov", help="Nesterov momentum (SGD). "
                                            "[default: off]", show_default=False),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="L2 weight decay. "
                                                 "[default: 1e-4 sgd, 0 adam]"),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="constant, cosine or multistep:M1,M2,...[:GAMMA] "
                                           "(milestones in epochs; a --steps run places them at the same fraction "
                                           "of the run). [default: cosine]"),
    orthogonal_k: Optional[float] = typer.Option(None, "--orthogonal-k", help="Weight K of the orthogonal loss on "
                                                 "TT frames (paper: 1e5). [default: 0]"),
    f4_weight: Optional[float] = typer.Option(None, "--f4-weight", help="Weight W of the regulariser W·Σ F4 bound "
                                              "(Singla & Feizi's differentiable bound on each conv's σmax). "
                                              "[default: 0]"),
    clip_to: Optional[float] = typer.Option(None, "--clip-to", help="Clip every conv's exact singular values at C "
                                            "(TT layers: their core after QR)."),
    clip_every: Optional[int] = typer.Option(None, "--clip-every", help="Clip every N steps. [default: 100]"),
    divide_to: Optional[float] = typer.Option(None, "--divide-to", help="After every step divide each conv by "
                                              "max(1, σ̂/D), σ̂ by power iteration (Gouk et al.)."),
    bn_to: Optional[float] = typer.Option(None, "--bn-to", help="BatchNorm limit: γ ← γ / max(1, max|γ/√(var+ε)|/X)."),
    linear_to: Optional[float] = typer.Option(None, "--linear-to", help="Limit the linear layers' σmax to Y (divided "
                                              "with --divide-to, else clipped)."),
    power_iters: Optional[int] = typer.Option(None, "--power-iters", help="Power iterations per step for "
                                              "--divide-to. [default: 1]"),
    fastclip_to: Optional[float] = typer.Option(None, "--fastclip-to", help="FastClip (Boroojeny et al. 2024): bring "
                                                "each conv's top singular values as it runs (zero padding, stride) "
                                                "to C through its singular vectors. Instead of --clip-to/--divide-to."),
    fastclip_every: Optional[int] = typer.Option(None, "--fastclip-every", help="FastClip every N steps. "
                                                 "[default: 100]"),
    fastclip_k: Optional[int] = typer.Option(None, "--fastclip-k", help="Singular values FastClip moves at once. "
                                             "[default: 1]"),
    fastclip_rounds: Optional[int] = typer.Option(None, "--fastclip-rounds", help="FastClip rounds per layer and "
                                                  "call, and in the final verification before rescaling. "
                                                  "[default: 10]"),
    clip_with_bn: bool = typer.Option(False, "--clip-with-bn", help="With --fastclip-to: clip the composition of each "
                                      "conv with the BatchNorm that consumes its output (eval mode)."),
    bn_recalibrate: Optional[int] = typer.Option(None, "--bn-recalibrate", help="Training batches to re-estimate "
                                                 "BatchNorm statistics after the final projection (0: off). "
                                                 "[default: 20]"),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Random crop (4-pixel padding) and "
                                           "flip. [default: on for 32×32 images]", show_default=False),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N. [default: auto]"),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="float16 mixed precision (CUDA only). "
                                       "[default: off]", show_default=False),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of data order, augmentation and power "
                                       "iteration. [default: 0]"),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Write the resumable state OUT.state.pt "
                                             "every N steps. [default: 500]"),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT.state.pt (same command, after a crash)."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write TensorBoard events to OUT.tb/."),
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
    from ttcompress import checkpoint as ck
    from ttcompress.cli.common import load_model
    from ttcompress.train import FinetuneConfig
    from ttcompress.train import finetune as run_finetune
    from ttcompress.ui import RichProgress, err_console, out_console, print_json, table

    config = FinetuneConfig.from_recipe(
        recipe, data=data, data_root=data_root, arch=arch, epochs=epochs, steps=steps, batch_size=batch_size,
        optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
        schedule=schedule, orthogonal_k=orthogonal_k, f4_weight=f4_weight, clip_to=clip_to, clip_every=clip_every,
        divide_to=divide_to, bn_to=bn_to, linear_to=linear_to, power_iters=power_iters, fastclip_to=fastclip_to,
        fastclip_every=fastclip_every, fastclip_k=fastclip_k, fastclip_rounds=fastclip_rounds,
        clip_with_bn=clip_with_bn or None, bn_recalibrate=bn_recalibrate,
        augment=augment, device=device, amp=amp,
        seed=seed, save_every=save_every, resume=resume or None, tensorboard=tensorboard or None,
    )
    out = ck.check_output_path(out, checkpoint)
    loaded = load_model(checkpoint, config.arch, None, None, False, key_prefix=key_prefix)
    result = run_finetune(loaded, config, out_path=out, progress=RichProgress())
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
         f"({100 * result.control_share:.1f}% control)"],
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
