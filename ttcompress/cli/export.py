"""`ttcompress export`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import typer

from ttcompress.cli import app, handles_errors
from ttcompress.cli.common import ArchOpt, JsonOpt, KeyPrefixOpt, MeanOpt, StdOpt, TrustOpt, arch_file, load_model
from ttcompress.errors import UserError
from ttcompress.outputs import guard


@app.command("export")
@handles_errors
def export_command(
    checkpoint: Path = typer.Argument(..., metavar="MODEL", help="Model to export (.safetensors from ttcompress, "
                                      "or any checkpoint with --arch)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output file: .safetensors or .pt (state-dict), .pt "
                             "(torchscript), .onnx (onnx)."),
    fmt: str = typer.Option(..., "--format", "-f", help="state-dict, torchscript or onnx."),
    dense: bool = typer.Option(False, "--dense", help="Fold every TT layer into one dense conv (exact composition); "
                               "default: keep it as three convs NAME.0/NAME.1/NAME.2."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset."),
    data: Optional[str] = typer.Option(None, "--data", help="Also compare on these images (cifar10, a .npz file, an "
                                       "ImageFolder): accuracy of ours and of the exported file."),
    n: Optional[int] = typer.Option(None, "--n", help="With --data: the first N test images (default: all)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where torchvision data sets live."),
    input_size: Optional[Tuple[int, int]] = typer.Option(None, "--input-size", help="Input H W to export for "
                                                         "(default from metadata or the architecture).",
                                                         show_default=False),
    arch: Optional[str] = ArchOpt,
    mean: Optional[str] = MeanOpt,
    std: Optional[str] = StdOpt,
    trust_pickle: bool = TrustOpt,
    key_prefix: Optional[str] = KeyPrefixOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write the model so it runs without ttcompress — a state dict with the architecture's own keys, TorchScript or
    ONNX (normalisation inside) — then read the file back and check it reproduces the model (max abs difference on
    random inputs, and accuracy on --data); nothing is written above 1e-4 of the largest logit.

    Example: ttcompress export r20-ft.safetensors -o r20.onnx --format onnx --data cifar10-sample.npz

    Example: ttcompress export r20-ft.safetensors -o r20-dense.pt --format state-dict --dense
    """
    from ttcompress.export import export
    from ttcompress.ui import err_console, out_console, print_json, table

    if n is not None and data is None:
        raise UserError("--n needs --data")
    with guard([("-o", out)], inputs=[checkpoint, arch_file(arch), data if data and Path(data).exists() else None]):
        images = None
        if data is not None:
            from ttcompress.data import load_split

            images = load_split(data, "test", data_root).subset(n)
        loaded = load_model(checkpoint, arch, mean, std, trust_pickle, list(input_size) if input_size else None,
                            key_prefix)
        report = export(loaded, out, fmt, dense=dense, opset=opset, data=images, inputs=[checkpoint])
    if as_json:
        print_json(report.to_json())
        err_console.print(f"wrote {report.path}")
        return
    rows = []
    for c in report.checks:
        acc = "" if c.accuracy_ours is None else f"{100 * c.accuracy_ours:.2f} % / {100 * c.accuracy_exported:.2f} %"
        rows.append([Path(c.inputs).name, c.n, f"{c.max_abs_diff:.3g}", f"{c.rel_diff:.3g}", acc])
    out_console.print(table(f"export {checkpoint.name} → {report.format}{' (dense)' if report.dense else ''}",
                            ["inputs", "images", "max |Δ|", "relative", "accuracy ours / exported"], rows))
    info = report.statement
    out_console.print(f"TT layers: {info['layout']['tt_layers']}")
    norm = info["normalization"]
    where = "inside the exported model" if info["normalization_inside"] else "NOT in the state dict: apply it yourself"
    stats = "none" if norm is None else f"mean {norm['mean']}, std {norm['std']}"
    out_console.print(f"normalisation: {stats} ({where})")
    bound = info["bound"]
    if bound is not None and bound["holds"] is None:
        out_console.print(f"bound: {bound['measure']} ≤ {bound['bound']:g} (finetune), not re-measured here")
    elif bound is not None:
        verdict = "holds" if bound["holds"] else "DOES NOT hold"
        flag = bound["flag"].replace("_", "-")
        out_console.print(f"bound: {bound['measure']} ≤ {bound['bound']:g} (finetune --{flag}) {verdict}: max "
                          f"{bound['max_sigma']:.6g} over {bound['convs']} convs")
    if report.opset is not None:
        out_console.print(f"ONNX opset {report.opset}, dynamic batch axis, input 'input' (N×"
                          f"{'×'.join(map(str, info['input_size']))} in [0, 1]), output 'logits'")
    err_console.print(f"wrote {report.path}")
