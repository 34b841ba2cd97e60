#!/usr/bin/env python
"""Dense against TT latency of whole networks and of each decomposed layer, at batch 1 and 128.

Run from the repository root::

    python benchmarks/latency_bench.py                  # CPU, the three networks, batch 1 and 128
    python benchmarks/latency_bench.py --device cuda    # on a GPU
    python benchmarks/latency_bench.py --nets resnet20 --batches 1 --repeats 5

For the shared ResNet-20, WRN-16-10 (random weights) and the demo's ResNet-18, each decomposed with
``--target-macs 4`` (data-free allocation) and, for ResNet-18, also at the demo's ``--rank 64``: the whole model's
forward time before and after, and every decomposed layer's dense and TT forward on the input it sees — medians of
``--repeats`` runs with dense and TT interleaved (:mod:`ttcompress.latency`), so a shared machine's load hits both
alike; ratios are what to read.  Writes ``benchmarks/results/latency_bench[_DEVICE].json`` and prints a Markdown
table.
"""

from __future__ import annotations

import argparse
import copy
import json

from nets import NAMES, RESULTS, load_net, machine

CONFIGS = {"resnet20": [("target_macs", 4.0)], "wrn16-10": [("target_macs", 4.0)],
           "resnet18": [("target_macs", 4.0), ("rank", 64)]}


def measure(name: str, batches: list[int], device: str, repeats: int) -> list[dict]:
    import torch

    from ttcompress.compress import CompressSettings, compress

    base = load_net(name)
    if base is None:
        return []
    rows = []
    for key, value in CONFIGS[name]:
        for batch in batches:
            m = copy.deepcopy(base)
            m.model.to(device)
            settings = CompressSettings(**{key: value}, latency=True, device=torch.device(device), batch_size=batch,
                                        repeats=repeats if batch == 1 or device != "cpu" else max(2, repeats // 3))
            report = compress(m.model, m.net, m.input_size, settings)
            timed = {n: t for n, t in report.layer_latency.items() if t[1] is not None}
            faster = sum(1 for d, t in timed.values() if t < d)
            rows.append({
                "net": name, "config": f"--{key.replace('_', '-')} {value:g}", "batch": batch,
                "params_ratio": report.decomposition.compression, "macs_ratio": report.macs_ratio,
                "dense_ms": report.latency_before_ms, "tt_ms": report.latency_after_ms,
                "speedup": report.latency_before_ms / report.latency_after_ms,
                "layers_timed": len(timed), "layers_faster": faster,
                "layer_dense_ms_sum": sum(d for d, _ in timed.values()),
                "layer_tt_ms_sum": sum(t for _, t in timed.values()),
                "layers": {n: {"dense_ms": d, "tt_ms": t, "macs_before": report.layer_macs_before[n],
                               "macs_after": report.layer_macs_after[n]} for n, (d, t) in timed.items()},
            })
            print({k: v for k, v in rows[-1].items() if k != "layers"}, flush=True)
    return rows


def markdown(results: dict) -> str:
    info = results["info"]
    out = [f"`python benchmarks/latency_bench.py --device {info['device']}`, {info.get('gpu', info['cpu'])}, "
           f"torch {info['torch']} ({info['torch_threads']} threads), {info['time']}, load {info['load_average']}:",
           "", "| network | decomposition | batch | params | MACs | dense ms | TT ms | speed-up | layers faster as TT |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        out.append(f"| {r['net']} | `{r['config']}` | {r['batch']} | ×{r['params_ratio']:.2f} | ×{r['macs_ratio']:.2f} "
                   f"| {r['dense_ms']:.2f} | {r['tt_ms']:.2f} | ×{r['speedup']:.2f} | "
                   f"{r['layers_faster']}/{r['layers_timed']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default=",".join(NAMES), help=f"comma-separated, from {', '.join(NAMES)}")
    ap.add_argument("--batches", default="1,128")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=9, help="timed runs per figure (a third of it at batch > 1 on CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for name in [n for n in args.nets.split(",") if n]:
        rows += measure(name, [int(b) for b in args.batches.split(",")], args.device, args.repeats)
    results = {"info": machine(args.device), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else "_" + args.device.replace(":", "")
    out = args.out or str(RESULTS / f"latency_bench{suffix}.json")
    with open(out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(markdown(results))


if __name__ == "__main__":
    main()
