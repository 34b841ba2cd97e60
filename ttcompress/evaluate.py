"""One-call evaluation of a classifier: accuracy, calibration, corruption robustness, AutoAttack, Lipschitz,
certified robustness.

:func:`evaluate` returns a JSON-able document (only the metrics asked for are present; accuracies are fractions)::

    {"n": int, "accuracy": float, "ece": float,
     "cifar_c": {"source": "official" | "generated", "mean": float | None, "mean_extra": float | None,
                 "corruptions": {NAME: {"1": acc, ..., "5": acc}}},
     "autoattack": {"norm", "eps", "n", "version", "clean_accuracy", "robust_accuracy", "package"},
     "lipschitz": {"max", "mean", "radius"},
     "certified": {"norm": "L2", "radius", "lipschitz", "clean_accuracy", "certified_accuracy"}}

``certified`` is provable robust accuracy (:mod:`ttcompress.certify`): the share of images classified correctly with
a logit margin above ``√2·L·radius``, ``L`` the network's certified L2 Lipschitz bound (LipConvNet / SOC networks,
normalisation included).  A network without such a bound makes :func:`evaluate` fail with a
:class:`~ttcompress.errors.UserError` before anything is computed.

With ``out_dir`` it also writes ``eval.json``, ``reliability.png`` (when ECE is asked for) and ``cifar_c.png``
(when CIFAR-C is asked for).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import progress as _progress
from .data import ImageSet, check_compatible, load_cifar_c
from .certify import DEFAULT_RADIUS, certified_accuracy, network_lipschitz_bound
from .errors import DataError, UserError
from .outputs import atomic_write, write_text
from .metrics import accuracy, autoattack, ece, empirical_lipschitz, predict, reliability
from .progress import Progress

__all__ = ["evaluate", "METRICS", "write_report", "plot_reliability", "plot_cifar_c"]

METRICS = ("accuracy", "ece", "cifar-c", "autoattack", "lipschitz", "certified")
REPORT_FILES = ("eval.json", "reliability.png", "cifar_c.png")  # what write_report may write into its folder


def _normalise_metrics(metrics: Sequence[str] | str) -> list[str]:
    if isinstance(metrics, str):
        metrics = [m for m in metrics.split(",")]
    out: list[str] = []
    for m in metrics:
        key = str(m).strip().lower().replace("_", "-")
        if key == "cifarc":
            key = "cifar-c"
        if not key:
            continue
        if key not in METRICS:
            raise UserError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise UserError(f"no metric requested; choose from {', '.join(METRICS)}")
    return out


def _corruptions_module():
    return importlib.import_module("ttcompress.corruptions")


def _nchw(images_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(images_nhwc).transpose(0, 3, 1, 2)))


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _cifar_c(
    model: torch.nn.Module,
    data: ImageSet,
    *,
    n: int | None,
    batch_size: int,
    device,
    cifar_c_dir,
    severities: Sequence[int],
    names: Sequence[str] | None,
    seed: int,
    progress: Progress,
) -> dict:
    severities = tuple(int(s) for s in severities)
    if not severities or any(s not in (1, 2, 3, 4, 5) for s in severities):
        raise UserError(f"severities must be chosen from 1..5, got {list(severities)}")
    corr = _corruptions_module()
    standard, extra = set(corr.STANDARD), set(corr.EXTRA)
    table: dict[str, dict[str, float]] = {}

    if cifar_c_dir is not None:
        source = "official"
        sets = load_cifar_c(cifar_c_dir, names=names, severities=severities)
        with progress.task("CIFAR-C (official)", total=len(sets) * len(severities)) as advance:
            for name, per_sev in sets.items():
                table[name] = {}
                for s in severities:
                    imgs, labels = per_sev[s]
                    if n is not None:
                        imgs, labels = imgs[:n], labels[:n]
                    x = _nchw(imgs)
                    if tuple(x.shape[1:]) != data.image_shape:
                        raise DataError(
                            f"{cifar_c_dir}/{name}.npy has {tuple(x.shape[1:])} images but the model was checked on "
                            f"{data.image_shape}; use the CIFAR-C release matching the evaluation data"
                        )
                    y = torch.from_numpy(np.asarray(labels).astype(np.int64))
                    if int(y.min()) < 0 or int(y.max()) >= data.num_classes:
                        raise DataError(
                            f"{cifar_c_dir}/labels.npy has labels outside 0..{data.num_classes - 1}; "
                            "use the CIFAR-C release matching the evaluation data"
                        )
                    logits = predict(model, x, batch_size, device)
                    table[name][str(s)] = accuracy(logits, y)
                    advance(1, corruption=name, severity=s)
    else:
        source = "generated"
        chosen = list(corr.ALL) if names is None else list(names)
        unknown = [c for c in chosen if c not in set(corr.ALL)]
        if unknown:
            raise UserError(f"unknown corruption(s) {', '.join(unknown)}; choose from {', '.join(corr.ALL)}")
        if not chosen:
            raise UserError("no corruptions requested")
        subset = data.subset(n)
        clean_nhwc = subset.images.permute(0, 2, 3, 1).contiguous().numpy()
        with progress.task("CIFAR-C (generated)", total=len(chosen) * len(severities)) as advance:
            for name in chosen:
                table[name] = {}
                for s in severities:
                    corrupted = corr.corrupt(clean_nhwc, name, s, seed=seed)
                    corrupted = np.asarray(corrupted)
                    if corrupted.dtype != np.uint8 or corrupted.shape != clean_nhwc.shape:
                        raise RuntimeError(
                            f"corruption {name} returned {corrupted.dtype} {corrupted.shape}, "
                            f"expected uint8 {clean_nhwc.shape}"
                        )
                    logits = predict(model, _nchw(corrupted), batch_size, device)
                    table[name][str(s)] = accuracy(logits, subset.labels)
                    advance(1, corruption=name, severity=s)

    std_values = [v for name, row in table.items() if name in standard for v in row.values()]
    extra_values = [v for name, row in table.items() if name in extra for v in row.values()]
    return {
        "source": source,
        "mean": _mean_or_none(std_values),
        "mean_extra": _mean_or_none(extra_values),
        "corruptions": table,
    }


def evaluate(
    model: torch.nn.Module,
    data: ImageSet,
    *,
    metrics: Sequence[str] | str = ("accuracy",),
    n: int | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    cifar_c_dir: str | os.PathLike | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    corruptions: Sequence[str] | None = None,
    norm: str = "Linf",
    eps: float = 8 / 255,
    attack_version: str = "standard",
    radius: float = 0.5,
    cert_radius: float = DEFAULT_RADIUS,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> dict:
    """Evaluate ``model`` on the first ``n`` images of ``data`` (all when ``None``); see the module doc for the
    returned document.  ``cifar-c`` uses the official release in ``cifar_c_dir`` (the first ``n`` images of each
    severity block) or, without it, corrupts the evaluation images with :mod:`ttcompress.corruptions`
    (``corruptions`` names them, default all) seeded by ``seed``.  ``radius`` is the FGSM step of the empirical
    Lipschitz estimate, ``cert_radius`` the L2 radius of ``certified`` (default 36/255, as in the papers)."""
    wanted = _normalise_metrics(metrics)
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    if n is not None and n <= 0:
        raise UserError(f"n must be positive, got {n}")
    lipschitz = None
    if "certified" in wanted:
        if not cert_radius >= 0:
            raise UserError(f"the certified radius must be non-negative, got {cert_radius}")
        try:
            lipschitz = network_lipschitz_bound(model)
        except UserError as exc:  # no certified bound: say so before any work is done
            raise UserError(f"cannot certify robustness: {exc}") from None
    prog = _progress.ensure(progress)
    model = model.to(device)
    check_compatible(data, model, device)
    subset = data.subset(n)
    result: dict = {"n": len(subset)}

    logits = None
    if "accuracy" in wanted or "ece" in wanted or "certified" in wanted:
        logits = predict(model, subset, batch_size, device, progress=prog, description="clean accuracy")
        if "accuracy" in wanted:
            result["accuracy"] = accuracy(logits, subset.labels)
        if "ece" in wanted:
            result["ece"] = ece(logits, subset.labels)
        if "certified" in wanted:
            assert lipschitz is not None
            result["certified"] = {
                "norm": "L2",
                "radius": float(cert_radius),
                "lipschitz": float(lipschitz),
                "clean_accuracy": accuracy(logits, subset.labels),
                "certified_accuracy": certified_accuracy(logits, subset.labels, lipschitz, cert_radius),
            }

    if "cifar-c" in wanted:
        result["cifar_c"] = _cifar_c(
            model,
            data,
            n=n,
            batch_size=batch_size,
            device=device,
            cifar_c_dir=cifar_c_dir,
            severities=severities,
            names=corruptions,
            seed=seed,
            progress=prog,
        )

    if "autoattack" in wanted:
        result["autoattack"] = autoattack(
            model,
            subset,
            norm=norm,
            eps=eps,
            version=attack_version,
            seed=seed,
            batch_size=batch_size,
            device=device,
            progress=prog,
        )

    if "lipschitz" in wanted:
        result["lipschitz"] = empirical_lipschitz(
            model, subset, radius=radius, batch_size=batch_size, device=device, seed=seed, progress=prog
        )

    if out_dir is not None:
        write_report(
            result,
            out_dir,
            reliability_data=reliability(logits, subset.labels) if "ece" in wanted else None,
        )
    return result


# ----------------------------------------------------------------------------------------------------------------
# report files
# ----------------------------------------------------------------------------------------------------------------


def write_report(result: dict, out_dir: str | os.PathLike, reliability_data: dict | None = None) -> list[Path]:
    """Write ``eval.json`` and the plots for ``result`` into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {out} ({exc.strerror or exc})") from None
    written = [write_text(out / "eval.json", json.dumps(result, indent=2) + "\n")]
    if reliability_data is not None:
        written.append(plot_reliability(reliability_data, out / "reliability.png", ece_value=result.get("ece")))
    if "cifar_c" in result:
        try:
            extra_names = tuple(_corruptions_module().EXTRA)
        except ImportError:
            extra_names = ()
        written.append(
            plot_cifar_c(
                result["cifar_c"], out / "cifar_c.png", clean_accuracy=result.get("accuracy"), extra_names=extra_names
            )
        )
    return written


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_reliability(rel: dict, path: str | os.PathLike, ece_value: float | None = None) -> Path:
    """Reliability diagram (accuracy vs confidence per bin, with the gap to the diagonal) and bin occupancy."""
    plt = _pyplot()
    lower, upper = np.asarray(rel["lower"]), np.asarray(rel["upper"])
    width = upper - lower
    centers = (lower + upper) / 2
    count = np.asarray(rel["count"])
    acc, conf = np.asarray(rel["accuracy"]), np.asarray(rel["confidence"])
    filled = count > 0
    fig, (ax, axh) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    ax.bar(lower[filled], acc[filled], width=width[filled], align="edge", color="tab:blue", edgecolor="black",
           linewidth=0.6, label="accuracy")
    gap_lo = np.minimum(acc, conf)[filled]
    ax.bar(lower[filled], np.abs(conf - acc)[filled], bottom=gap_lo, width=width[filled], align="edge",
           facecolor=(1, 0, 0, 0.15), edgecolor="tab:red", hatch="//", linewidth=0.8,
           label="gap to mean confidence")
    ax.plot(centers[filled], conf[filled], "_", color="tab:red", markersize=12, markeredgewidth=2,
            label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    title = "Reliability diagram"
    if ece_value is not None:
        title += f" (ECE = {100 * ece_value:.2f}%)"
    ax.set_title(title)
    ax.legend(loc="upper left")
    axh.bar(centers, np.asarray(rel["share"]), width=width * 0.9, color="tab:gray")
    axh.set_xlabel("confidence (top-1 probability)")
    axh.set_ylabel("share of images")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return Path(path)


def plot_cifar_c(
    doc: dict,
    path: str | os.PathLike,
    clean_accuracy: float | None = None,
    extra_names: Sequence[str] | None = None,
) -> Path:
    """Grouped bars: accuracy per corruption (x axis) and severity (colour); the extra corruptions, when they come
    after the standard ones, are set apart by a dotted line."""
    plt = _pyplot()
    table = doc["corruptions"]
    names = list(table)
    sevs = sorted({int(s) for row in table.values() for s in row})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) + 2.0), 4.8), constrained_layout=True)
    width = 0.8 / max(1, len(sevs))
    cmap = plt.get_cmap("viridis")
    xs = np.arange(len(names))
    for k, s in enumerate(sevs):
        vals = [100 * table[nm].get(str(s), np.nan) for nm in names]
        color = cmap(k / max(1, len(sevs) - 1)) if len(sevs) > 1 else cmap(0.3)
        ax.bar(xs - 0.4 + (k + 0.5) * width, vals, width=width, color=color, label=f"severity {s}")
    if clean_accuracy is not None:
        ax.axhline(100 * clean_accuracy, color="black", linestyle="--", linewidth=1, label="clean")
    extra = set(extra_names or ())
    first_extra = next((i for i, nm in enumerate(names) if nm in extra), None)
    if first_extra is not None and first_extra > 0:
        ax.axvline(first_extra - 0.5, color="gray", linestyle=":", linewidth=1)
        ax.text(first_extra - 0.45, 97, "extra", ha="left", va="top", color="gray", fontsize="small")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    subtitle = []
    if doc.get("mean") is not None:
        subtitle.append(f"mean {100 * doc['mean']:.1f}%")
    if doc.get("mean_extra") is not None:
        subtitle.append(f"extra mean {100 * doc['mean_extra']:.1f}%")
    title = f"Accuracy under corruption ({doc.get('source', '')})"
    if subtitle:
        title += ": " + ", ".join(subtitle)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncol=min(6, len(sevs) + 1), loc="upper center", bbox_to_anchor=(0.5, -0.35))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return Path(path)
