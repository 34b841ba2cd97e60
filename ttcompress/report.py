"""Files a person reads: per-layer singular values (.npz) and spectrum plots (.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ttcompress.checkpoint import atomic_write
from ttcompress.spectral.network import LayerSpectrum


def write_values(layers: Sequence[LayerSpectrum], path: str | Path) -> Path:
    arrays = {layer.name: layer.values.numpy() for layer in layers}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    return atomic_write(path, write)


def plot_spectra(layers: Sequence[LayerSpectrum], path: str | Path, title: str = "",
                 compare: Sequence[LayerSpectrum] | None = None, labels: tuple[str, str] = ("before", "after")) -> Path:
    """Left: σmax per layer (bars; ``compare`` drawn beside). Right: each layer's sorted spectrum on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    target = Path(path)
    atomic_write(target, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return target
