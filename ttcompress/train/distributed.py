"""Data-parallel runs under ``torchrun``: which rank this is, collectives, and the device each rank trains on."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from ttcompress.device import pick_device

__all__ = ["Dist", "setup_distributed"]


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def broadcast(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.broadcast(tensor, src=0)

    def all_finite(self, flag: torch.Tensor) -> bool:
        if self.active:
            import torch.distributed as dist

            flag = flag.float()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            # A gloo worker thread drops the last finished collective's tensors after the caller has moved on, and
            # that needs the GIL.  If the interpreter starts finalising first, the thread is killed inside the
            # destructor and the process aborts ("terminate called without an active exception", SIGABRT): seen
            # in 1 of 8 two-rank CPU runs, the abort in ProcessGroupGloo::runLoop per gdb.  Releasing the GIL for
            # a moment lets those threads finish.
            time.sleep(0.05)


def setup_distributed(device_spec: str) -> tuple[Dist, torch.device]:
    """This process's place in the run (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, world size > 1: the process group
    is initialised, nccl on CUDA, gloo on CPU) and its device."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if dist.is_available() and dist.is_initialized():
        ctx = Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=False)
    elif world > 1 and "RANK" in os.environ:
        ctx = Dist(int(os.environ["RANK"]), world, local_rank, owns_group=True)
    else:
        ctx = Dist()
    device = pick_device(device_spec, ctx.local_rank if ctx.world_size > 1 else None)
    if ctx.owns_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return ctx, device
