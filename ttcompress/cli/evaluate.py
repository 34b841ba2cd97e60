"""`ttcompress eval`."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Optional

import typer

from ttcompress.cli import app, handles_errors
from ttcompress.cli.common import ArchOpt, JsonOpt, KeyPrefixOpt, MeanOpt, StdOpt, TrustOpt, arch_file, load_model
from ttcompress.errors import UserError
from ttcompress.evaluate import METRICS
from ttcompress.metrics import ATTACK_NORMS, ATTACK_VERSIONS
from ttcompress.outputs import guard


def parse_eps(text: str, flag: str = "--eps") -> float:
    """``8/255``, ``0.03`` or ``0``."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{flag} must be a number or a fraction such as 8/255, got {text!r}") from None
    if value < 0:
        raise UserError(f"{flag} must be non-negative, got {text}")
    return value


def parse_ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {text!r}") from None


def render_eval(result: dict, title: str) -> None:
    from ttcompress.ui import out_console, table

    rows: list[list] = [["images", str(result["n"])]]
    if "accuracy" in result:
        rows.append(["accuracy", f"{100 * result['accuracy']:.2f} %"])
    if "ece" in result:
        rows.append(["ECE (15 bins)", f"{100 * result['ece']:.2f} %"])
    if "cifar_c" in result:
        c = result["cifar_c"]
        if c.get("mean") is not None:
            rows.append([f"CIFAR-10-C mean ({c['source']})", f"{100 * c['mean']:.2f} %"])
        if c.get("mean_extra") is not None:
            rows.append(["CIFAR-10-C extra mean", f"{100 * c['mean_extra']:.2f} %"])
    if "autoattack" in result:
        a = result["autoattack"]
        rows.append([f"AutoAttack {a['version']} {a['norm']} eps={a['eps']:.4g} (n={a['n']})",
                     f"{100 * a['robust_accuracy']:.2f} % (clean {100 * a['clean_accuracy']:.2f} %)"])
    if "lipschitz" in result:
        lip = result["lipschitz"]
        rows.append([f"empirical Lipschitz (radius {lip['radius']})", f"max {lip['max']:.3f}, mean {lip['mean']:.3f}"])
    if "certified" in result:
        cert = result["certified"]
        rows.append([f"certified {cert['norm']} radius {cert['radius']:.4g} (Lipschitz ≤ {cert['lipschitz']:.4g})",
                     f"{100 * cert['certified_accuracy']:.2f} % (clean {100 * cert['clean_accuracy']:.2f} %)"])
    out_console.print(table(title, ["metric", "value"], rows))
    if "cifar_c" in result:
        corr = result["cifar_c"]["corruptions"]
        sev = sorted({s for per in corr.values() for s in per}, key=int)
        crows = [[name] + [f"{100 * per[s]:.1f}" if s in per else "" for s in sev] for name, per in corr.items()]
        out_console.print(table("CIFAR-10-C accuracy (%) per severity", ["corruption"] + sev, crows))


