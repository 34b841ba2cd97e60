#!/usr/bin/env python
"""σmax of every conv of the shared ResNet-20 by each spectrum method, with its time per layer.

Run from the repository root::

    python benchmarks/spectrum_methods.py                  # ~1 min on one CPU thread
    python benchmarks/spectrum_methods.py --repeats 3 --checkpoint path/to/resnet20.th

For every conv layer, on the input size it sees in a 32×32 forward pass, it runs each method of
``ttcompress.spectral.methods`` (``exact`` periodic spectrum, ``f4`` and ``fourier`` kernel bounds, ``power``:
PowerQR on the zero-padded layer as it runs, tol 1e-4) ``--repeats`` times on one thread and keeps the median wall
time; the values come from the library exactly as ``ttcompress spectrum --all-methods`` reports them (exact and
bounds in float32, power in float64).

A second, small part compares the two operators on random layers with dense matrices built from basis vectors: how
often the zero-padded σmax exceeds the periodic one at small input sizes.

Results go to ``benchmarks/results/spectrum_methods.json``; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # reference.py: dense operators from basis vectors

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ttcompress.checkpoint import load  # noqa: E402
from ttcompress.spectral.methods import METHODS, layer_methods  # noqa: E402
from ttcompress.spectral.network import layer_input_sizes  # noqa: E402
from ttcompress.tt import conv_layers  # noqa: E402

DEFAULT_CKPT = ROOT.parent / "shared" / "models" / "resnet20-12fca82f.th"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "spectrum_methods.json"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def measure_network(checkpoint: Path, repeats: int) -> list[dict]:
    loaded = load(checkpoint, arch="resnet20")
    sizes = layer_input_sizes(loaded.model, (3, 32, 32), loaded.net)
    rows = []
    for name, layer in conv_layers(loaded.net):
        row: dict = {"name": name, "input_size": list(sizes[name]), "stride": list(layer.stride),
                     "channels": [layer.in_channels, layer.out_channels], "seconds": {}}
        for method in METHODS:
            times = []
            for _ in range(repeats):
                got = layer_methods(name, layer, sizes[name], [method])
                times.append(got.seconds[method])
            row["seconds"][method] = statistics.median(times)
            if method == "exact":
                row["exact"] = got.sigma_max
            elif method == "power":
                row["power_zero_padding"] = got.power_zero_padding
                row["power_converged"] = got.power_converged
            else:
                row[f"{method}_bound"] = got.value(method)
        for key, method in (("f4", "f4_bound"), ("fourier", "fourier_bound"), ("power", "power_zero_padding")):
            row[f"{key}_ratio"] = row[method] / row["exact"]
        rows.append(row)
        print(f"  {name:16s} " + "  ".join(f"{m} {1e3 * row['seconds'][m]:7.1f} ms" for m in METHODS), flush=True)
    return rows


def survey(trials: int) -> list[dict]:
    """Zero-padded ('same' padding) against periodic σmax on random small layers, from dense matrices."""
    from reference import dense_singular_values, operator_matrix, periodic_matrix

    gen = torch.Generator().manual_seed(0)
    out = []
    for cout, cin, k, n, s in [(2, 2, 3, 3, 1), (2, 2, 3, 5, 1), (2, 2, 3, 4, 1), (8, 8, 3, 4, 1), (3, 2, 3, 6, 2),
                               (4, 4, 3, 4, 2), (8, 8, 3, 6, 1)]:
        ratios = []
        for _ in range(trials):
            w = torch.randn(cout, cin, k, k, generator=gen, dtype=torch.float64)
            periodic = float(dense_singular_values(periodic_matrix(w, (n, n), (s, s)))[0])
            zero = float(dense_singular_values(operator_matrix(
                lambda x, w=w, s=s, k=k: F.conv2d(x, w, stride=s, padding=k // 2), (cin, n, n)))[0])
            ratios.append(zero / periodic)
        out.append({"shape": [cout, cin, k, k], "input": n, "stride": s, "trials": trials,
                    "zero_larger": sum(r > 1 + 1e-9 for r in ratios), "ratio_min": min(ratios),
                    "ratio_max": max(ratios)})
    return out


def markdown(rows: list[dict]) -> str:
    head = ("| layer | n | stride | exact (periodic) | zero-pad (power) | 0-pad/exact | F4 | F4/exact | Fourier | "
            "Fourier/exact | t exact (ms) | t power (ms) | t F4 (ms) | t Fourier (ms) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        t = {m: 1e3 * r["seconds"][m] for m in METHODS}
        lines.append(
            f"| {r['name']} | {r['input_size'][0]} | {r['stride'][0]} | {r['exact']:.3f} | "
            f"{r['power_zero_padding']:.3f} | {r['power_ratio']:.3f} | {r['f4_bound']:.3f} | {r['f4_ratio']:.3f} | "
            f"{r['fourier_bound']:.3f} | {r['fourier_ratio']:.3f} | {t['exact']:.1f} | {t['power']:.1f} | "
            f"{t['f4']:.2f} | {t['fourier']:.1f} |")
    totals = {m: 1e3 * sum(r["seconds"][m] for r in rows) for m in METHODS}
    lines.append(f"| **total** | | | | | | | | | | {totals['exact']:.0f} | {totals['power']:.0f} | "
                 f"{totals['f4']:.1f} | {totals['fourier']:.0f} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    out = {}
    for key in ("power", "f4", "fourier"):
        ratios = [r[f"{key}_ratio"] for r in rows]
        out[f"{key}_ratio"] = {"min": min(ratios), "mean": statistics.fmean(ratios), "max": max(ratios)}
    out["total_ms"] = {m: 1e3 * sum(r["seconds"][m] for r in rows) for m in METHODS}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--survey-trials", type=int, default=50)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if not args.checkpoint.exists():
        sys.exit(f"checkpoint not found: {args.checkpoint}")
    torch.set_num_threads(1)
    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
            "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "repeats": args.repeats, "checkpoint": args.checkpoint.name, "load_before": loadavg()}
    print(f"ResNet-20, {args.repeats} repeats, 1 thread, load {info['load_before']}", flush=True)
    rows = measure_network(args.checkpoint, args.repeats)
    relation = survey(args.survey_trials)
    info["load_after"] = loadavg()
    doc = {"info": info, "layers": rows, "summary": summary(rows), "zero_vs_periodic_random": relation}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print(markdown(rows))
    print()
    s = doc["summary"]
    for key in ("power", "f4", "fourier"):
        r = s[f"{key}_ratio"]
        print(f"{key}/exact: min {r['min']:.3f}  mean {r['mean']:.3f}  max {r['max']:.3f}")
    print("zero-padded vs periodic on random layers (same padding):")
    for r in relation:
        print(f"  {r['shape']} n={r['input']} s={r['stride']}: zero-padded larger in {r['zero_larger']}/{r['trials']}"
              f", ratio {r['ratio_min']:.3f}–{r['ratio_max']:.3f}")
    print(f"load average before/after: {info['load_before']} / {info['load_after']}; wrote {args.out}")


if __name__ == "__main__":
    main()
