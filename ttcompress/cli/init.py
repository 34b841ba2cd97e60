"""`ttcompress init`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ttcompress.cli import app, handles_errors
from ttcompress.cli.common import JsonOpt, MeanOpt, StdOpt, arch_file, parse_floats
from ttcompress.outputs import guard


@app.command()
@handles_errors
def init(
    arch: str = typer.Argument(..., metavar="ARCH", help="Architecture: a registry name (e.g. lipconvnet-20, "
                               "wrn16-10), torchvision:NAME or path/to/file.py:Class."),
    out: Path = typer.Option(..., "-o", "--out", help="Output .safetensors file."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random initialisation."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Classifier outputs (default: the "
                                              "architecture's, e.g. 10).", show_default=False),
    mean: Optional[str] = MeanOpt,
    std: Optional[str] = StdOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write a freshly initialised network, to train from scratch with `finetune`.

    Example: ttcompress init lipconvnet-20-tt128 -o lip20tt.safetensors && ttcompress finetune lip20tt.safetensors
    --recipe lipconvnet20-soctt-128 --data cifar10 -o lip20tt-trained.safetensors
    """
    from ttcompress import checkpoint as ck
    from ttcompress.ui import err_console, out_console, print_json

    path = out
    with guard([("-o", out)], inputs=[arch_file(arch)]):
        loaded = ck.initialize(arch, seed=seed, num_classes=num_classes, mean=parse_floats(mean, "--mean"),
                               std=parse_floats(std, "--std"))
        ck.save(loaded, path, ck.history_entry("init", arch=arch, seed=seed, num_classes=num_classes))
    params = sum(p.numel() for p in loaded.net.parameters())
    if as_json:
        print_json({"arch": arch, "seed": seed, "num_classes": loaded.meta.num_classes, "params": params,
                    "input_size": loaded.meta.input_size, "tt_ranks": loaded.meta.tt_ranks, "out": str(path)})
    else:
        out_console.print(f"{arch}: {params:,} parameters, {loaded.meta.num_classes} classes, input "
                          f"{'×'.join(map(str, loaded.meta.input_size))}, seed {seed}")
    err_console.print(f"wrote {path}")