@app.command("eval")
@handles_errors
def eval_command(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="Checkpoint to evaluate."),
    data: str = typer.Option(..., "--data", help="cifar10, cifar100, a .npz file or an ImageFolder directory."),
    metrics: str = typer.Option("accuracy,ece", "--metrics", help="Comma-separated: " + ", ".join(METRICS) + "."),
    split: str = typer.Option("test", "--split", help="Split to evaluate: test or train."),
    n: Optional[int] = typer.Option(None, "--n", help="Evaluate the first N images (default: all)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Batch size."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where torchvision data sets live."),
    cifar_c: Optional[Path] = typer.Option(None, "--cifar-c", help="Official CIFAR-10-C directory (NAME.npy + "
                                           "labels.npy); without it the corruptions are generated."),
    severities: str = typer.Option("1,2,3,4,5", "--severities", help="CIFAR-C severities, e.g. 1,3,5."),
    corruptions: Optional[str] = typer.Option(None, "--corruptions", help="CIFAR-C corruption names, "
                                              "comma-separated (default: all present / all 19)."),
    norm: str = typer.Option("Linf", "--norm", help="AutoAttack norm: " + ", ".join(ATTACK_NORMS) + "."),
    eps: str = typer.Option("8/255", "--eps", help="AutoAttack radius, e.g. 8/255 or 0.5."),
    attack_version: str = typer.Option("standard", "--attack-version", help="AutoAttack version: "
                                       + "|".join(ATTACK_VERSIONS) + "."),
    radius: float = typer.Option(0.5, "--radius", help="L2 radius of the FGSM step for the Lipschitz estimate."),
    cert_radius: str = typer.Option("36/255", "--cert-radius", help="L2 radius of the certified robust accuracy "
                                    "(--metrics certified; LipConvNet / SOC networks), e.g. 36/255 or 0.5."),
    seed: int = typer.Option(0, "--seed", help="Seed for generated corruptions and attacks."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for eval.json and plots."),
    arch: Optional[str] = ArchOpt,
    mean: Optional[str] = MeanOpt,
    std: Optional[str] = StdOpt,
    trust_pickle: bool = TrustOpt,
    key_prefix: Optional[str] = KeyPrefixOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Accuracy, calibration (ECE), CIFAR-10-C, AutoAttack, empirical Lipschitz and certified robust accuracy.

    Example: ttcompress eval r20-tt.safetensors --data cifar10-sample.npz --metrics accuracy,ece,cifar-c,autoattack --n 256

    Example: ttcompress eval lipconvnet.pt --arch lipconvnet-5 --data cifar10 --metrics accuracy,certified
    """
    from ttcompress.evaluate import REPORT_FILES

    if norm not in ATTACK_NORMS:
        raise UserError(f"--norm must be one of {', '.join(ATTACK_NORMS)}, got {norm!r}")
    if attack_version not in ATTACK_VERSIONS:
        raise UserError(f"--attack-version must be one of {', '.join(ATTACK_VERSIONS)}, got {attack_version!r}")
    if not radius > 0 or not math.isfinite(radius):
        raise UserError(f"--radius must be a positive finite number, got {radius}")
    eps_value = parse_eps(eps)
    cert_value = parse_eps(cert_radius, "--cert-radius")
    sev = parse_ints(severities, "--severities")
    if not sev or any(s not in (1, 2, 3, 4, 5) for s in sev):
        raise UserError(f"--severities must be chosen from 1..5, got {severities!r}")
    names = [c for c in corruptions.replace(" ", "").split(",") if c] if corruptions else None
    if names is not None:
        from ttcompress.corruptions import ALL

        unknown = [c for c in names if c not in ALL]
        if unknown and cifar_c is None:
            raise UserError(f"unknown corruption(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    with guard(folders=[("--out", out, REPORT_FILES)],
               inputs=[checkpoint, arch_file(arch), cifar_c, data if Path(data).exists() else None]):
        _evaluate(checkpoint, data, metrics, split, n, batch_size, device, data_root, cifar_c, sev, names, norm,
                  eps_value, attack_version, radius, cert_value, seed, out, arch, mean, std, trust_pickle, as_json,
                  key_prefix)


def _evaluate(checkpoint, data, metrics, split, n, batch_size, device, data_root, cifar_c, sev, names, norm, eps_value,
              attack_version, radius, cert_value, seed, out, arch, mean, std, trust_pickle, as_json,
              key_prefix) -> None:
    from ttcompress.data import check_compatible, load_split
    from ttcompress.device import pick_device
    from ttcompress.evaluate import evaluate
    from ttcompress.ui import RichProgress, err_console, print_json

    torch_device = pick_device(device)
    loaded = load_model(checkpoint, arch, mean, std, trust_pickle, key_prefix=key_prefix)
    images = load_split(data, split, data_root)
    model = loaded.model.to(torch_device)
    check_compatible(images, model, torch_device)
    result = evaluate(
        model, images, metrics=[m for m in metrics.replace(" ", "").split(",") if m], n=n, batch_size=batch_size,
        device=torch_device, cifar_c_dir=cifar_c, severities=sev, corruptions=names, norm=norm, eps=eps_value,
        attack_version=attack_version, radius=radius, cert_radius=cert_value, seed=seed, out_dir=out,
        progress=RichProgress(),
    )
    if as_json:
        print_json(result)
    else:
        render_eval(result, f"eval {checkpoint.name} on {data} ({split})")
    if out is not None:
        err_console.print(f"wrote {out}/eval.json and plots")
