"""The three networks the budget and latency benchmarks measure, and the machine record they share.

``resnet20``: the shared pretrained ResNet-20 (``../shared/models/resnet20-12fca82f.th``); ``wrn16-10``: the paper's
WideResNet-16-10, random weights (seed 0); ``resnet18``: the demo's CIFAR-10 ResNet-18 from the pyautoattack wheel.
A network whose file is missing is left out with a note.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared"
RESNET20 = SHARED / "models" / "resnet20-12fca82f.th"
CIFAR_SAMPLE = SHARED / "data" / "cifar10-sample.npz"
NAMES = ("resnet20", "wrn16-10", "resnet18")


def load_net(name: str):
    """A :class:`ttcompress.checkpoint.LoadedModel`, or None (with a note on stderr) when its file is missing."""
    from ttcompress import checkpoint as ck
    from ttcompress.demo import default_model

    if name == "resnet20":
        if not RESNET20.exists():
            print(f"skipping resnet20: {RESNET20} not found", file=sys.stderr)
            return None
        return ck.load(RESNET20, arch="resnet20")
    if name == "wrn16-10":
        return ck.initialize("wrn16-10", seed=0)
    if name == "resnet18":
        path, arch, _ = default_model()
        if arch != "resnet18-cifar":
            print("skipping resnet18: the pyautoattack wheel is not installed", file=sys.stderr)
            return None
        return ck.load(path, arch=arch)
    raise ValueError(f"unknown network {name!r}; choose from {NAMES}")


def machine(device: str) -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": device, "load_average": [round(x, 2) for x in os.getloadavg()]}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
