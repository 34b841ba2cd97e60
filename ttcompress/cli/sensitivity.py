"""`ttcompress sensitivity`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ttcompress.cli import app, handles_errors
from ttcompress.cli.common import ArchOpt, JsonOpt, MeanOpt, StdOpt, TrustOpt, arch_file, load_model
from ttcompress.errors import UserError
from ttcompress.outputs import guard


@app.command()
@handles_errors
def sensitivity(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="Checkpoint to measure."),
    data: str = typer.Option(..., "--data", help="cifar10, cifar100, a .npz file or an ImageFolder directory."),
    ranks: str = typer.Option("4,8,16,32", "--ranks", help="Comma-separated TT ranks R (r1 = min(R, Cin), "
                              "r2 = min(R, Cout))."),
    n: int = typer.Option(256, "--n", help="Measure on the first N images."),
    split: str = typer.Option("test", "--split", help="Split of --data: test or train."),
    batch_size: int = typer.Option(256, "--batch-size", help="Batch size."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG: accuracy drop vs rank per layer."),
    skip: List[str] = typer.Option([], "--skip", help="Glob of layer names not to measure (repeatable)."),
    data_aware: bool = typer.Option(True, "--data-aware/--plain", help="Truncate each layer where its inputs on "
                                    "these images live (as decompose --calibrate does), or the kernel alone."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where torchvision data sets live."),
    arch: Optional[str] = ArchOpt,
    mean: Optional[str] = MeanOpt,
    std: Optional[str] = StdOpt,
    trust_pickle: bool = TrustOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Per layer and rank: accuracy and loss with only that layer decomposed, its relative error, params and MACs.

    Example: ttcompress sensitivity resnet20.th --arch resnet20 --data cifar10-sample.npz --ranks 4,8,16,32 --plot sens.png
    """
    from ttcompress.cli.evaluate import parse_ints
    from ttcompress.data import check_compatible, load_split
    from ttcompress.device import pick_device
    from ttcompress.report import plot_sensitivity
    from ttcompress.sensitivity import sensitivity as measure
    from ttcompress.ui import RichProgress, err_console, out_console, print_json, table

    wanted = parse_ints(ranks, "--ranks")
    if not wanted or min(wanted) <= 0:
        raise UserError(f"--ranks must be positive integers, got {ranks!r}")
    if n <= 0:
        raise UserError(f"--n must be positive, got {n}")
    with guard([("--plot", plot)], inputs=[checkpoint, arch_file(arch), data if Path(data).exists() else None]):
        torch_device = pick_device(device)
        loaded = load_model(checkpoint, arch, mean, std, trust_pickle)
        images = load_split(data, split, data_root).subset(n)
        model = loaded.model.to(torch_device)
        check_compatible(images, model, torch_device)
        report = measure(model, loaded.net, loaded.input_size, images, wanted, skip=skip, batch_size=batch_size,
                         device=torch_device, data_aware=data_aware, progress=RichProgress())
        if plot is not None:
            plot_sensitivity(report, plot, title=f"sensitivity of {checkpoint.name} ({report.n} images)")
    if as_json:
        print_json(report.to_json())
    else:
        rows = [[r.layer, r.rank, f"{r.ranks[0]}, {r.ranks[1]}", f"{100 * r.accuracy:.2f}",
                 f"{100 * (r.accuracy - report.accuracy):+.2f}", f"{r.loss:.4f}", f"{r.output_change:.4f}",
                 f"{r.rel_error:.4f}", f"{r.params_before:,} → {r.params_after:,}",
                 f"{r.macs_before:,} → {r.macs_after:,}"] for r in report.rows]
        out_console.print(table(
            f"sensitivity {checkpoint.name}: dense {100 * report.accuracy:.2f} %, loss {report.loss:.4f}, "
            f"n = {report.n}, {'data-aware' if report.data_aware else 'plain'} truncation",
            ["layer", "R", "ranks", "acc. %", "Δ acc.", "loss", "output change", "rel. error", "params", "MACs"],
            rows))
        for name, why in report.skipped.items():
            err_console.print(f"{name}: not measured ({why})")
    if plot is not None:
        err_console.print(f"wrote {plot}")
