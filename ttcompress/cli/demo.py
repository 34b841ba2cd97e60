"""`ttcompress demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ttcompress.cli import app, handles_errors
from ttcompress.cli.common import JsonOpt
from ttcompress.errors import UserError


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


@app.command()
@handles_errors
def demo(
    out: Path = typer.Option(Path("ttcompress-demo"), "--out", help="Folder for every artefact."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Finetuning steps on the embedded images "
                                        "(default: the demo's 100)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="TT rank (default 64 for ResNet-18, 8 for ResNet-20)."),
    clip_to: float = typer.Option(1.0, "--clip-to", help="Clip every conv's singular values at this bound."),
    attack_images: int = typer.Option(16, "--attack-images", help="Images for AutoAttack (slow on CPU)."),
    as_json: bool = JsonOpt,
) -> None:
    """Run the whole pipeline on an embedded real model and real CIFAR-10 images, and show what the tool does.

    Example: ttcompress demo --out demo-out
    """
    from ttcompress.demo import DemoSettings, run_demo
    from ttcompress.ui import RichProgress, err_console, out_console, print_json, say, table

    if any(v is not None and v <= 0 for v in (steps, rank)) or attack_images <= 0 or not 0 < clip_to < float("inf"):
        raise UserError("--steps, --rank, --clip-to and --attack-images must be positive (and finite)")
    settings = DemoSettings(out_dir=out, device=device, rank=rank, clip_to=clip_to, attack_images=attack_images,
                            **({} if steps is None else {"steps": steps}))
    tell = (lambda m: None) if as_json else (lambda m: say(err_console, "•", m, "bold cyan"))
    result = run_demo(settings, progress=RichProgress(), say=tell)
    if as_json:
        print_json(result.to_json())
        return

    before = {l["name"]: l for l in result.spectrum_before}
    rows = [[l["name"], f"{before[l['name']]['sigma_max']:.3f}" if l["name"] in before else "",
             f"{l['sigma_max']:.3f}", l["kind"]] for l in result.spectrum_after]
    out_console.print(table("exact σmax per layer", ["layer", "original", f"after clip to {clip_to:g}", "kind"], rows))

    def col(doc: dict) -> list[str]:
        c = doc.get("cifar_c", {})
        a = doc.get("autoattack")
        return [_pct(doc.get("accuracy")), _pct(doc.get("ece")), _pct(c.get("mean")),
                _pct(a["robust_accuracy"]) if a else "–"]

    dec = result.decompose
    ft = result.finetune
    names = ["accuracy", "ECE", f"CIFAR-10-C ({len(settings.corruptions)} corruptions)",
             f"AutoAttack 8/255 (n={attack_images})"]
    o, d, r = col(result.eval_original), col(result.eval_decomposed), col(result.eval_result)
    rows = [[names[i], o[i], d[i], r[i]] for i in range(4)]
    rows.insert(0, ["parameters", f"{dec['params_before']:,}", f"{dec['params_after']:,}", f"{dec['params_after']:,}"])
    ratios = [b["sigma_after"] / b["bound"] for b in ft["bounds"] if b["kind"] in ("conv", "tt")]
    ratio = max(ratios) if ratios else None
    rows.append(["max σmax / bound", "", "", "–" if ratio is None else f"{ratio:.3f}"])
    out_console.print(table(f"{result.model_description}, {result.eval_original['n']} embedded test images",
                            ["", "original", f"TT rank {result.rank}", f"+{settings.steps} steps, clip {clip_to:g}"],
                            rows))
    out_console.print(f"CIFAR-10-C: {', '.join(settings.corruptions)} at severity "
                      f"{','.join(map(str, settings.severities))}")
    taught = " distilled from the original," if ft["time_teacher"] else ""
    out_console.print(f"finetune: {ft['steps']} steps in {ft['time_training'] + ft['time_control']:.1f} s,{taught} "
                      f"{100 * ft['control_share']:.0f} % of it in exact clipping")
    out_console.print("\nartefacts", style="bold")
    for key, path in result.artefacts.items():
        out_console.print(f"  {key:15s} {path}", soft_wrap=True, highlight=False)
    arch = result.arch
    out_console.print("\nthe same on your own checkpoint", style="bold")
    out_console.print(
        f"  ttcompress decompose my-model.pt --arch {arch} --rank {result.rank} -o my-tt.safetensors\n"
        "  ttcompress spectrum my-tt.safetensors --plot my-spectrum.png\n"
        f"  ttcompress finetune my-tt.safetensors --data cifar10 --epochs 10 --teacher auto --lr 0.001 "
        f"--clip-to {clip_to:g} --clip-every 5 --final-reprojections 0 -o my-ft.safetensors\n"
        "  ttcompress eval my-ft.safetensors --data cifar10 --metrics accuracy,ece,cifar-c,autoattack --n 1000",
        soft_wrap=True,
    )
