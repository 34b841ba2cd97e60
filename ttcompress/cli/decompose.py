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
    skip: List[str] = typer.Option([], "--skip", help="Glob of layer names to keep dense (repeatable)."),
    arch: Optional[str] = ArchOpt,
    mean: Optional[str] = MeanOpt,
    std: Optional[str] = StdOpt,
    trust_pickle: bool = TrustOpt,
    key_prefix: Optional[str] = KeyPrefixOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Replace every conv by a TT layer (1×1 → k×k core → 1×1) via truncated SVD.

    Example: ttcompress decompose resnet20.th --arch resnet20 --rank 8 -o r20-tt.safetensors
    """
    from ttcompress import checkpoint as ck
    from ttcompress.tt import decompose as tt_decompose
    from ttcompress.ui import err_console, out_console, print_json, table

    if (rank is None) == (energy is None):
        raise UserError("give exactly one of --rank R or --energy E")
    with guard([("-o", out)], inputs=[checkpoint, arch_file(arch)]):
        loaded = load_model(checkpoint, arch, mean, std, trust_pickle, key_prefix=key_prefix)
        report = tt_decompose(loaded.net, rank=rank, energy=energy, skip=skip)
        ck.save(loaded, out, ck.history_entry("decompose", **ck.source_args(checkpoint, arch), rank=rank,
                                              energy=energy, skip=list(skip)))
    if as_json:
        print_json(report.to_json())
        return
    rows = [
        [l.name, "×".join(map(str, l.shape)), "dense: " + (l.reason or "") if l.ranks is None or l.reason else
         f"{l.ranks[0]}, {l.ranks[1]}", f"{l.rel_error:.4f}", l.params_before, l.params_after]
        for l in report.layers
    ]
    out_console.print(table(f"decompose {checkpoint.name}", ["layer", "shape", "ranks", "rel. error",
                                                              "params before", "params after"], rows))
    out_console.print(f"parameters {report.params_before:,} → {report.params_after:,} "
                      f"(compression ×{report.compression:.2f})")
    err_console.print(f"wrote {out}")


