"""`ttcompress decompose`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ttcompress.cli import app, handles_errors
from ttcompress.cli.common import ArchOpt, JsonOpt, KeyPrefixOpt, MeanOpt, StdOpt, TrustOpt, arch_file, load_model
from ttcompress.errors import UserError
from ttcompress.outputs import guard


@app.command()
@handles_errors
def decompose(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="Checkpoint to decompose (.pt/.pth/.th or .safetensors)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output .safetensors file."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Maximum TT rank: r1 ≤ min(R, Cin), r2 ≤ min(R, Cout)."),
    energy: Optional[float] = typer.Option(None, "--energy", help="Keep this fraction of squared singular values "
                                           "per unfolding (0 < E ≤ 1)."),
    target_ratio: Optional[float] = typer.Option(None, "--target-ratio", help="Whole-model parameter ratio X "
                                                 "(before/after), reached within ±2 % by per-layer ranks."),
    target_macs: Optional[float] = typer.Option(None, "--target-macs", help="Whole-model MAC ratio X (before/after) "
                                                "at the model's input size, within ±2 %."),
    max_rank: Optional[int] = typer.Option(None, "--max-rank", help="With a target: cap r1 and r2 at R."),
    calibrate: Optional[str] = typer.Option(None, "--calibrate", help="Truncate each layer where its inputs live on "
                                            "these images (npz, ImageFolder, cifar10); with a target, also weight "
                                            "each layer's damage by the measured output change."),
    calibrate_n: int = typer.Option(256, "--calibrate-n", help="Number of calibration images."),
    calibrate_split: str = typer.Option("train", "--calibrate-split", help="Split of --calibrate to use."),
    bn_correct: bool = typer.Option(True, "--bn-correct/--no-bn-correct", help="With --calibrate: move each "
                                    "BatchNorm's running statistics by the change the decomposition made to its "
                                    "inputs on the calibration images."),
    latency: bool = typer.Option(False, "--latency", help="Time every decomposed layer (dense vs TT) and the whole "
                                 "model before/after (median of --repeats)."),
    keep_faster: bool = typer.Option(False, "--keep-faster", help="Keep a layer dense where its TT form is not "
                                     "faster on --device at --batch-size (implies --latency)."),
    device: str = typer.Option("cpu", "--device", help="Device for --latency / --calibrate: cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(1, "--batch-size", help="Batch size of the latency measurements."),
    repeats: int = typer.Option(7, "--repeats", help="Timed runs per latency figure (median)."),
    skip: List[str] = typer.Option([], "--skip", help="Glob of layer names to keep dense (repeatable)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where torchvision data sets live."),
    arch: Optional[str] = ArchOpt,
    mean: Optional[str] = MeanOpt,
    std: Optional[str] = StdOpt,
    trust_pickle: bool = TrustOpt,
    key_prefix: Optional[str] = KeyPrefixOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Replace every conv by a TT layer (1×1 → k×k core → 1×1) via truncated SVD.

    Example: ttcompress decompose resnet20.th --arch resnet20 --rank 8 -o r20-tt.safetensors

    Example: ttcompress decompose resnet20.th --arch resnet20 --rank 24 --calibrate cifar10-sample.npz -o r20-tt.safetensors

    Example: ttcompress decompose resnet20.th --arch resnet20 --target-ratio 4 --calibrate cifar10-sample.npz -o r20-x4.safetensors

    Example: ttcompress decompose model.pt --arch resnet18-cifar --target-macs 4 --latency --keep-faster --batch-size 128 -o r18-m4.safetensors
    """
    from ttcompress import checkpoint as ck
    from ttcompress.compress import CompressSettings, compress
    from ttcompress.device import pick_device
    from ttcompress.ui import RichProgress, err_console, print_json

    settings = CompressSettings(rank=rank, energy=energy, target_ratio=target_ratio, target_macs=target_macs,
                                max_rank=max_rank, skip=tuple(skip), latency=latency or keep_faster,
                                keep_faster=keep_faster, batch_size=batch_size, repeats=repeats,
                                bn_correct=bn_correct)
    if calibrate is not None and calibrate_n <= 0:
        raise UserError(f"--calibrate-n must be positive, got {calibrate_n}")
    settings.validate(calibrating=calibrate is not None)
    calibration_file = calibrate if calibrate is not None and Path(calibrate).exists() else None
    with guard([("-o", out)], inputs=[checkpoint, arch_file(arch), calibration_file]):
        torch_device = pick_device(device)
        settings.device = torch_device
        loaded = load_model(checkpoint, arch, mean, std, trust_pickle, key_prefix=key_prefix)
        if calibrate is not None:
            from ttcompress.data import check_compatible, load_split

            settings.calibrate = load_split(calibrate, calibrate_split, data_root).subset(calibrate_n)
            check_compatible(settings.calibrate, loaded.model)
        loaded.model.to(torch_device)
        result = compress(loaded.model, loaded.net, loaded.input_size, settings, progress=RichProgress())
        ck.save(loaded, out, ck.history_entry(
            "decompose", **ck.source_args(checkpoint, arch), rank=rank, energy=energy, target_ratio=target_ratio,
            target_macs=target_macs, max_rank=max_rank, calibrate=calibrate,
            bn_correct=bn_correct if calibrate is not None else None, keep_faster=keep_faster, skip=list(skip)))
    if as_json:
        print_json(result.to_json())
        return
    render(result, checkpoint.name, torch_device.type, batch_size)
    err_console.print(f"wrote {out}")


