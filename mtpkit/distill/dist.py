"""Data parallelism over torch.distributed (torchrun): rank/world from the environment, a gloo (CPU) or
NCCL (CUDA) process group, and the few collectives training needs. A single process is world 1 and
every collective is a no-op, so the training code has one path.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as tdist


class Dist:
    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{self.local_rank}" if device == "cuda" else "cpu")
        self._owns_group = False
        if self.world > 1 and not tdist.is_initialized():
            if device == "cuda":
                torch.cuda.set_device(self.device)
            # data generation on rank 0 can take minutes before the next collective
            tdist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(minutes=60))
            self._owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over processes (returns t)."""
        if self.world > 1:
            tdist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on any (stop signals must agree, or collectives hang)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.sum_(t).item() > 0)

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite `tensors` in place with rank 0's values (identical starting weights everywhere)."""
        if self.world > 1:
            for t in tensors:
                tdist.broadcast(t.data, 0)

    def sum_grads_(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over processes with one flat all-reduce."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.sum_(flat)
        off = 0
        for p in params:
            n = p.numel()
            p.grad = flat[off:off + n].view_as(p).clone()
            off += n

    def close(self, ok: bool = True) -> None:
        """Tear the group down. After a run that ended normally every process first meets at a barrier: a
        process that destroys its gloo pairs while a peer still has a collective in flight can make the peer
        abort (`terminate called without an active exception`). After an error there is no barrier (the
        other processes may never get there)."""
        if self._owns_group and tdist.is_initialized():
            if ok:
                tdist.barrier()
            tdist.destroy_process_group()
