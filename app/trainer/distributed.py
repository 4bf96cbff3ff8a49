"""Data parallelism on torch.distributed: the process group from torchrun's environment, each rank's rows of
a global batch, and the few collectives the loop needs (gradients themselves are averaged by DDP)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives  # public autograd all_gather is deprecated

from app.core.devices import pick_device


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; world_size 1 (no process group) is a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone writes checkpoints, outputs, logs and progress bars."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def device(self, name: str) -> torch.device:
        """`auto` / `cuda` become this rank's own GPU (cuda:LOCAL_RANK)."""
        dev = torch.device(pick_device(name))
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", self.local_rank)
        return dev

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of n globally drawn rows (n divisible by world_size)."""
        share = n // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def gather_rows(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's rows concatenated along dim, with gradients flowing back to each rank's own rows."""
        if not self.active:
            return x
        world = dist.group.WORLD
        assert world is not None, "an active run has initialised the process group"
        out = collectives.all_gather_single_autograd(x.contiguous(), dim, world)
        # Wait now: a gathered tensor the losses never read would otherwise stay an unwaited collective.
        return out.wait() if isinstance(out, collectives.AsyncCollectiveTensor) else out

    def agree(self, flag: bool, device) -> bool:
        """Rank 0's decision on every rank (e.g. a time limit), so no rank leaves the loop alone."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def same_everywhere(self, value: int, device, what: str) -> None:
        """Refuse to train when ranks disagree (e.g. one saw a checkpoint the others did not)."""
        if not self.active:
            return
        t = torch.tensor([value], device=device, dtype=torch.long)
        lo, hi = t.clone(), t.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if lo.item() != hi.item():
            raise ValueError(f"ranks disagree on {what} ({lo.item()} vs {hi.item()}): "
                             "is the checkpoint on storage every node sees?")

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. builds a data cache), the others after it, reading its result."""
        if self.active and not self.main:
            dist.barrier()
        yield
        if self.active and self.main:
            dist.barrier()


def from_env(device: str = "auto") -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    nccl on CUDA, gloo on CPU. Without WORLD_SIZE > 1 this is a single-process run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dev = d.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return d


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
