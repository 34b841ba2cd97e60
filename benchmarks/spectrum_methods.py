#!/usr/bin/env python
"""σmax of every conv by each spectrum method, side by side on ResNet-20, WRN-16-10 and the demo's ResNet-18:
value against the exact periodic σmax, time and peak memory, in one run.

Run from the repository root::

    python benchmarks/spectrum_methods.py                              # all three networks, every method, CPU
    python benchmarks/spectrum_methods.py --networks resnet20 --repeats 5
    python benchmarks/spectrum_methods.py --device cuda --fourier-max-channels 0
    python benchmarks/spectrum_methods.py --markdown benchmarks/results/spectrum_methods.json

Networks (each layer on the input size it sees in a 32×32 forward pass): ``resnet20`` the shared pretrained
checkpoint (``../shared/models/resnet20-12fca82f.th``), ``wrn16-10`` WRN-16-10 with random weights (seed 0),
``resnet18-cifar`` the CIFAR-10 ResNet-18 of the pyautoattack wheel (``examples/model_test.pt``, the demo's model).
A network whose weights are missing is skipped with a note.

Methods are those of ``ttcompress.spectral.methods`` exactly as ``ttcompress spectrum --all-methods`` runs them:
``exact`` periodic spectrum (float32, the default), ``f4`` and ``fourier`` kernel bounds, ``gram`` (Gram iteration on
the periodic operator, ``--gram-iters``), ``gram-zero`` (its zero-padding bound), ``power`` (PowerQR on the layer as
it runs, float64, tol 1e-4).  Each (network, method) runs in a fresh child process: per layer the median wall time of
``--repeats`` runs; peak memory is the child's peak RSS (on a GPU: peak allocated device memory) above that of a
child that only loads the network.  Ratios are to the exact periodic σmax in float64 (computed in the exact child
after its timing, untimed).  The Fourier bound costs one SVD per grid frequency (1 200 for 3×3 kernels) whatever the
input size: layers with more than ``--fourier-max-channels`` channels on their smaller side are skipped (0: none).

A last, small part compares the two operators on random layers with dense matrices built from basis vectors: how
often the zero-padded σmax exceeds the periodic one at small input sizes.

Results go to ``benchmarks/results/spectrum_methods.json``; markdown tables are printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # reference.py: dense operators from basis vectors

# torch is imported late: children are started before this process loads it (a child's ru_maxrss starts from its
# parent's resident size)
NETWORKS = ("resnet20", "wrn16-10", "resnet18-cifar")
METHODS = ("exact", "f4", "fourier", "gram", "gram-zero", "power")
RESNET20 = ROOT.parent / "shared" / "models" / "resnet20-12fca82f.th"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "spectrum_methods.json"
FIELD = {"f4": "f4_bound", "fourier": "fourier_bound", "gram": "gram_bound", "gram-zero": "gram_zero_padding_bound",
         "power": "power_zero_padding"}


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


def resnet18_path() -> Path | None:
    import importlib.resources

    try:
        path = Path(str(importlib.resources.files("pyautoattack") / "examples" / "model_test.pt"))
    except ModuleNotFoundError:
        return None
    return path if path.is_file() else None


def load_network(name: str, device: str):
    """``(model, net)`` of a benchmark network on ``device``, or raise FileNotFoundError."""
    import torch

    from ttcompress import archs
    from ttcompress.checkpoint import load

    if name == "resnet20":
        if not RESNET20.exists():
            raise FileNotFoundError(RESNET20)
        loaded = load(RESNET20, arch="resnet20")
        model, net = loaded.model, loaded.net
    elif name == "wrn16-10":
        torch.manual_seed(0)
        model = archs.build("wrn16-10")
        net = model.net
    elif name == "resnet18-cifar":
        path = resnet18_path()
        if path is None:
            raise FileNotFoundError("pyautoattack examples/model_test.pt")
        loaded = load(path, arch="resnet18-cifar")
        model, net = loaded.model, loaded.net
    else:
        raise SystemExit(f"unknown network {name}")
    return model.to(device).eval(), net


# --- one (network, method) in a fresh process ----------------------------------------------------------------------

def child(network: str, method: str, device: str, repeats: int, gram_iters: int, fourier_max: int) -> None:
    import torch

    from ttcompress.spectral.methods import layer_methods
    from ttcompress.spectral.network import layer_input_sizes, layer_spectrum
    from ttcompress.tt import conv_layers

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    model, net = load_network(network, device)
    sizes = layer_input_sizes(model, (3, 32, 32), net)
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base_device = torch.cuda.memory_allocated()
    layers = []
    for name, layer in conv_layers(net):
        if name not in sizes:
            continue
        row = {"name": name, "input_size": list(sizes[name]), "stride": list(layer.stride),
               "channels": [layer.in_channels, layer.out_channels], "value": None, "seconds": None}
        if method == "fourier" and fourier_max and min(layer.in_channels, layer.out_channels) > fourier_max:
            row["skipped"] = f"more than {fourier_max} channels (--fourier-max-channels)"
            layers.append(row)
            continue
        if method != "none":
            times = []
            for _ in range(repeats):
                sync()
                got = layer_methods(name, layer, sizes[name], [method], gram_iters=gram_iters)
                sync()
                times.append(got.seconds[method])
            row["seconds"] = statistics.median(times)
            row["value"] = got.value(method)
            if got.skipped:
                row["skipped"] = got.skipped.get(method)
            if method == "power":
                row["converged"] = got.power_converged
        layers.append(row)
    out = {"network": network, "method": method, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
           / 1024, "layers": layers}
    if cuda:
        out["peak_device_mib"] = (torch.cuda.max_memory_allocated() - base_device) / 2**20
    if method == "exact":  # the float64 reference, after the measurements
        modules = dict(conv_layers(net))
        for row in layers:
            row["exact64"] = layer_spectrum(row["name"], modules[row["name"]], row["input_size"],
                                            dtype=torch.float64).sigma_max
    print(json.dumps(out))


def run_child(network: str, method: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--child", network, method, "--device", args.device, "--repeats",
           str(args.repeats), "--gram-iters", str(args.gram_iters or 0), "--fourier-max-channels",
           str(args.fourier_max_channels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        if "FileNotFoundError" in done.stderr:
            return None
        sys.stderr.write(done.stderr)
        raise SystemExit(f"child {network} {method} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the parent: merge, summarise, print ---------------------------------------------------------------------------

def measure(network: str, methods: list[str], args) -> dict | None:
    base = run_child(network, "none", args)
    if base is None:
        print(f"{network}: weights not found, skipped", flush=True)
        return None
    runs = {}
    for method in methods:
        started = time.perf_counter()
        runs[method] = run_child(network, method, args)
        total = sum(r["seconds"] or 0.0 for r in runs[method]["layers"])
        print(f"  {network:15s} {method:10s} {total:8.2f} s   (child {time.perf_counter() - started:5.1f} s)",
              flush=True)
    rows = []
    for i, layer in enumerate(base["layers"]):
        row = {k: layer[k] for k in ("name", "input_size", "stride", "channels")}
        row["seconds"], row["skipped"] = {}, {}
        for method, run in runs.items():
            got = run["layers"][i]
            row["seconds"][method] = got["seconds"]
            if got.get("skipped"):
                row["skipped"][method] = got["skipped"]
            if method == "exact":
                row["exact"], row["exact64"] = got["value"], got["exact64"]
            else:
                row[FIELD[method]] = got["value"]
            if method == "power":
                row["power_converged"] = got.get("converged")
        rows.append(row)
    memory = {}
    for method, run in runs.items():
        memory[method] = {"peak_rss_mib": run["peak_rss_mib"],
                          "extra_rss_mib": max(0.0, run["peak_rss_mib"] - base["peak_rss_mib"])}
        if "peak_device_mib" in run:
            memory[method]["peak_device_mib"] = run["peak_device_mib"]
    return {"layers": rows, "memory": memory, "baseline_rss_mib": base["peak_rss_mib"],
            "summary": summarise(rows, list(runs))}


def summarise(rows: list[dict], methods: list[str]) -> dict:
    out: dict = {"total_s": {m: sum(r["seconds"][m] or 0.0 for r in rows) for m in methods}, "ratio": {}}
    reference = [r.get("exact64") for r in rows]
    for method in methods:
        if method == "exact" or "exact" not in methods:
            continue
        ratios = [r[FIELD[method]] / ref for r, ref in zip(rows, reference) if r[FIELD[method]] is not None and ref]
        if ratios:
            out["ratio"][method] = {"min": min(ratios), "mean": statistics.fmean(ratios), "max": max(ratios),
                                    "layers": len(ratios)}
    checks = {}
    if "exact" in methods and "gram" in methods:
        checks["gram_ge_exact_all_layers"] = all(r["gram_bound"] >= r["exact64"] for r in rows)
        checks["gram_within_1e-3"] = all(r["gram_bound"] <= r["exact64"] * (1 + 1e-3) for r in rows)
        checks["gram_faster_than_exact"] = out["total_s"]["gram"] < out["total_s"]["exact"]
    if "gram-zero" in methods and "power" in methods:
        checks["gram_zero_ge_power_all_layers"] = all(r["gram_zero_padding_bound"] >= r["power_zero_padding"]
                                                      for r in rows)
    out["checks"] = checks
    return out


def markdown(doc: dict) -> str:
    lines = []
    gpu = doc["info"]["device"].startswith("cuda")
    mem = "peak device memory" if gpu else "peak RSS above loading"
    lines += [f"| network | method | value / exact (min–max, mean) | total time | {mem} |",
              "|---|---|---|---|---|"]
    for network, res in doc["networks"].items():
        s = res["summary"]
        for method, total in s["total_s"].items():
            r = s["ratio"].get(method)
            ratio = "1 (reference)" if method == "exact" else (
                "—" if r is None else f"{r['min']:.6f}–{r['max']:.6f}, {r['mean']:.6f}"
                + ("" if r["layers"] == len(res["layers"]) else f" ({r['layers']} of {len(res['layers'])} layers)"))
            m = res["memory"][method]
            size = m["peak_device_mib"] if gpu else m["extra_rss_mib"]
            lines.append(f"| {network} | {method} | {ratio} | {total:.2f} s | {size:.0f} MiB |")
    for network, res in doc["networks"].items():
        methods = list(res["summary"]["total_s"])
        others = [m for m in methods if m != "exact"]
        lines += ["", f"**{network}**, per layer (value / exact float64; time in ms):", ""]
        head = "| layer | n | stride | exact | " + " | ".join(others) + " | " + " | ".join(f"t {m}" for m in methods) + " |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in res["layers"]:
            exact = r.get("exact64")
            cells = []
            for m in others:
                v = r.get(FIELD[m])
                cells.append("—" if v is None or not exact else f"{v / exact:.4f}")
            times = ["—" if r["seconds"][m] is None else f"{1e3 * r['seconds'][m]:.1f}" for m in methods]
            lines.append(f"| {r['name']} | {r['input_size'][0]} | {r['stride'][0]} | "
                         f"{'—' if exact is None else f'{exact:.4f}'} | " + " | ".join(cells) + " | "
                         + " | ".join(times) + " |")
        totals = res["summary"]["total_s"]
        lines.append("| **total** | | | | " + " | ".join("" for _ in others) + " | "
                     + " | ".join(f"{1e3 * totals[m]:.0f}" for m in methods) + " |")
    return "\n".join(lines)


def survey(trials: int) -> list[dict]:
    """Zero-padded ('same' padding) against periodic σmax on random small layers, from dense matrices."""
    import torch
    import torch.nn.functional as F
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default=",".join(NETWORKS), help="comma-separated, from " + ", ".join(NETWORKS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child on a CPU")
    parser.add_argument("--gram-iters", type=int, default=None, help="default: the library's")
    parser.add_argument("--fourier-max-channels", type=int, default=128)
    parser.add_argument("--survey-trials", type=int, default=50)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--markdown", type=Path, help="print a results file as markdown and exit")
    parser.add_argument("--child", nargs=2, metavar=("NETWORK", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    if args.child:
        if not args.gram_iters:
            from ttcompress.spectral.gram import DEFAULT_ITERS

            args.gram_iters = DEFAULT_ITERS
        child(*args.child, args.device, args.repeats, args.gram_iters, args.fourier_max_channels)
        return
    os.environ["BENCH_THREADS"] = str(args.threads)
    networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m}; choose from {', '.join(METHODS)}")
    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
            "cores": os.cpu_count(), "device": args.device, "threads": args.threads, "repeats": args.repeats,
            "gram_iters": args.gram_iters, "fourier_max_channels": args.fourier_max_channels,
            "load_before": loadavg()}
    print(f"{', '.join(networks)}: {', '.join(methods)} on {args.device}, {args.repeats} repeat(s), "
          f"{args.threads} thread(s), load {info['load_before']}", flush=True)
    doc = {"info": info, "networks": {}}
    for network in networks:
        result = measure(network, methods, args)
        if result is not None:
            doc["networks"][network] = result
    import torch

    from ttcompress.spectral.gram import DEFAULT_ITERS

    info["gram_iters"] = args.gram_iters or DEFAULT_ITERS
    info["torch"] = torch.__version__
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(args.device)
    doc["zero_vs_periodic_random"] = survey(args.survey_trials) if args.survey_trials else []
    info["load_after"] = loadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print(markdown(doc))
    print()
    for network, res in doc["networks"].items():
        print(f"{network} checks: {res['summary']['checks']}")
    for r in doc["zero_vs_periodic_random"]:
        print(f"  {r['shape']} n={r['input']} s={r['stride']}: zero-padded larger in {r['zero_larger']}/{r['trials']}"
              f", ratio {r['ratio_min']:.3f}–{r['ratio_max']:.3f}")
    print(f"load average before/after: {info['load_before']} / {info['load_after']}; wrote {args.out}")


if __name__ == "__main__":
    main()
