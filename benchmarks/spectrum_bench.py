#!/usr/bin/env python
"""Exact periodic spectra and clipping of every conv of WRN-16-10: ttcompress against the reference algorithms.

Run from the repository root::

    python benchmarks/spectrum_bench.py            # full run (WRN-16-10, ~10-15 min on 2 CPU cores)
    python benchmarks/spectrum_bench.py --quick    # smoke test (WRN-16-1, TT rank 8, a 256-channel memory case; ~1 min)
    python benchmarks/spectrum_bench.py --device cuda

It measures, in one run and on the same random weights (seed 0, 32×32 inputs):

spectrum   (a) the paper's algorithm as printed in App. B.1, plain numpy: ``np.fft.fft2`` of the zero-padded polyphase
               kernel, ``np.linalg.svd(compute_uv=False)`` per frequency, full grid, float64 — also the float64
               reference every error is measured against;
           (b) the research implementation's approach: ``torch.linalg.svdvals`` in complex64 over all m² frequencies
               of ``torch.fft.fft2`` of the padded polyphase kernel;
           (c) the "eigvalsh floor": batched complex64 ``torch.linalg.eigvalsh`` on one Hermitian Gram matrix
               (smaller side) per distinct frequency, timing the eigvalsh call alone (Grams prepared untimed) —
               once with torch's own threading, once spread over worker threads the way ttcompress does;
           (d) ttcompress: ``network_spectrum`` (float32 contract: every value within 1e-4·σmax of float64).
tt         ttcompress on the TT network (``decompose(rank=192)``) against ttcompress on the dense one; the same for
           the eigvalsh floor (its own TT/dense ratio), and the time of the convs TT keeps dense (a ceiling on the
           ratio: they cost the same in both networks).  The figure of merit for TT against dense is the speed-up
           per conv that TT replaces (×6.9 on the last full run), printed and marked as such.
clip       one Sedghi clipping pass of every conv to 1: the research approach (full-grid complex64 SVD, clamp,
           ifft2, crop) against ``ttcompress.spectral.clip``; the clipped kernels are checked against a float64
           clip, against each other, and by recomputing their spectrum (σmax after one pass; the crop makes
           the projection approximate, so it need not be ≤ 1).
memory     peak RSS (``ru_maxrss`` of a fresh child process) of one 640-channel 3×3 layer at 32×32 (ours: the largest
           of three runs).

Every timing is one wall-clock run (the machine may be shared: the load average is recorded).  Results are printed
as a table and written to ``benchmarks/results/spectrum_bench[_quick].json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

# Heavy imports are deferred: the memory children are started before this process loads torch, because on Linux
# a child's ru_maxrss starts from its parent's resident size (it is kept across fork and exec).
np = torch = periodic = Geometry = pmap = workers_for = None


def _import_torch() -> None:
    global np, torch, periodic, Geometry, pmap, workers_for
    import numpy
    import torch as _torch

    from ttcompress.kernel import Geometry as _Geometry
    from ttcompress.spectral import periodic as _periodic
    from ttcompress.spectral.threads import pmap as _pmap
    from ttcompress.spectral.threads import workers_for as _workers_for

    np, torch, periodic, Geometry = numpy, _torch, _periodic, _Geometry
    pmap, workers_for = _pmap, _workers_for


# --- reference implementations -----------------------------------------------------------------------------------

def paper_numpy(kernel, input_shape: tuple[int, int], stride: int):
    """App. B.1, line by line, for PyTorch's (Cout, Cin, kh, kw) layout (the paper's line 1 only brings its
    kernel to this axis order).  float64 / complex128 throughout."""
    kernel_tr = kernel
    d1 = input_shape[0] - kernel_tr.shape[2]
    d2 = input_shape[1] - kernel_tr.shape[3]
    kernel_pad = np.pad(kernel_tr, ((0, 0), (0, 0), (0, d1), (0, d2)))
    str_shape = np.array(input_shape) // stride
    r1, r2 = kernel_pad.shape[:2]
    transforms = np.zeros((r1, r2, stride**2, str_shape[0], str_shape[1]))
    for i in range(stride):
        for j in range(stride):
            transforms[:, :, i * stride + j, :, :] = kernel_pad[:, :, i::stride, j::stride]
    transforms = np.fft.fft2(transforms)
    transforms = transforms.reshape(r1, -1, str_shape[0], str_shape[1])
    transpose_for_svd = np.transpose(transforms, axes=[2, 3, 0, 1])
    sing_vals = np.linalg.svd(transpose_for_svd, compute_uv=False).flatten()
    return sing_vals


def polyphase_fft(kernel, n: int, s: int):
    """``torch.fft.fft2`` of the zero-padded polyphase kernel: ``(m, m, Cout, Cin·s²)`` complex (full grid)."""
    cout, cin, kh, kw = kernel.shape
    pad = kernel.new_zeros(cout, cin, n, n)
    pad[:, :, :kh, :kw] = kernel
    m = n // s
    poly = pad.reshape(cout, cin, m, s, m, s).permute(0, 1, 3, 5, 2, 4).reshape(cout, cin * s * s, m, m)
    return torch.fft.fft2(poly).permute(2, 3, 0, 1)


def research_svdvals(kernel, n: int, s: int):
    return torch.linalg.svdvals(polyphase_fft(kernel.float(), n, s)).flatten()


def research_clip(kernel, n: int, s: int, bound: float):
    """Full-grid complex64 SVD, clamp, inverse FFT, crop to the kernel's own taps."""
    cout, cin, kh, kw = kernel.shape
    m = n // s
    f = polyphase_fft(kernel.float(), n, s)
    u, sv, vh = torch.linalg.svd(f, full_matrices=False)
    fc = (u * sv.clamp(max=bound).to(u.dtype).unsqueeze(-2)) @ vh
    poly = torch.fft.ifft2(fc.permute(2, 3, 0, 1)).real  # (Cout, Cin·s², m, m)
    pad = poly.reshape(cout, cin, s, s, m, m).permute(0, 1, 4, 2, 5, 3).reshape(cout, cin, n, n)
    return pad[:, :, :kh, :kw].contiguous()


