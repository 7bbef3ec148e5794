"""Data-parallel and fully sharded training on torch.distributed (gloo on CPU, NCCL on GPU), plus a local
launcher.

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
  reduction per optimizer step; an explicit all-reduce does all three with no wrapper.
* FSDP (``TrainConfig(fsdp=True)``, :func:`shard_model`), for backbones too large for one device: PyTorch's
  FSDP2 ``fully_shard`` is applied to each backbone layer (:func:`fsdp_units`), then to a root
  (:class:`FSDPRoot`) whose forward runs ``model.loss`` or ``model(batch)``, so every parameter -- the frozen
  backbone included -- is a dim-0 shard (a ``DTensor``) between forward passes, all-gathered one layer at a
  time. The optimizer holds only the (sharded) trainable parameters. FSDP itself reduce-scatters their
  gradients after each backward, set to a plain *sum* (divide factor 1: the per-rank loss weights above
  already make the sum the global-batch gradient; FSDP's default would average). Every rank must run the
  same forwards and backwards (each holds collectives), so a rank with an empty share runs one example of
  the micro-batch with weight 0, and prediction pads the shorter ranks with dummy batches. Checkpoints
  gather full tensors on every rank (:func:`full_tensor`, :func:`full_optimizer_state`) and rank 0 writes;
  resume cuts them back into shards (:func:`shard_like`); :func:`full_parameters` swaps in whole CPU
  tensors for saving deltas. Limits: no fp16 (use bf16), models need per-layer structure.
* Only rank 0 writes files and logs; metrics are computed from predictions gathered from all ranks.

``launch(nproc, argv)`` starts ``nproc`` local processes through ``torch.distributed.run`` (torchrun).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from promptdelta.errors import ConfigError

RUN_DONE_ENV = "PROMPTDELTA_RUN_DONE"   # a folder: rank 0 records the finished run, every rank its clean exit


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


def all_reduce_sum(values: Sequence[float], device: torch.device | str) -> list[float]:
    """Sum the floats ``values`` over ranks with one all-reduce (on ``device``: NCCL needs a GPU tensor)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# ---- FSDP ---------------------------------------------------------------------------------------------
class FSDPRoot(nn.Module):
    """The root FSDP unit around a model: ``root(batch)`` is ``model(batch)`` and ``root(batch, loss=True)``
    is ``model.loss(batch)``. FSDP's root hooks fire on ``forward`` only, and the Trainer also calls ``loss``
    (which reads embeddings, template and verbalizer outside any layer), so both go through here."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, Any], loss: bool = False) -> Any:
        return self.model.loss(batch) if loss else self.model(batch)


def _holds_stack_bias(layer: nn.Module) -> bool:
    """A native T5 block that owns the stack's relative position bias: the stack reads that embedding before
    the block runs, so the block cannot be its own FSDP unit (its weights would still be sharded then)."""
    return any(isinstance(getattr(m, "relative_attention_bias", None), nn.Module) for m in layer.modules())


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: every layer of every backbone inside ``model``.

    A native backbone's layers are the items of its family's layer stacks (``backbones.registry``; both T5
    stacks; a T5 block holding the stack's position bias stays with the root); a ``transformers`` model's are
    the items of its ``nn.ModuleList`` s whose class it names in ``_no_split_modules``. Raises
    :class:`ConfigError` when there is none."""
    from promptdelta.backbones.registry import family_of

    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        family = family_of(module)
        if family is not None:                                              # a native backbone
            for stack in family.layer_stacks(module):
                units.extend(layer for layer in stack if not _holds_stack_bias(layer))
            return
        names = set(getattr(module, "_no_split_modules", None) or ())      # a transformers model
        if names and hasattr(module, "config"):
            for sub in module.modules():    # its layer stacks, not e.g. BertEmbeddings (read outside forward)
                if isinstance(sub, nn.ModuleList):
                    units.extend(layer for layer in sub if type(layer).__name__ in names)
            return
        for child in module.children():
            visit(child)

    visit(model)
    if not units:
        raise ConfigError(f"train.fsdp=true shards a backbone layer by layer, but {type(model).__name__} holds no "
                          "backbone with per-layer structure (a native backbone of a registered family, or a transformers "
                          "model that names its layer class in _no_split_modules); set train.fsdp=false for "
                          "this model (data parallelism still works)")
    return units


