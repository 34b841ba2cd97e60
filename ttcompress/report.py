"""What a person reads: per-layer singular values (.npz), spectrum and sensitivity plots (.png), the decompose
report (parameters, MACs, target, latency)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ttcompress.outputs import atomic_write
from ttcompress.tt import DecomposeReport

if TYPE_CHECKING:
    from ttcompress.sensitivity import SensitivityReport
    from ttcompress.spectral.network import LayerSpectrum


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: str | Path) -> Path:
    plt = _pyplot()
    target = Path(path)
    atomic_write(target, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return target


def write_values(layers: Sequence[LayerSpectrum], path: str | Path) -> Path:
    arrays = {layer.name: layer.values.numpy() for layer in layers}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    return atomic_write(path, write)


def plot_spectra(layers: Sequence[LayerSpectrum], path: str | Path, title: str = "",
                 compare: Sequence[LayerSpectrum] | None = None, labels: tuple[str, str] = ("before", "after")) -> Path:
    """Left: σmax per layer (bars; ``compare`` drawn beside). Right: each layer's sorted spectrum on a log axis."""
    plt = _pyplot()
    fig, (ax_bar, ax_sp) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1.2, 1]})
    names = [l.name for l in layers]
    x = np.arange(len(layers))
    if compare is not None:
        ref = {l.name: l.sigma_max for l in compare}
        ax_bar.bar(x - 0.2, [ref.get(n, np.nan) for n in names], 0.4, label=labels[0], color="#9aa5b1")
        ax_bar.bar(x + 0.2, [l.sigma_max for l in layers], 0.4, label=labels[1], color="#d1495b")
        ax_bar.legend()
    else:
        colors = ["#d1495b" if l.kind == "tt" else "#30638e" for l in layers]
        ax_bar.bar(x, [l.sigma_max for l in layers], color=colors)
        from matplotlib.patches import Patch

        ax_bar.legend(handles=[Patch(color="#30638e", label="dense conv"), Patch(color="#d1495b", label="TT conv")])
    ax_bar.set_xticks(x, names, rotation=75, fontsize=7)
    ax_bar.set_ylabel("largest singular value σmax")
    ax_bar.set_title("σmax per layer (exact, periodic)")
    ax_bar.grid(axis="y", alpha=0.3)

    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        v = layer.values.numpy()
        v = v[v > 1e-6 * v[0]]  # exact zeros (rank-deficient layers) come out at rounding level: leave them out
        if v.size:
            ax_sp.semilogy(np.linspace(0, 1, v.size), v, color=cmap(i / max(len(layers) - 1, 1)), lw=1)
    ax_sp.set_xlabel("singular value index (fraction of the layer's count)")
    ax_sp.set_ylabel("singular value (log)")
    ax_sp.set_title("sorted spectra, first layer dark → last layer light")
    ax_sp.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_sensitivity(report: SensitivityReport, path: str | Path, title: str = "") -> Path:
    """Accuracy drop (percentage points, against the dense network) vs rank, one line per layer; ranks chosen per
    layer are plotted at r1."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    names = list(dict.fromkeys(r.layer for r in report.rows))
    cmap = plt.get_cmap("viridis")
    for i, name in enumerate(names):
        rows = sorted((r for r in report.rows if r.layer == name), key=lambda r: r.ranks[0])
        x = [r.rank if r.rank is not None else r.ranks[0] for r in rows]
        ax.plot(x, [100 * (report.accuracy - r.accuracy) for r in rows], marker="o", ms=3, lw=1,
                color=cmap(i / max(len(names) - 1, 1)), label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("TT rank (only this layer decomposed)")
    ax.set_ylabel(f"accuracy drop (points; dense {100 * report.accuracy:.1f} %, n = {report.n})")
    ax.set_title(title or "sensitivity per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if len(names) > 12 else 1, loc="upper right")
    fig.tight_layout()
    return _save_png(fig, path)


# --- decompose -----------------------------------------------------------------------------------------------------

@dataclass
class CompressionReport:
    """What ``ttcompress decompose`` did: the per-layer decomposition plus MACs, the target and measured latency."""

    decomposition: DecomposeReport
    layer_macs_before: dict[str, int]  # every conv, TT and linear layer the forward pass reaches
    layer_macs_after: dict[str, int]
    target: dict | None = None  # what was asked ({"metric", "ratio", "max_rank", "calibrate", ...}) or None
    calibrate: dict | None = None  # the calibration images ({"source", "n", "data_aware", "batchnorm"}) or None
    layer_latency: dict[str, tuple[float | None, float | None]] | None = None  # (dense ms, TT ms)
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None

    @property
    def macs_before(self) -> int:
        return sum(self.layer_macs_before.values())

    @property
    def macs_after(self) -> int:
        return sum(self.layer_macs_after.values())

    @property
    def macs_ratio(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    def to_json(self) -> dict:
        doc = self.decomposition.to_json()
        for layer in doc["layers"]:
            layer["macs_before"] = self.layer_macs_before.get(layer["name"], 0)
            layer["macs_after"] = self.layer_macs_after.get(layer["name"], 0)
            if self.layer_latency is not None:
                dense, tt = self.layer_latency.get(layer["name"], (None, None))
                layer["latency_dense_ms"], layer["latency_tt_ms"] = dense, tt
        doc.update(macs_before=self.macs_before, macs_after=self.macs_after, macs_ratio=self.macs_ratio,
                   target=self.target, calibrate=self.calibrate)
        if self.layer_latency is not None:
            doc.update(latency_before_ms=self.latency_before_ms, latency_after_ms=self.latency_after_ms)
        return doc
