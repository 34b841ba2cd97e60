"""`ttcompress spectrum`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import typer

from ttcompress.cli import app, handles_errors
from ttcompress.cli.common import ArchOpt, JsonOpt, KeyPrefixOpt, MeanOpt, StdOpt, TrustOpt, arch_file, load_model
from ttcompress.errors import UserError
from ttcompress.outputs import guard

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
    precision: str = typer.Option("float32", "--precision", help="float32 (complex64 SVDs, ~1e-6·σmax) or float64 "
                                  "(exact spectrum and kernel bounds; power always runs in float64)."),
    method: List[str] = typer.Option([], "--method", "-m", help="exact (default), f4, fourier, gram, gram-zero, "
                                     "power or all; repeatable or comma-separated, e.g. --method exact,gram."),
    all_methods: bool = typer.Option(False, "--all-methods", help="Every method (same as --method all)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="With the power method: also find the top K singular "
                                        "values of each layer as it runs.", show_default=False),
    gram_iters: Optional[int] = typer.Option(None, "--gram-iters", help="Gram products per frequency block for gram "
                                             "and gram-zero (default 8: within 1e-3 of exact on ResNet-20).",
                                             show_default=False),
    mean: Optional[str] = MeanOpt,
    std: Optional[str] = StdOpt,
    trust_pickle: bool = TrustOpt,
    key_prefix: Optional[str] = KeyPrefixOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Exact singular values of every conv layer (periodic, strides included; TT layers via their core), and
    other ways to get σmax side by side: the F4, Fourier and Gram-iteration bounds (periodic and zero padding), and
    power iteration on the layer as it runs (zero padding), each timed.

    Example: ttcompress spectrum r20-tt.safetensors --json --plot spectra.png

    Example: ttcompress spectrum model.th --arch resnet20 --all-methods

    Example: ttcompress spectrum model.th --arch resnet20 --method exact,gram,gram-zero --gram-iters 6
    """
    from ttcompress.spectral.methods import parse_methods

    if precision not in ("float32", "float64"):
        raise UserError(f"--precision must be float32 or float64, got {precision!r}")
    methods = parse_methods([*method, *(["all"] if all_methods else [])])
    if top_k is not None:
        if top_k < 1:
            raise UserError(f"--top-k must be at least 1, got {top_k}")
        if "power" not in methods:
            raise UserError("--top-k needs the power method: add --method power (or --all-methods)")
    if gram_iters is not None:
        if gram_iters < 1:
            raise UserError(f"--gram-iters must be at least 1, got {gram_iters}")
        if not {"gram", "gram-zero"} & set(methods):
            raise UserError("--gram-iters needs a Gram method: add --method gram or gram-zero (or --all-methods)")
    for flag, path in (("--values", values), ("--plot", plot)):
        if path is not None and "exact" not in methods:
            raise UserError(f"{flag} needs the exact spectrum: add exact to --method (or use --all-methods)")
    with guard([("--values", values), ("--plot", plot)], inputs=[checkpoint, arch_file(arch)]):
        _spectrum(checkpoint, arch, input_size, values, plot, precision, methods, method or all_methods, top_k,
                  gram_iters, mean, std, trust_pickle, as_json, key_prefix)


def _spectrum(checkpoint, arch, input_size, values, plot, precision, methods, timed, top_k, gram_iters, mean, std,
              trust_pickle, as_json, key_prefix) -> None:
    import torch

    from ttcompress.spectral.gram import DEFAULT_ITERS
    from ttcompress.spectral.methods import network_methods
    from ttcompress.ui import RichProgress, err_console, out_console, print_json, say, table

    loaded = load_model(checkpoint, arch, mean, std, trust_pickle, list(input_size) if input_size else None,
                        key_prefix)
    results = network_methods(loaded.model, loaded.input_size, methods, net=loaded.net,
                              dtype=getattr(torch, precision), top_k=top_k,
                              gram_iters=DEFAULT_ITERS if gram_iters is None else gram_iters, progress=RichProgress())
    layers = [r.spectrum for r in results if r.spectrum is not None]
    if values is not None:
        from ttcompress.report import write_values

        write_values(layers, values)
    if plot is not None:
        from ttcompress.report import plot_spectra

        plot_spectra(layers, plot, title=checkpoint.name)
    if as_json:
        print_json({"methods": list(methods), "layers": [r.to_json() for r in results]})
    else:
        columns, rows = _values_table(results, methods, top_k)
        _print_wide(out_console, table(f"spectrum {checkpoint.name}", columns, rows))
        if timed:
            columns, rows = _times_table(results, methods)
            _print_wide(out_console, table("time per layer (ms)", columns, rows))
    unconverged = [r.name for r in results if r.power_converged is False]
    if unconverged:
        say(err_console, "warning:", f"power iteration did not reach its tolerance on {', '.join(unconverged)}; "
            "those values are lower estimates", "yellow")
    for path in (values, plot):
        if path is not None:
            err_console.print(f"wrote {path}")


_LABELS = {"exact": "exact", "f4": "F4", "fourier": "Fourier", "gram": "Gram", "gram-zero": "Gram 0-pad",
           "power": "0-pad"}


def _print_wide(console, renderable) -> None:
    """A terminal gets the table fitted to its width; a pipe or file gets it whole, however wide."""
    if console.is_terminal:
        console.print(renderable)
        return
    from rich.console import Console

    width = console.measure(renderable, options=console.options.update_width(10_000)).maximum
    Console(file=console.file, width=max(console.width, width), color_system=None, markup=False, emoji=False,
            highlight=False).print(renderable)


def _values_table(results, methods: tuple[str, ...], top_k: int | None) -> tuple[list[str], list[list]]:
    """Per layer: the exact spectrum's columns when it ran, then each other method's σmax / bound and, with exact,
    its ratio to the exact σmax."""
    has_exact = "exact" in methods
    others = [m for m in methods if m != "exact"]
    columns = ["layer", "kind", "input", "stride"]
    if has_exact:
        columns += ["σmax", "σmin", "count"]
    for m in others:
        columns.append("σmax 0-pad" if m == "power" else _LABELS[m])
        if has_exact:
            columns.append(f"{_LABELS[m]}/exact")
        if m == "power" and top_k is not None:
            columns.append(f"top {top_k} (0-pad)")
    rows = []
    for r in results:
        row = [r.name, r.kind, "×".join(map(str, r.input_size)), "×".join(map(str, r.stride))]
        if has_exact:
            row += [r.spectrum.sigma_max, r.spectrum.sigma_min, r.spectrum.count]
        for m in others:
            value = r.value(m)
            row.append("—" if value is None else value)
            if has_exact:
                ratio = r.ratio(m)
                row.append("—" if ratio is None else f"{ratio:.3f}")
            if m == "power" and top_k is not None:
                row.append("—" if r.power_top_k is None else ", ".join(f"{v:.4g}" for v in r.power_top_k))
        rows.append(row)
    return columns, rows


def _times_table(results, methods: tuple[str, ...]) -> tuple[list[str], list[list]]:
    """Wall time of each method on each layer, and the network's total."""
    columns = ["layer", *(_LABELS[m] for m in methods)]
    rows = [[r.name, *(f"{1e3 * r.seconds[m]:.1f}" if m in r.seconds else "—" for m in methods)] for r in results]
    rows.append(["total", *(f"{1e3 * sum(r.seconds.get(m, 0.0) for r in results):.1f}" for m in methods)])
    return columns, rows