def shard_model(model: nn.Module, device: str, ctx: DistContext,
                units: Sequence[nn.Module] | None = None) -> FSDPRoot:
    """Apply FSDP2 ``fully_shard`` to each of :func:`fsdp_units` (bottom-up), then to a :class:`FSDPRoot`
    around ``model`` (the embeddings, heads, template and verbalizer); returns the root, to call instead of
    the model. Parameters move to ``device`` one unit at a time and are resharded after every forward and
    backward. Gradient reduction is a plain sum over ranks (see the module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    units = fsdp_units(model) if units is None else units
    mesh = init_device_mesh(torch.device(device).type, (ctx.world_size,))
    root = FSDPRoot(model)
    for module in [*units, root]:
        fully_shard(module, mesh=mesh, reshard_after_forward=True)
        module.set_gradient_divide_factor(1.0)           # sum, not mean: each rank's loss carries its weight
        module.set_force_sum_reduction_for_comms(True)   # ReduceOp.SUM (gloo has neither AVG nor PREMUL_SUM)
    return root


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP shard (a collective: every rank must call it); others as they are."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full`` laid out as ``like`` (an FSDP parameter); ``full`` when ``like`` is not
    sharded. No communication: every rank holds the same ``full`` (e.g. read from one checkpoint)."""
    if not is_sharded(like):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def full_optimizer_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole (a collective)."""
    return {"state": {idx: {k: full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in per.items()}
                      for idx, per in state["state"].items()},
            "param_groups": state["param_groups"]}


def shard_optimizer_state(state: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Inverse of :func:`full_optimizer_state` for ``optimizer``: state tensors shaped like their parameter
    become shards laid out as it (``step`` and other scalars stay as they are)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]   # state_dict's index order
    out: dict[int, dict[str, Any]] = {}
    for idx, per in state["state"].items():
        p = params[int(idx)]
        out[idx] = {k: shard_like(v, p) if isinstance(v, torch.Tensor) and is_sharded(p) and v.shape == p.shape
                    else v for k, v in per.items()}
    return {"state": out, "param_groups": state["param_groups"]}


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every FSDP-sharded parameter of ``model`` is replaced by the whole tensor on CPU
    (tied parameters stay tied), for reading and saving -- not for forward passes; the shards come back
    after. A collective: every rank must enter. Without sharded parameters, the model as it is."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    whole: dict[int, nn.Parameter] = {}
    try:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None or not is_sharded(p):
                    continue
                if id(p) not in whole:
                    whole[id(p)] = nn.Parameter(p.detach().full_tensor().cpu(), requires_grad=p.requires_grad)
                swapped.append((module, name, p))
                module._parameters[name] = whole[id(p)]
        yield model
    finally:
        for module, name, p in reversed(swapped):
            module._parameters[name] = p


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


def shutdown_distributed(*, wait: bool = True) -> None:
    """Leave the process group; with ``wait``, after a barrier so no rank tears its gloo threads down while a
    peer still talks to it (pass ``wait=False`` on an error path, where peers may never arrive). A rank that
    exits with the group alive can abort in C++ ("terminate called without an active exception"), which
    torchrun reports as a failed run although the work was done."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        if wait:
            dist.barrier()
        dist.destroy_process_group()
        if wait and os.environ.get(RUN_DONE_ENV):      # left cleanly: the launcher knows who died late
            (Path(os.environ[RUN_DONE_ENV]) / f"rank{rank}.left").touch()


def mark_run_written(run_dir: str | os.PathLike, seeds: Sequence[int]) -> None:
    """Rank 0, after the last write of a launched run: record ``run_dir`` and its seeds for :func:`launch`."""
    folder = os.environ.get(RUN_DONE_ENV)
    if folder and Path(folder).is_dir():
        from promptdelta.utils.io import atomic_write_json

        atomic_write_json(Path(folder) / "run.json", {"run_dir": str(run_dir), "seeds": list(seeds)})


def finished_despite_failure(folder: str | os.PathLike, nproc: int) -> tuple[str, list[int]] | None:
    """``(run_dir, ranks that died late)`` when rank 0 recorded a complete run in ``folder`` (metrics.json holds
    a row for every seed), else None. A rank killed in shutdown fails torchrun although nothing was lost."""
    try:
        record = json.loads((Path(folder) / "run.json").read_text(encoding="utf-8"))
        rows = json.loads((Path(record["run_dir"]) / "metrics.json").read_text(encoding="utf-8"))["rows"]
        written = {r.get("seed") for r in rows if isinstance(r, dict)}
        if not record["seeds"] or not set(record["seeds"]) <= written:
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None                                  # no record or an unfinished run: a real failure
    late = [r for r in range(nproc) if not (Path(folder) / f"rank{r}.left").exists()]
    return str(record["run_dir"]), late


def launch(nproc: int, argv: Sequence[str], *, module: str | None = "promptdelta.cli",
           script: str | None = None, env: dict[str, str] | None = None) -> int:
    """Run ``python -m <module> <argv>`` (or ``python <script> <argv>``) on ``nproc`` local ranks via torchrun.

    Returns the exit code (non-zero when any rank failed). ``promptdelta run --nproc N ...`` maps onto
    ``launch(N, ["run", ...])``. A failure after rank 0 wrote the whole run (metrics.json with every seed, see
    :func:`mark_run_written`) is a success with a warning naming the rank(s) that died late."""
    if nproc < 1:
        raise ConfigError(f"nproc={nproc} must be >= 1; pass the number of local processes, e.g. --nproc 2")
    target = [script] if script is not None else ["-m", module]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *target, *argv]
    with tempfile.TemporaryDirectory(prefix="promptdelta-ranks-") as folder:
        rc = _run_launcher(cmd, {**os.environ, **(env or {}), RUN_DONE_ENV: folder})
        done = finished_despite_failure(folder, nproc) if rc != 0 else None
    if done is None:
        return rc
    run_dir, late = done
    who = f"rank(s) {', '.join(map(str, late))}" if late else "a rank"
    msg = (f"{who} of the {nproc}-process run died late (launcher exit code {rc}) after rank 0 wrote the whole "
           f"run {run_dir} (metrics.json has every seed); the run is complete, treated as a success")
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    print(f"warning: {msg}", file=sys.stderr, flush=True)
    return 0


def _run_launcher(cmd: list[str], env: dict[str, str]) -> int:
    """The torchrun agent's exit code (its own function so tests can stand in for the launcher)."""
    return subprocess.run(cmd, env=env, check=False).returncode