def render(result, name: str, device: str, batch_size: int) -> None:
    from ttcompress.ui import out_console, table

    report = result.decomposition
    timed = result.layer_latency is not None
    columns = ["layer", "shape", "ranks", "rel. error", "params before", "params after", "MACs before", "MACs after"]
    if timed:
        columns += ["dense ms", "TT ms"]
    rows = []
    for l in report.layers:
        ranks = "dense: " + (l.reason or "") if l.ranks is None or l.reason else f"{l.ranks[0]}, {l.ranks[1]}"
        row = [l.name, "×".join(map(str, l.shape)), ranks, f"{l.rel_error:.4f}", l.params_before, l.params_after,
               result.layer_macs_before.get(l.name, 0), result.layer_macs_after.get(l.name, 0)]
        if timed:
            dense, tt = result.layer_latency.get(l.name, (None, None))
            row += ["" if dense is None else f"{dense:.3f}", "" if tt is None else f"{tt:.3f}"]
        rows.append(row)
    out_console.print(table(f"decompose {name}", columns, rows))
    out_console.print(f"parameters {report.params_before:,} → {report.params_after:,} "
                      f"(compression ×{report.compression:.2f})")
    out_console.print(f"MACs per image {result.macs_before:,} → {result.macs_after:,} (×{result.macs_ratio:.2f})")
    if result.target is not None:
        t = result.target
        achieved = report.compression if t["metric"] == "params" else result.macs_ratio
        what = "parameter" if t["metric"] == "params" else "MAC"
        out_console.print(f"target: {what} ratio ×{t['ratio']:g} → ×{achieved:.3f}"
                          + (" (calibrated)" if t["calibrate"] else ""))
    if result.calibrate is not None:
        c = result.calibrate
        done = (["data-aware truncation"] if c["data_aware"] else []) + (
            [f"{c['batchnorm']} BatchNorm layers corrected"] if c["batchnorm"] else [])
        out_console.print(f"calibrated on {c['n']} images of {c['source']}: {', '.join(done) or 'allocation only'}")
    if timed:
        out_console.print(f"latency on {device}, batch {batch_size}: {result.latency_before_ms:.3f} ms → "
                          f"{result.latency_after_ms:.3f} ms "
                          f"(×{result.latency_before_ms / result.latency_after_ms:.2f} faster)")
