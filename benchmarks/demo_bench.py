"""Issue 15: the demo's finetune settings, side by side over seeds, on the demo's test images and on held-out ones.

The demo (``ttcompress demo``) decomposes the pyautoattack wheel's CIFAR-10 ResNet-18 at rank 64 and finetunes it
with ``clip_to 1`` on the 1 024 embedded training images; its goal is a clipped model within 5 points of the
original on the 256 embedded test images.  Each row here runs that finetune through the library's own ``finetune``
with one set of settings and several seeds, and reports the clipped model's accuracy on the 256 embedded test images
(the demo's own figure, on which the settings were chosen) and on the other 256 images of the shared 512-image test
sample (``../shared/data/cifar10-sample.npz``, test images 256–511: never used to choose anything), against the
original on the same images.

    python benchmarks/demo_bench.py                           # all rows, seeds 0 1 2 (CPU: about 10 min)
    python benchmarks/demo_bench.py --rows "demo" --seeds 0 1 2 3 4
    python benchmarks/demo_bench.py --markdown benchmarks/results/demo_bench.json benchmarks/results/demo_bench_150.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from nets import CIFAR_SAMPLE, RESULTS, machine

# every row: the demo's decomposition (rank 64) and finetune (ttcompress.demo.finetune_config) with these settings
ROWS = {
    "demo until 2026-12-05 (60 steps, lr 0.01, CE, clip every 20, final rescale)": dict(
        steps=60, lr=0.01, kd_alpha=0.0, clip_every=20, final_reprojections=0),
    "60 steps, KD α=1, lr 0.001, clip every 5, final rescale": dict(
        steps=60, lr=0.001, kd_alpha=1.0, clip_every=5, final_reprojections=0),
    "demo: 100 steps, KD α=1, lr 0.001, clip every 5, final rescale": dict(
        steps=100, lr=0.001, kd_alpha=1.0, clip_every=5, final_reprojections=0),
    "120 steps, KD α=1, lr 0.001, clip every 5, final rescale": dict(
        steps=120, lr=0.001, kd_alpha=1.0, clip_every=5, final_reprojections=0),
    "150 steps, KD α=1, lr 0.001, clip every 5, final rescale": dict(
        steps=150, lr=0.001, kd_alpha=1.0, clip_every=5, final_reprojections=0),
}


def held_out():
    """Test images 256–511 of the shared sample (the demo embeds 0–255), or None without ``../shared``."""
    if not CIFAR_SAMPLE.exists():
        return None
    from ttcompress.data import load_split

    test = load_split(str(CIFAR_SAMPLE), "test")
    return replace(test, images=test.images[256:], labels=test.labels[256:], source=f"{CIFAR_SAMPLE} test[256:]")


def measure(name: str, settings: dict, seed: int, original, path: Path, arch: str, heldout) -> dict:
    from ttcompress.demo import DEMO_DATA, DemoSettings, asset, finetune_config
    from ttcompress.train import finetune
    from ttcompress.train.finalize import accuracy
    from ttcompress.tt import decompose

    demo = DemoSettings(seed=seed, **settings)
    torch.manual_seed(seed)
    student = copy.deepcopy(original)
    decompose(student.net, rank=64)
    config = finetune_config(demo, asset(DEMO_DATA), path, arch, "cpu")
    start = time.perf_counter()
    result = finetune(student, config)
    seconds = time.perf_counter() - start
    row = {"row": name, "seed": seed, "settings": settings, "decomposed": result.test_accuracy_before,
           "clipped": result.test_accuracy, "max_sigma_ratio": result.max_ratio, "seconds": seconds,
           "teacher_seconds": result.time_teacher}
    if heldout is not None:
        row["clipped_heldout"] = accuracy(student.model.eval(), heldout, torch.device("cpu"), 256, None, "")
    return row


def _goal(accuracies: list[float], original: float) -> str:
    """✓ when every seed is within 5 points of the original, ✗ when their mean is not."""
    if min(accuracies) >= original - 0.05:
        return "✓"
    return "✗" if statistics.mean(accuracies) < original - 0.05 else "mean ✓, not every seed"


def markdown(doc: dict) -> str:
    orig, orig_h = doc["original"], doc.get("original_heldout")
    lines = [f"`python benchmarks/demo_bench.py` on {doc['machine']['cpu']} ({doc['machine']['cores']} cores), torch "
             f"{doc['machine']['torch']}, {doc['machine']['time']}; the demo's ResNet-18 (original "
             f"{100 * orig:.1f} % on the 256 embedded test images"
             + (f", {100 * orig_h:.1f} % on the 256 held-out ones" if orig_h is not None else "")
             + f"), rank 64, batch 32, clip_to 1; seeds {', '.join(map(str, doc['seeds']))}:", "",
             "| finetune | clipped, embedded test (each seed) | mean | goal ≥ original − 5 "
             "| held-out test (each seed) | mean | goal | max σmax/bound | finetune time |",
             "|---|---|---|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(r["row"] for r in doc["rows"]))
    for name in names:
        rows = [r for r in doc["rows"] if r["row"] == name]
        acc = [r["clipped"] for r in rows]
        mean = statistics.mean(acc)
        cells = [name, " / ".join(f"{100 * a:.1f}" for a in acc) + " %", f"**{100 * mean:.1f} %**", _goal(acc, orig)]
        held = [r.get("clipped_heldout") for r in rows]
        if orig_h is not None and None not in held:
            cells += [" / ".join(f"{100 * a:.1f}" for a in held) + " %",
                      f"**{100 * statistics.mean(held):.1f} %**", _goal(held, orig_h)]
        else:
            cells += ["—", "—", "—"]
        cells += [f"{max(r['max_sigma_ratio'] for r in rows):.4f}",
                  f"{statistics.mean(r['seconds'] for r in rows):.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", default=None, help="';'-separated substrings: run only the rows whose name "
                        "contains one")
    parser.add_argument("--out", default=str(RESULTS / "demo_bench.json"))
    parser.add_argument("--markdown", metavar="RESULTS", nargs="+",
                        help="print results files (of the same machine: one table) as markdown and exit")
    args = parser.parse_args()
    if args.markdown:
        docs = [json.loads(Path(f).read_text()) for f in args.markdown]
        when = " and ".join(dict.fromkeys(d["machine"]["time"] for d in docs))
        print(markdown(dict(docs[0], machine=dict(docs[0]["machine"], time=when),
                            rows=[r for d in docs for r in d["rows"]])))
        return
    from ttcompress import checkpoint as ck
    from ttcompress.data import load_split
    from ttcompress.demo import DEMO_DATA, asset, default_model
    from ttcompress.train.finalize import accuracy

    path, arch, _ = default_model()
    if arch != "resnet18-cifar":
        sys.exit("needs the pyautoattack wheel (the demo's ResNet-18)")
    original = ck.load(path, arch=arch)
    heldout = held_out()
    cpu = torch.device("cpu")
    orig = accuracy(original.model.eval(), load_split(str(asset(DEMO_DATA)), "test"), cpu, 256, None, "")
    orig_h = accuracy(original.model, heldout, cpu, 256, None, "") if heldout is not None else None
    wanted = [w.strip() for w in args.rows.split(";") if w.strip()] if args.rows else None
    rows = []
    for name, settings in ROWS.items():
        if wanted and not any(w in name for w in wanted):
            continue
        for seed in args.seeds:
            rows.append(measure(name, settings, seed, original, path, arch, heldout))
            print(json.dumps(rows[-1]), flush=True)
    doc = {"machine": machine("cpu"), "seeds": args.seeds, "original": orig, "original_heldout": orig_h,
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(markdown(doc))


if __name__ == "__main__":
    main()