def floor_grams(kernel, n: int, s: int):
    """complex64 Gram matrix of the smaller side at every distinct frequency (one per pair {f, −f})."""
    f = polyphase_fft(kernel.float(), n, s)
    half = periodic.HalfGrid.of((n // s, n // s)).freqs
    p = f[half[:, 0], half[:, 1]]
    return p @ p.mH if p.shape[-2] <= p.shape[-1] else p.mH @ p


def floor_eigvalsh(grams: dict, workers: int) -> dict:
    """The floor spread over ``workers`` threads the way ttcompress spreads its chunks."""
    out = {}
    for name, gm in grams.items():
        spans = periodic._spans(len(gm), max(1, -(-len(gm) // (4 * workers))))
        out[name] = torch.cat(pmap(lambda s, gm=gm: torch.linalg.eigvalsh(gm[s]), spans, workers))
    return out


# --- helpers -----------------------------------------------------------------------------------------------------

class Timer:
    def __init__(self, device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn):
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - start


def rel_err(values, ref) -> float:
    v = np.sort(np.asarray(torch.as_tensor(values).double().cpu()))[::-1]
    r = np.sort(ref)[::-1]
    assert v.shape == r.shape, (v.shape, r.shape)
    return float(np.max(np.abs(v - r)) / r[0])


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "torch": torch.__version__, "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


def make_model(quick: bool):
    from ttcompress.archs import CIFAR10_MEAN, CIFAR10_STD, Normalized, build
    from ttcompress.archs.wrn import WideResNet

    torch.manual_seed(0)
    if quick:
        return Normalized(WideResNet(16, 1, 10), CIFAR10_MEAN, CIFAR10_STD)
    return build("wrn16-10")


def conv_list(model) -> list:
    from ttcompress.spectral.network import layer_input_sizes
    from ttcompress.tt import conv_layers

    sizes = layer_input_sizes(model, (3, 32, 32), model.net)
    out = []
    for name, layer in conv_layers(model.net):
        geometry = Geometry.of(layer)
        assert geometry.dilation == (1, 1) and geometry.stride[0] == geometry.stride[1]
        out.append((name, layer.weight.detach(), sizes[name], geometry))
    return out


# --- memory children ---------------------------------------------------------------------------------------------

def _vm_hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def child(task: str, channels: int, n: int, device: str) -> None:
    """Run one measurement in this (fresh) process and print its time and peak RSS as JSON."""
    _import_torch()
    torch.manual_seed(0)
    w = torch.randn(channels, channels, 3, 3, device=device) * (2.0 / (9 * channels)) ** 0.5
    timer = Timer(torch.device(device))
    if task == "baseline":
        seconds = 0.0
    elif task == "ours-spectrum":
        _, seconds = timer(lambda: periodic.singular_values(w, (n, n)))
    elif task == "ours-clip":
        _, seconds = timer(lambda: periodic.clip(w, (n, n), 0.5))
    elif task == "research-spectrum":
        _, seconds = timer(lambda: research_svdvals(w, n, 1))
    else:
        raise SystemExit(f"unknown child task {task}")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"task": task, "seconds": seconds, "peak_rss_mib": peak_kib / 1024, "vm_hwm_mib": _vm_hwm_mib()}
    if device.startswith("cuda"):
        out["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def run_child(task: str, channels: int, n: int, device: str, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", task, "--channels", str(channels), "--size", str(n), "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


# glibc raises its mmap threshold to the largest chunk freed so far, so the worker threads' few-MiB temporaries end
# up in per-thread arenas that keep freed memory; with the threshold pinned at 1 MiB they are returned at once and
# the peak shows what is live (at some cost in page faults, hence only as a second measurement)
RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def worst_of(runs) -> dict:
    """The largest peak of several runs of one child task, with the fastest time and every run's peak."""
    runs = list(runs)
    out = dict(max(runs, key=lambda r: r["peak_rss_mib"]))
    out["seconds"] = min(r["seconds"] for r in runs)
    out["runs_peak_rss_mib"] = [r["peak_rss_mib"] for r in runs]
    return out


# --- the benchmark -----------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="WRN-16-1, TT rank 8 and a 256-channel memory case (~1 min)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    ap.add_argument("--skip-numpy", action="store_true", help="skip the (slow) numpy reference; errors then use ours "
                    "in float64 as the reference")
    ap.add_argument("--markdown", type=Path, metavar="JSON", help="print the table of a results file as Markdown "
                    "(the README's form) and exit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--channels", type=int, default=640, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.channels, args.size, args.device)
        return
    if args.markdown:
        results = json.loads(args.markdown.read_text())
        print(markdown_table(results["rows"], results["info"]))
        return

    # memory first, from a parent without torch: one 640-channel (quick: 256) 3×3 layer at 32×32 (quick: 16×16)
    load_before = load()
    channels, n_mem = (256, 16) if args.quick else (640, 32)
    print(f"# peak memory of one {channels}-channel 3×3 layer at {n_mem}×{n_mem}, each in a fresh process ...",
          flush=True)
    # ours three times each: glibc's per-thread arenas make one run's peak vary by a few hundred MiB; the largest is
    # reported (and the fastest time)
    mem = {task: worst_of(run_child(task, channels, n_mem, args.device) for _ in range(3 if "ours" in task else 1))
           for task in ("baseline", "ours-spectrum", "ours-clip", "research-spectrum")}
    mem["ours-spectrum-live"] = run_child("ours-spectrum", channels, n_mem, args.device, RETURN_FREED)
    print("peak RSS " + ", ".join(f"{k} {v['peak_rss_mib']:.0f} MiB ({v['seconds']:.1f} s)" for k, v in mem.items()),
          flush=True)

    _import_torch()
    from ttcompress.spectral.network import network_spectrum
    from ttcompress.tt import decompose

    device = torch.device(args.device)
    timer = Timer(device)
    started = dt.datetime.now().astimezone()
    info = {"date": started.isoformat(timespec="seconds"), "machine": machine(), "device": str(device),
            "network": "WRN-16-1" if args.quick else "WRN-16-10", "load_before": load_before, "quick": args.quick}
    print(f"# {info['network']} on {device} ({info['machine']['cpu']}, {info['machine']['cores']} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads), load average {info['load_before']}",
          flush=True)

    model = make_model(args.quick).to(device)
    convs = conv_list(model)
    rows: list[dict] = []
    results: dict = {"info": info, "rows": rows, "layers": [c[0] for c in convs]}

    # (a) numpy, paper App. B.1, float64: also the reference values
    refs: dict[str, np.ndarray] = {}
    if not args.skip_numpy:
        def numpy_all():
            for name, w, (n, _), g in convs:
                refs[name] = paper_numpy(w.double().cpu().numpy(), (n, n), g.stride[0])
        _, t_numpy = timer(numpy_all)
        print(f"numpy (App. B.1, float64)         {t_numpy:8.1f} s", flush=True)
    else:
        t_numpy = None
        for name, w, (n, _), g in convs:
            refs[name] = periodic.singular_values(w, (n, n), g, dtype=torch.float64).cpu().numpy()

    # (b) research approach: svdvals complex64, full grid
    research: dict[str, torch.Tensor] = {}

    def research_all():
        for name, w, (n, _), g in convs:
            research[name] = research_svdvals(w, n, g.stride[0])
    _, t_research = timer(research_all)
    err_research = max(rel_err(research[k], refs[k]) for k in refs)
    print(f"research (svdvals c64, full grid) {t_research:8.1f} s   err {err_research:.1e}", flush=True)

    # (c) floor: batched complex64 eigvalsh, one Gram per distinct frequency, eigvalsh alone
    grams = {name: floor_grams(w, n, g.stride[0]) for name, w, (n, _), g in convs}
    floor_vals: dict[str, torch.Tensor] = {}

    def floor_all():
        for name, gm in grams.items():
            floor_vals[name] = torch.linalg.eigvalsh(gm)
    _, t_floor = timer(floor_all)
    half = {name: periodic.HalfGrid.of((n // g.stride[0],) * 2).weight.to(device) for name, _, (n, _), g in convs}

    def floor_spectrum(name: str) -> torch.Tensor:
        return floor_vals[name].double().clamp(min=0).sqrt().repeat_interleave(half[name], 0).flatten()
    err_floor = max(rel_err(floor_spectrum(k), refs[k]) for k in refs)
    workers = workers_for(device)

    _, t_floor_threaded = timer(lambda: floor_vals.update(floor_eigvalsh(grams, workers)))
    print(f"floor (eigvalsh c64, half grid)   {t_floor:8.1f} s   err {err_floor:.1e}   "
          f"({workers} worker threads: {t_floor_threaded:.1f} s)", flush=True)

    # (d) ours
    ours, t_ours = timer(lambda: network_spectrum(model, (3, 32, 32), net=model.net))
    ours_vals = {s.name: s.values for s in ours}
    err_ours = max(rel_err(ours_vals[k], refs[k]) for k in refs)
    print(f"ttcompress network_spectrum       {t_ours:8.1f} s   err {err_ours:.1e}", flush=True)
    ours64, t_ours64 = timer(lambda: network_spectrum(model, (3, 32, 32), net=model.net, dtype=torch.float64))
    err_ours64 = max(rel_err(s.values, refs[s.name]) for s in ours64)
    print(f"ttcompress network_spectrum f64   {t_ours64:8.1f} s   err {err_ours64:.1e}", flush=True)

    ref_name = "numpy App. B.1 (float64)" if t_numpy is not None else "(numpy skipped)"
    if t_numpy is not None:
        rows.append({"task": "spectrum, all convs", "reference": ref_name, "ref_s": t_numpy, "ours": "network_spectrum",
                     "ours_s": t_ours, "speedup": t_numpy / t_ours, "ref_err": 0.0, "ours_err": err_ours})
    rows.append({"task": "spectrum, all convs", "reference": "svdvals c64 full grid", "ref_s": t_research,
                 "ours": "network_spectrum", "ours_s": t_ours, "speedup": t_research / t_ours,
                 "ref_err": err_research, "ours_err": err_ours})
    rows.append({"task": "spectrum, all convs", "reference": "eigvalsh c64 floor", "ref_s": t_floor,
                 "ours": "network_spectrum", "ours_s": t_ours, "speedup": t_floor / t_ours, "ref_err": err_floor,
                 "ours_err": err_ours, "note": "ours/floor = %.2f" % (t_ours / t_floor)})
    rows.append({"task": "spectrum, all convs", "reference": f"eigvalsh c64 floor, {workers} threads",
                 "ref_s": t_floor_threaded, "ours": "network_spectrum", "ours_s": t_ours,
                 "speedup": t_floor_threaded / t_ours, "ref_err": err_floor, "ours_err": err_ours,
                 "note": "floor threaded like ours"})
    rows.append({"task": "spectrum, all convs (float64)", "reference": ref_name, "ref_s": t_numpy,
                 "ours": "network_spectrum f64", "ours_s": t_ours64,
                 "speedup": None if t_numpy is None else t_numpy / t_ours64, "ref_err": 0.0, "ours_err": err_ours64})

    # TT versus dense (ours)
    rank = 8 if args.quick else 192
    tt_model = copy.deepcopy(model)
    decompose(tt_model.net, rank=rank)
    tt_spec, t_tt = timer(lambda: network_spectrum(tt_model, (3, 32, 32), net=tt_model.net))
    tt_layers = [s.name for s in tt_spec if s.kind == "tt"]
    # check: the TT layers' spectra against the spectra of their composed dense kernels
    tt_err = 0.0
    modules = dict(tt_model.net.named_modules())
    for s in tt_spec:
        if s.kind != "tt":
            continue
        layer = modules[s.name]
        dense = periodic.singular_values(layer.dense_weight().detach(), s.input_size, Geometry.of(layer))
        tt_err = max(tt_err, float((s.values.to(dense.device) - dense.double()).abs().max() / dense[0]))
    print(f"ttcompress TT rank {rank:<3d}            {t_tt:8.1f} s   ({len(tt_layers)} TT layers; "
          f"err vs composed dense {tt_err:.1e})", flush=True)
    rows.append({"task": f"spectrum, TT rank {rank} vs dense", "reference": "network_spectrum (dense)", "ref_s": t_ours,
                 "ours": "network_spectrum (TT)", "ours_s": t_tt, "speedup": t_ours / t_tt, "ref_err": err_ours,
                 "ours_err": tt_err, "note": f"TT err: vs its composed dense kernel; {len(convs) - len(tt_layers)} "
                 "convs stay dense (TT would not shrink them)"})
    # the same, restricted to the convs that TT replaces; and the convs it keeps dense (the same work in both
    # networks, so they cap the ratio at dense / kept even if the TT layers cost nothing)
    from ttcompress.spectral.network import effective_kernel, layer_spectrum

    dense_modules = dict(model.net.named_modules())
    sizes = {s.name: s.input_size for s in tt_spec}
    kept = [s.name for s in tt_spec if s.kind != "tt"]
    _, t_dense_part = timer(lambda: [layer_spectrum(k, dense_modules[k], sizes[k]) for k in tt_layers])
    _, t_tt_part = timer(lambda: [layer_spectrum(k, modules[k], sizes[k]) for k in tt_layers])
    _, t_kept = timer(lambda: [layer_spectrum(k, modules[k], sizes[k]) for k in kept])
    ceiling = (f"the {len(kept)} convs kept dense take {t_kept:.2f} s in both networks: even free TT layers would "
               f"give at most {t_ours / t_kept:.1f}×") if kept else "no conv stays dense"
    # the figure of merit for TT against dense (issue 17): the speed-up per conv that TT replaces — the network's
    # ratio also counts the convs TT keeps dense, which cost the same on both sides
    print(f"  figure of merit, TT rank {rank} vs dense per replaced conv: ×{t_dense_part / t_tt_part:.1f} (the "
          f"{len(tt_layers)} convs TT replaces: dense {t_dense_part:.1f} s, TT {t_tt_part:.1f} s); {ceiling}",
          flush=True)
    rows.append({"task": f"**figure of merit**: spectrum of the {len(tt_layers)} convs TT replaces, TT rank {rank} "
                 "vs dense", "reference": "layer_spectrum (dense)",
                 "ref_s": t_dense_part, "ours": "layer_spectrum (TT)", "ours_s": t_tt_part,
                 "speedup": t_dense_part / t_tt_part, "ref_err": None, "ours_err": None, "note": ceiling})
    # the eigvalsh floor on the TT network (its layers' QR-folded cores), threaded like ours
    grams_tt = {name: floor_grams(effective_kernel(modules[name])[0].detach(), n, g.stride[0])
                for name, _, (n, _), g in convs}
    _, t_floor_tt = timer(lambda: floor_eigvalsh(grams_tt, workers))
    del grams_tt
    print(f"floor on the TT network ({workers} threads) {t_floor_tt:6.1f} s   (floor's own TT/dense ratio "
          f"{t_floor_threaded / t_floor_tt:.2f}×)", flush=True)
    rows.append({"task": f"spectrum, TT rank {rank} vs dense, floor on both", "reference":
                 f"eigvalsh c64 floor (dense), {workers} threads", "ref_s": t_floor_threaded,
                 "ours": "eigvalsh c64 floor (TT)", "ours_s": t_floor_tt, "speedup": t_floor_threaded / t_floor_tt,
                 "ref_err": None, "ours_err": None, "note": "the obvious approach's own TT/dense ratio"})
    rows.append({"task": f"spectrum, TT rank {rank} network", "reference": f"eigvalsh c64 floor, {workers} threads",
                 "ref_s": t_floor_tt, "ours": "network_spectrum (TT)", "ours_s": t_tt, "speedup": t_floor_tt / t_tt,
                 "ref_err": None, "ours_err": tt_err, "note": "ours/floor = %.2f" % (t_tt / t_floor_tt)})

    # one clip pass to 1
    bound = 1.0
    clipped_research: dict[str, torch.Tensor] = {}
    clipped_ours: dict[str, torch.Tensor] = {}

    def clip_research_all():
        for name, w, (n, _), g in convs:
            clipped_research[name] = research_clip(w, n, g.stride[0], bound)

    def clip_ours_all():
        for name, w, size, g in convs:
            clipped_ours[name] = periodic.clip(w, size, bound, g)
    _, t_clip_research = timer(clip_research_all)
    print(f"research clip (svd c64 full grid) {t_clip_research:8.1f} s", flush=True)
    _, t_clip_ours = timer(clip_ours_all)
    print(f"ttcompress clip                   {t_clip_ours:8.1f} s", flush=True)
    clip_err_ours = clip_err_research = agree = 0.0
    sigma_after = 0.0
    for name, w, size, g in convs:
        exact = periodic.clip(w, size, bound, g, dtype=torch.float64)
        scale = float(exact.abs().max())
        clip_err_ours = max(clip_err_ours, float((clipped_ours[name].double() - exact).abs().max()) / scale)
        clip_err_research = max(clip_err_research, float((clipped_research[name].double() - exact).abs().max()) / scale)
        agree = max(agree, float((clipped_ours[name] - clipped_research[name]).abs().max()) / scale)
        sigma_after = max(sigma_after, float(periodic.singular_values(clipped_ours[name], size, g)[0]))
    sigma_before = max(float(ours_vals[k][0]) for k in ours_vals)
    print(f"  clipped kernels: max |ours − float64 clip| {clip_err_ours:.1e}, research {clip_err_research:.1e}, "
          f"ours vs research {agree:.1e} (× max|kernel|); σmax {sigma_before:.4f} → {sigma_after:.4f}", flush=True)
    rows.append({"task": f"clip to {bound:g}, all convs", "reference": "svd c64 full grid + ifft2 + crop",
                 "ref_s": t_clip_research, "ours": "periodic.clip", "ours_s": t_clip_ours,
                 "speedup": t_clip_research / t_clip_ours, "ref_err": clip_err_research, "ours_err": clip_err_ours,
                 "note": f"err: max|Δkernel| vs float64 clip / max|kernel|; σmax {sigma_before:.3f} → "
                         f"{sigma_after:.3f} after one pass"})
    # the clip pass on the TT network: TT layers through their QR-folded core (as ttcompress.control does)
    def clip_tt_all():
        for name, layer in tt_convs:
            kernel, _ = effective_kernel(layer)
            periodic.clip(kernel, sizes[name], bound, Geometry.of(layer))
    tt_convs = [(name, modules[name]) for name, *_ in convs]
    _, t_clip_tt = timer(clip_tt_all)
    print(f"ttcompress clip, TT rank {rank}        {t_clip_tt:8.1f} s", flush=True)
    rows.append({"task": f"clip to {bound:g}, TT rank {rank} vs dense", "reference": "periodic.clip (dense)",
                 "ref_s": t_clip_ours, "ours": "periodic.clip (TT cores)", "ours_s": t_clip_tt,
                 "speedup": t_clip_ours / t_clip_tt, "ref_err": None, "ours_err": None})
    # a bound below almost every frequency's σmax: no frequency can be skipped
    low = 0.25
    _, t_clip_low = timer(lambda: [periodic.clip(w, size, low, g) for _, w, size, g in convs])
    print(f"ttcompress clip to {low:g} (dense)     {t_clip_low:8.1f} s", flush=True)
    rows.append({"task": f"clip to {low:g}, all convs", "reference": "svd c64 full grid (time is bound-independent, "
                 f"measured at {bound:g})", "ref_s": t_clip_research, "ours": "periodic.clip", "ours_s": t_clip_low,
                 "speedup": t_clip_research / t_clip_low, "ref_err": None, "ours_err": None,
                 "note": "every frequency active: no skipping"})

    results["memory"] = {"channels": channels, "size": n_mem, **mem}
    rows.append({"task": f"peak RSS, {channels}-ch 3×3 layer at {n_mem}×{n_mem}", "reference": "svdvals c64 full grid",
                 "ref_s": mem["research-spectrum"]["seconds"], "ours": "singular_values",
                 "ours_s": mem["ours-spectrum"]["seconds"],
                 "speedup": mem["research-spectrum"]["seconds"] / mem["ours-spectrum"]["seconds"],
                 "ref_mib": mem["research-spectrum"]["peak_rss_mib"], "ours_mib": mem["ours-spectrum"]["peak_rss_mib"],
                 "note": f"process baseline (torch imported, kernel built) {mem['baseline']['peak_rss_mib']:.0f} MiB; "
                         f"ours {' / '.join(f'{v:.0f}' for v in mem['ours-spectrum']['runs_peak_rss_mib'])} MiB in "
                         f"three runs, {mem['ours-spectrum-live']['peak_rss_mib']:.0f} MiB with freed memory returned "
                         f"at once (MALLOC_MMAP_THRESHOLD_=1 MiB); clip {mem['ours-clip']['peak_rss_mib']:.0f} MiB"})

    info["load_after"] = load()
    info["seconds_total"] = round((dt.datetime.now().astimezone() - started).total_seconds(), 1)
    print_table(rows, info)
    out = args.out or RESULTS / ("spectrum_bench_quick.json" if args.quick else "spectrum_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


def fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def print_table(rows: list[dict], info: dict) -> None:
    print()
    print(f"{info['network']}, {info['device']}, {info['machine']['cpu']} ({info['machine']['cores']} cores), "
          f"{info['date']}, load average before {info['load_before']} after {info['load_after']}")
    header = ("task", "reference", "ref time", "ours", "our time", "speedup", "ref err", "our err", "")
    lines = [header]
    for r in rows:
        if "ref_mib" in r:
            lines.append((r["task"], r["reference"], f"{r['ref_mib']:.0f} MiB / {r['ref_s']:.1f} s", r["ours"],
                          f"{r['ours_mib']:.0f} MiB / {r['ours_s']:.1f} s", f"{r['speedup']:.1f}×", "", "",
                          r.get("note", "")))
            continue
        lines.append((r["task"], r["reference"], fmt(r["ref_s"], ".1f") + " s", r["ours"], f"{r['ours_s']:.1f} s",
                      fmt(r["speedup"], ".2f") + "×", fmt(r["ref_err"], ".1e"), fmt(r["ours_err"], ".1e"),
                      r.get("note", "")))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("errors: spectra — max |value − float64 reference| / σmax over all layers; clip — max |Δkernel| / max|kernel|")


def markdown_table(rows: list[dict], info: dict) -> str:
    m = info["machine"]
    lines = [f"`python benchmarks/spectrum_bench.py`, {info['network']}, random weights, 32×32 inputs, {m['cores']}-core "
             f"{m['cpu']} CPU, torch {m['torch']}, run {info['date'].replace('T', ' ')[:16]} (load average "
             f"before/after: {info['load_before'][0]} / {info['load_after'][0]}):", "",
             "| task | reference | ref. time | ttcompress | time | ratio | max error / σmax (ref, ours) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        note = f" ({r['note']})" if r.get("note") else ""
        if "ref_mib" in r:
            lines.append(f"| {r['task']} | {r['reference']} | {r['ref_mib']:.0f} MiB peak | {r['ours']} | "
                         f"{r['ours_mib']:.0f} MiB peak | | {note.strip(' ()')} |")
            continue
        ref_s = "—" if r["ref_s"] is None else f"{r['ref_s']:.1f} s"
        ratio = "—" if r["speedup"] is None else f"×{r['speedup']:.2f}"
        lines.append(f"| {r['task']} | {r['reference']} | {ref_s} | {r['ours']} | {r['ours_s']:.1f} s | {ratio} | "
                     f"{fmt(r['ref_err'], '.1e')}, {fmt(r['ours_err'], '.1e')}{note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
