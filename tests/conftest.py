from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHARED = HERE.parent.parent / "shared"
RESNET20 = SHARED / "models" / "resnet20-12fca82f.th"
CIFAR_SAMPLE = SHARED / "data" / "cifar10-sample.npz"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def resnet20_path() -> Path:
    if not RESNET20.exists():
        pytest.skip("../shared/models/resnet20-12fca82f.th not available")
    return RESNET20


@pytest.fixture
def cifar_sample_path() -> Path:
    if not CIFAR_SAMPLE.exists():
        pytest.skip("../shared/data/cifar10-sample.npz not available")
    return CIFAR_SAMPLE


@pytest.fixture
def one_thread():
    """Many tiny LAPACK calls: one thread avoids OpenMP contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
