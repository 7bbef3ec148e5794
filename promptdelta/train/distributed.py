"""Data-parallel training on torch.distributed (gloo on CPU, NCCL on GPU), plus a local launcher.

Design (the simplest correct thing for delta tuning):

* Every rank draws the *same* epoch order (same seed); each global batch of ``batch_size`` examples is cut
  into ``world_size`` contiguous shards (:func:`shard`), one per rank. This is the distributed sampler.
* Each rank weights its shard's mean loss by ``len(shard) / len(global batch)`` and, after backward, the
  gradients of the *trainable* parameters only are summed over ranks with one all-reduce of a flat buffer
  (:func:`all_reduce_grads`). The sum is exactly the gradient of the global-batch mean loss, so a run on N
  ranks matches a 1-process run with the same global batch (within float tolerance) -- for a model without
  dropout: each rank draws its own dropout masks, so with dropout the runs agree only in distribution.
  We do not wrap the model in ``DistributedDataParallel``: the Trainer calls ``model.loss(batch)``, not
  ``forward``, frozen backbone weights must not be synchronised, and gradient accumulation needs one
  reduction per optimizer step; an explicit all-reduce does all three with no wrapper. FSDP is left out.
* Only rank 0 writes files and logs; metrics are computed from predictions gathered from all ranks.

``launch(nproc, argv)`` starts ``nproc`` local processes through ``torch.distributed.run`` (torchrun).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from promptdelta.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the number of ranks, and whether it is rank 0."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_is_main() -> bool:
    """Whether this process is rank 0 (or the only process), from torchrun's ``RANK``; usable before the
    process group is joined."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(device: str) -> str:
    """Under torchrun, ``"cuda"`` becomes ``"cuda:<LOCAL_RANK>"`` so each rank gets its own GPU."""
    if device == "cuda" and env_world_size() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def init_distributed(device: str) -> DistContext:
    """Join the process group described by torchrun's environment (no-op for a single process).

    Backend: NCCL when training on CUDA, gloo otherwise. An already initialised group is reused."""
    if not dist.is_available() or (env_world_size() <= 1 and not dist.is_initialized()):
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch; shares differ in size by at most one."""
    n = len(indices)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(indices[start:start + base + (1 if rank < extra else 0)])


def all_reduce_grads(params: Sequence[torch.Tensor], extras: Sequence[float] = ()) -> list[float]:
    """Sum the gradients of ``params`` (missing grads count as zeros) and the floats ``extras`` over ranks,
    with one all-reduce of a flat buffer. Returns the summed extras."""
    chunks = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    device = params[0].device if params else torch.device("cpu")
    chunks.append(torch.tensor(list(extras), dtype=torch.float32, device=device))
    flat = torch.cat(chunks)                                   # (sum of numel + len(extras),)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
    return flat[offset:].tolist()


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (in rank order) on every rank; ``[obj]`` without distribution."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def launch(nproc: int, argv: Sequence[str], *, module: str | None = "promptdelta.cli",
           script: str | None = None, env: dict[str, str] | None = None) -> int:
    """Run ``python -m <module> <argv>`` (or ``python <script> <argv>``) on ``nproc`` local ranks via torchrun.

    Returns the exit code (non-zero when any rank failed). ``promptdelta run --nproc N ...`` maps onto
    ``launch(N, ["run", ...])``."""
    if nproc < 1:
        raise ConfigError(f"nproc={nproc} must be >= 1; pass the number of local processes, e.g. --nproc 2")
    target = [script] if script is not None else ["-m", module]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *target, *argv]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, check=False).returncode
