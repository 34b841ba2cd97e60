"""`ttcompress spectrum`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import typer

from ttcompress.cli import app, handles_errors
from ttcompress.cli.common import ArchOpt, JsonOpt, MeanOpt, StdOpt, TrustOpt, load_model
from ttcompress.errors import UserError

@app.command()
@handles_errors
def spectrum(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="Checkpoint (.safetensors from ttcompress, or any with --arch)."),
    arch: Optional[str] = ArchOpt,
    input_size: Optional[Tuple[int, int]] = typer.Option(None, "--input-size", help="Input H W (default from "
                                                         "metadata or the architecture, e.g. 32 32).",
                                                         show_default=False),
    values: Optional[Path] = typer.Option(None, "--values", help="Write every layer's singular values to this .npz."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of the per-layer spectra."),
    precision: str = typer.Option("float32", "--precision", help="float32 (complex64 SVDs, ~1e-6·σmax) or float64."),
    mean: Optional[str] = MeanOpt,
    std: Optional[str] = StdOpt,
    trust_pickle: bool = TrustOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Exact singular values of every conv layer (periodic, strides included; TT layers via their core).

    Example: ttcompress spectrum r20-tt.safetensors --json --plot spectra.png
    """
    import torch

    from ttcompress.spectral import network_spectrum
    from ttcompress.ui import RichProgress, err_console, out_console, print_json, table

    if precision not in ("float32", "float64"):
        raise UserError(f"--precision must be float32 or float64, got {precision!r}")
    loaded = load_model(checkpoint, arch, mean, std, trust_pickle, list(input_size) if input_size else None)
    for path in (values, plot):
        if path is not None:
            from ttcompress.checkpoint import check_output_path

            check_output_path(path, checkpoint)
    layers = network_spectrum(loaded.model, loaded.input_size, net=loaded.net,
                              dtype=getattr(torch, precision), progress=RichProgress())
    if values is not None:
        from ttcompress.report import write_values

        write_values(layers, values)
    if plot is not None:
        from ttcompress.report import plot_spectra

        plot_spectra(layers, plot, title=checkpoint.name)
    if as_json:
        print_json({"layers": [l.to_json() for l in layers]})
    else:
        rows = [[l.name, l.kind, f"{l.input_size[0]}×{l.input_size[1]}", f"{l.stride[0]}×{l.stride[1]}",
                 l.sigma_max, l.sigma_min, l.count] for l in layers]
        out_console.print(table(f"spectrum {checkpoint.name}", ["layer", "kind", "input", "stride", "σmax", "σmin",
                                                                "count"], rows))
    for path in (values, plot):
        if path is not None:
            err_console.print(f"wrote {path}")


