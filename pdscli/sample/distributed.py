"""torchrun / torch.distributed: joining the process group, and the few collectives a run uses.

A run's batches are planned once and dealt to ranks whole (pdscli.sample.run); every sample's
noise is a function of (seed, index) and the draw (pdscli.noise), so which rank makes which batch
changes nothing in the images. Collectives (`barrier`, `sum`, `max`) are only used where every
rank joins them in the same order. `Dist()` is the single process: every collective a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

from pdscli.errors import PdsError


def torchrun_env() -> bool:
    """True when started by torchrun (or any launcher that sets the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def sum(self, value: int) -> int:
        return int(self._reduce(value, torch.distributed.ReduceOp.SUM)) if self.active else int(value)

    def max(self, value: int) -> int:
        return int(self._reduce(value, torch.distributed.ReduceOp.MAX)) if self.active else int(value)

    def _reduce(self, value, op):
        t = torch.tensor([value], dtype=torch.int64, device=self._collective_device())
        torch.distributed.all_reduce(t, op=op)
        return t.item()

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. builds an engine file), the others after it."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def setup(device_spec: str = "auto") -> tuple[Dist, str]:
    """Join the torchrun process group if there is one; return it and the device spec to use.

    NCCL on GPUs, Gloo on CPU; each rank takes its local GPU (LOCAL_RANK).
    """
    if not torchrun_env():
        return Dist(), device_spec
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    spec = (device_spec or "auto").lower()
    use_cuda = spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise PdsError(f"--device {device_spec}: no CUDA GPU is visible on rank {rank}")
        if spec not in ("auto", "cuda"):
            raise PdsError("under torchrun each rank uses its local GPU: pass --device cuda or auto, not a GPU index")
        if local_rank >= torch.cuda.device_count():
            raise PdsError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node")
        torch.cuda.set_device(local_rank)
        backend, spec = "nccl", f"cuda:{local_rank}"
    else:
        backend, spec = "gloo", "cpu"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return Dist(rank=rank, world_size=world, local_rank=local_rank, backend=backend), spec
