"""Data-parallel training over torch.distributed workers (gloo on CPU, NCCL on GPU),
as `torchrun` starts them: on one machine or several (`--nnodes`).

Pre-training splits each batch over the workers and sums their gradients
(`MeanLossGradient`). DP-SGD (`privacy.dp_sgd`): every worker computes the
clipped per-example gradient sum of its share of the logical batch; the shares
are summed across workers and the Gaussian noise is added exactly once, by rank
0, with the same sigma as one process would use (not once per worker, and not
sigma/sqrt(workers)). Poisson sampling, the noise and each step's draw seed come
from rank 0's secret randomness; the batch and the draw seed are broadcast.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dpsynth.devices import torchrun_process


@dataclass(frozen=True)
class Workers:
    """This process's place among the data-parallel workers (1 process: rank 0 of 1).

    `group`: a torch.distributed process group is joined, and the collectives run
    through it, also for a world of one (torchrun with one GPU: NCCL runs).
    """

    rank: int = 0
    world_size: int = 1
    group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(timeout_s: int = 300) -> "Workers":
        """Join the process group `torchrun` describes (even of one worker), else one
        process with no group."""
        process = torchrun_process()
        if process.world_size == 1 and not process.launched:
            return Workers()
        if not dist.is_initialized():
            # gloo for the CPU tensors (the broadcast batch, the agreement flags:
            # randomness stays on the CPU), NCCL for the gradients on GPUs
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return Workers(dist.get_rank(), dist.get_world_size(), group=True)

    def broadcast_step(self, batch: torch.Tensor | None, draw_seed: int | None
                       ) -> tuple[torch.Tensor, int]:
        """Rank 0's logical batch (variable size) and draw seed, on every worker.

        Both come from rank 0's secret randomness; the other workers pass None.
        """
        if not self.group:
            assert batch is not None and draw_seed is not None
            return batch, draw_seed
        header = torch.tensor([len(batch), draw_seed] if self.is_main and batch is not None
                              and draw_seed is not None else [0, 0], dtype=torch.int64)
        dist.broadcast(header, src=0)
        size, seed = int(header[0]), int(header[1])
        out = batch if self.is_main else torch.empty(size, dtype=torch.int64)
        if size:
            dist.broadcast(out, src=0)
        return out, seed

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This worker's examples of the logical batch (strided split)."""
        return batch[self.rank::self.world_size]

    def sum(self, tensors: dict[str, torch.Tensor]) -> None:
        """In-place sum over workers."""
        if self.group:
            for t in tensors.values():
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum `.grad` over workers in place, in one all-reduce of their concatenation
        (a parameter without a gradient counts as zeros on this worker)."""
        if not self.group:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g)
            offset += n

    def sum_value(self, value: float) -> float:
        """`value` summed over workers (a float64 all-reduce; itself with one worker)."""
        if not self.group:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t)

    def same(self, value: int) -> bool:
        """True on every worker iff every worker passed the same `value` (e.g. the step
        each resumed from)."""
        if not self.group:
            return True
        t = torch.tensor([value, -value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0]) == -int(t[1])  # max(value) == min(value)

    def agree(self, ok: bool) -> bool:
        """True on every worker iff `ok` on every worker (e.g. rank 0's ledger check)."""
        if not self.group:
            return ok
        flag = torch.tensor([0 if ok else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        return int(flag) == 0
