#!/usr/bin/env python
"""Compression to a budget: achieved ratios on three networks, and accuracy against one rank for all layers.

Run from the repository root::

    python benchmarks/budget_bench.py                 # everything (~25 min on the shared 2-core VM)
    python benchmarks/budget_bench.py --skip-accuracy # only the achieved ratios

targets   ``decompose --target-ratio 2, 4, 8`` and ``--target-macs 2, 4`` (data-free allocation) on the shared
          ResNet-20, WRN-16-10 (random weights) and the demo's ResNet-18: the ratio reached, counted on the
          decomposed network, or the one-line reason it cannot be reached.
accuracy  on the shared ResNet-20 and the 512 shared test images, after decomposition alone (no training): one rank
          R for every layer (``--rank R``) against the allocation at exactly the parameter ratio R gives
          (``--target-ratio``), without data and with ``--calibrate`` (256 shared *training* images: data-aware
          truncation, calibrated allocation, BatchNorm correction; also without the last), and one rank with
          ``--calibrate``; also on 1024 later training images, outside the calibration set.

Writes ``benchmarks/results/budget_bench.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from nets import CIFAR_SAMPLE, NAMES, RESULTS, load_net, machine


def achieved(names: list[str]) -> list[dict]:
    from ttcompress.compress import CompressSettings, compress
    from ttcompress.errors import UserError

    rows = []
    for name in names:
        base = load_net(name)
        if base is None:
            continue
        for kind, value in [("ratio", 2), ("ratio", 4), ("ratio", 8), ("macs", 2), ("macs", 4)]:
            m = copy.deepcopy(base)
            settings = CompressSettings(**{"target_ratio" if kind == "ratio" else "target_macs": float(value)})
            start = time.perf_counter()
            try:
                report = compress(m.model, m.net, m.input_size, settings)
            except UserError as exc:
                rows.append({"net": name, "target": kind, "value": value, "error": str(exc)})
                continue
            got = report.decomposition.compression if kind == "ratio" else report.macs_ratio
            rows.append({"net": name, "target": kind, "value": value, "achieved": got,
                         "deviation": got / value - 1, "params_ratio": report.decomposition.compression,
                         "macs_ratio": report.macs_ratio, "seconds": time.perf_counter() - start,
                         "tt_layers": sum(1 for l in report.decomposition.layers if l.ranks and not l.reason),
                         "layers": len(report.decomposition.layers)})
            print(rows[-1], flush=True)
    return rows


def accuracy_rows(ranks: list[int], n_calibrate: int) -> list[dict]:
    from ttcompress.compress import CompressSettings, compress
    from ttcompress.data import ImageSet, load_split
    from ttcompress.metrics import accuracy, predict

    base = load_net("resnet20")
    if base is None or not CIFAR_SAMPLE.exists():
        return []
    test = load_split(str(CIFAR_SAMPLE), "test")
    train = load_split(str(CIFAR_SAMPLE), "train")
    calib = train.subset(n_calibrate)
    # a second check outside the calibration images: 1024 later training images (none of the first n_calibrate)
    held = ImageSet(train.images[2560:3584], train.labels[2560:3584], train.num_classes, train.classes, "held")

    def acc(m) -> tuple[float, float]:
        return tuple(accuracy(predict(m.model, s, batch_size=256), s.labels) for s in (test, held))

    def row(method: str, rank: int | None, settings: CompressSettings | None) -> dict:
        m = copy.deepcopy(base)
        start = time.perf_counter()
        ratio = 1.0
        if settings is not None:
            ratio = compress(m.model, m.net, m.input_size, settings).decomposition.compression
        seconds = time.perf_counter() - start
        test_acc, held_acc = acc(m)
        out = {"method": method, "rank": rank, "ratio": ratio, "accuracy": test_acc, "accuracy_held": held_acc,
               "seconds": seconds}
        print(out, flush=True)
        return out

    rows = [row("dense", None, None)]
    for r in ranks:
        single = row("single rank", r, CompressSettings(rank=r))
        ratio = single["ratio"]
        rows += [single,
                 row("single rank, --calibrate", r, CompressSettings(rank=r, calibrate=calib)),
                 row("target, data-free", r, CompressSettings(target_ratio=ratio)),
                 row("target, --calibrate --no-bn-correct", r,
                     CompressSettings(target_ratio=ratio, calibrate=calib, bn_correct=False)),
                 row("target, --calibrate", r, CompressSettings(target_ratio=ratio, calibrate=calib))]
    return rows


def markdown(results: dict) -> str:
    out = ["| network | target | achieved | deviation | params ratio | MACs ratio | TT layers |", "|---|---|---|---|---|---|---|"]
    for r in results["targets"]:
        flag = f"--target-{'ratio' if r['target'] == 'ratio' else 'macs'} {r['value']}"
        if "error" in r:
            out.append(f"| {r['net']} | `{flag}` | — | {r['error']} | | | |")
        else:
            out.append(f"| {r['net']} | `{flag}` | ×{r['achieved']:.3f} | {100 * r['deviation']:+.2f} % | "
                       f"×{r['params_ratio']:.2f} | ×{r['macs_ratio']:.2f} | {r['tt_layers']}/{r['layers']} |")
    if results["accuracy"]:
        out += ["", "| ResNet-20, decomposition alone | parameter ratio | test accuracy (512) | held-out train (1024) |",
                "|---|---|---|---|"]
        for r in results["accuracy"]:
            what = r["method"] if r["rank"] is None else f"{r['method']} (ratio of --rank {r['rank']})"
            held = f"{100 * r['accuracy_held']:.2f} %" if "accuracy_held" in r else "—"
            out.append(f"| {what} | ×{r['ratio']:.2f} | {100 * r['accuracy']:.2f} % | {held} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default=",".join(NAMES), help=f"comma-separated, from {', '.join(NAMES)}")
    ap.add_argument("--ranks", default="8,16,24,32", help="single ranks whose ratio the allocation is compared at")
    ap.add_argument("--calibrate-n", type=int, default=256)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "budget_bench.json"))
    args = ap.parse_args()
    results = {"info": machine("cpu"), "targets": achieved([n for n in args.nets.split(",") if n]), "accuracy": []}
    if not args.skip_accuracy:
        results["accuracy"] = accuracy_rows([int(r) for r in args.ranks.split(",")], args.calibrate_n)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(markdown(results))


if __name__ == "__main__":
    main()
