"""Which process this is, when a scan runs under torchrun or `accelerate launch` (both set RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous variables; accelerate's multi-CPU launch through mpirun sets the MPI equivalents),
and the few collectives a scan needs.

Why this little: shards are independent, so ranks only have to agree on which shards are left (rank 0 decides and
broadcasts) and wait for each other before rank 0 merges. A process group is created only when WORLD_SIZE > 1:
gloo on the CPU, nccl on CUDA.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

TIMEOUT = datetime.timedelta(hours=24)  # a rank that finishes its shards early waits at the final barrier
# the variables accelerate itself reads, torchrun's first, then Open MPI, MVAPICH, Intel MPI / MPICH
RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")
SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE")
LOCAL_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


def _first(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @classmethod
    def from_env(cls) -> "World":
        return cls(_first(RANK_VARS, 0), _first(SIZE_VARS, 1), _first(LOCAL_VARS, 0))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """The device this rank scores on: with CUDA, one GPU per local rank."""
        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}" if self.size > 1 else "cuda"
        return "cpu" if requested == "auto" else requested

    def start(self, device: str) -> None:
        if self.size <= 1:
            return
        import torch.distributed as dist

        self.backend = "nccl" if device.startswith("cuda") else "gloo"
        if self.backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        if not dist.is_initialized():
            dist.init_process_group(self.backend, timeout=TIMEOUT, rank=self.rank, world_size=self.size)

    def barrier(self) -> None:
        if self.backend is None:
            return
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's `value` on every rank."""
        if self.backend is None:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def stop(self) -> None:
        if self.backend is None:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.backend = None
