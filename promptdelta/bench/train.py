"""Training knobs side by side: ``promptdelta bench train``.

(a) **Activation checkpointing, full fine-tuning.** The backbone plus a mean-pooling linear head (the model of
    ``promptdelta bench deltas``), every weight trainable, AdamW, one batch of ``batch x seq`` random tokens;
    once as is, once with ``gradient_checkpointing_enable()`` (and, with ``--bf16``, once under bf16
    autocast). Memory is measured by ``promptdelta.deltas.measure_training_memory`` -- parameters,
    gradients, AdamW state and the tensors autograd saved for backward (unique storages) -- in one real step.
    With checkpointing, backward also holds one layer's recomputed activations for a while: that transient
    is measured too (one layer's forward under the same saved-tensor count) and added to the total, so
    the two totals compare peak against peak. On CUDA the allocator's peak is shown as well. Step time:
    forward + backward + AdamW step, median over interleaved rounds.
(b) **Data parallelism, LoRA.** ``pd.Trainer`` trains LoRA (r=8 on the attention q/v projections) plus the
    head on synthetic examples, in 1 process and in ``nproc`` gloo processes (``train.distributed.launch``)
    with the same global batch; throughput is examples per second over the timed steps after a warm-up. The
    processes share ``threads`` CPU threads: 1 process uses all of them, each of N ranks ``threads // N``.
    This part always runs on CPU (gloo).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from promptdelta.bench.deltas import PooledClassifier, build_model, make_batch, train_step
from promptdelta.deltas import measure_training_memory
from promptdelta.deltas.ladder import MemoryReport
from promptdelta.errors import ConfigError
from promptdelta.train.distributed import launch
from promptdelta.utils.io import atomic_write_json

logger = logging.getLogger(__name__)
_MB = 2 ** 20


# --------------------------------------------------------------------------------------------- setup
def load_body(backbone: str, quick: bool) -> tuple[nn.Module, str]:
    """The backbone to benchmark: a tiny random native BERT in quick mode, else ``load_backbone(backbone)``."""
    if quick:
        from promptdelta.backbones.bert import BertConfig, BertModel

        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                         max_position_embeddings=64, has_pooler=False)
        return BertModel(cfg), "tiny random BERT (2 x 32)"
    from promptdelta.backbones import load_backbone

    model = load_backbone(backbone)[0]
    return model, f"{backbone} ({model.config.num_layers} x {model.config.hidden_size})"


def _check_sizes(body: nn.Module, **sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be an integer >= 1 (see promptdelta bench train --help)")
    limit = getattr(body.config, "max_position_embeddings", None)
    if limit is not None and sizes.get("seq", 0) > limit:
        raise ConfigError(f"seq={sizes['seq']} exceeds the backbone's {limit} positions; pass --seq {limit} or less")


# --------------------------------------------------------------------------------------------- (a) memory
@dataclass
class MemRow:
    """One variant of full fine-tuning: its model, optimizer, loss, memory and per-round step seconds."""

    name: str
    model: PooledClassifier
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[], torch.Tensor]
    memory: MemoryReport | None = None
    recompute: int = 0                       # bytes of one layer's activations rebuilt in backward
    times: list[float] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.memory.total + self.recompute


def _mem_row(body: nn.Module, name: str, data: dict[str, torch.Tensor], device: str, checkpointing: bool,
             bf16: bool) -> MemRow:
    model = build_model(body, "full").to(device)
    if checkpointing:
        model.backbone.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext

    def loss_fn() -> torch.Tensor:
        with autocast():
            logits = model(data["input_ids"], data["attention_mask"])        # (B, C)
        return F.cross_entropy(logits.float(), data["labels"])

    return MemRow(name, model, opt, loss_fn)


def recompute_bytes(row: MemRow) -> int:
    """Activations one checkpointed layer rebuilds in backward: the first layer run alone on the input it got
    in a real forward, counted like ``measure_training_memory`` counts them (its input excluded: the
    checkpoint already holds it)."""
    body = row.model.backbone
    layer = (body.layers if hasattr(body, "layers") else body.encoder.layers)[0]
    seen: dict[str, Any] = {}
    hook = layer.register_forward_pre_hook(lambda m, a, kw: seen.setdefault("in", (a, kw)), with_kwargs=True)
    try:
        with torch.no_grad():
            row.loss_fn()
    finally:
        hook.remove()
    args, kwargs = seen["in"]
    x = args[0].detach()
    probe = copy.deepcopy(layer).train()                  # measure_training_memory steps an optimizer on it

    def loss_fn() -> torch.Tensor:
        out = probe(x, *args[1:], **kwargs)
        return (out[0] if isinstance(out, tuple) else out).float().sum()    # GPT-2 / T5 blocks return tuples

    report = measure_training_memory(probe, loss_fn)
    return max(0, report.activations - x.untyped_storage().nbytes())


def _timed_step(row: MemRow, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_step(row)                                        # zero_grad, loss_fn, backward, optimizer.step
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def memory_rows(body: nn.Module, batch: int, seq: int, repeats: int, device: str, bf16: bool) -> list[MemRow]:
    data = make_batch(body.config.vocab_size, batch, seq, device)
    variants = [("full", False, False), ("full + ckpt", True, False)] + ([("full bf16", False, True)] if bf16 else [])
    rows = [_mem_row(body, name, data, device, ck, b) for name, ck, b in variants]
    for row, (_, ck, _) in zip(rows, variants):
        row.memory = measure_training_memory(row.model, row.loss_fn, row.optimizer)   # also the warm-up step
        row.recompute = recompute_bytes(row) if ck else 0
        train_step(row)                                                                # optimizer state in place
    for i in range(repeats):                              # interleaved: load on the machine hits all alike
        for row in rows[i % len(rows):] + rows[:i % len(rows)]:
            row.times.append(_timed_step(row, device))
    return rows


def format_memory(rows: list[MemRow], header: str) -> str:
    base, base_ms = rows[0], statistics.median(rows[0].times) * 1e3
    cuda = base.memory.device_peak is not None
    cols = (f"{'variant':12s} {'step ms':>9s} {'ratio':>6s} {'peak MB':>9s} {'ratio':>6s} {'param':>7s} "
            f"{'grad':>7s} {'optim':>7s} {'saved':>8s} {'recomp':>7s}")
    lines = [header, cols + (f" {'CUDA peak':>10s} {'ratio':>6s}" if cuda else "")]
    for r in rows:
        ms, m = statistics.median(r.times) * 1e3, r.memory
        line = (f"{r.name:12s} {ms:9.2f} {ms / base_ms:6.2f} {r.total / _MB:9.1f} {r.total / base.total:6.2f} "
                f"{m.parameters / _MB:7.1f} {m.gradients / _MB:7.1f} {m.optimizer_state / _MB:7.1f} "
                f"{m.activations / _MB:8.1f} {r.recompute / _MB:7.1f}")
        if cuda:
            line += f" {m.device_peak / _MB:10.1f} {m.device_peak / base.memory.device_peak:6.2f}"
        lines.append(line)
    lines.append("peak = parameters + gradients + AdamW state + activations saved for backward + (checkpointing) "
                 "one layer's activations recomputed in backward, MB, measured in one real step; step = forward + "
                 "backward + AdamW step, median ms; ratios are to the first row")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- (b) throughput
@dataclass
class TokenExample:
    ids: torch.Tensor                         # (T,)
    label: int


class TokenTask(nn.Module):
    """A PooledClassifier with the Trainer's model interface (``collate``, ``forward(batch)``, ``loss``)."""

    def __init__(self, clf: PooledClassifier) -> None:
        super().__init__()
        self.clf = clf

    def collate(self, examples: list[TokenExample]) -> dict[str, torch.Tensor]:
        ids = torch.stack([e.ids for e in examples])                                     # (B, T)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor([e.label for e in examples])}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.clf(batch["input_ids"], batch["attention_mask"])                      # (B, C)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch)
        return F.cross_entropy(logits, batch["labels"]), logits


def lora_throughput(backbone: str, quick: bool, batch: int, seq: int, steps: int, warmup: int) -> dict[str, Any]:
    """Train LoRA with ``pd.Trainer`` (under torchrun: data-parallel over the ranks); examples/s of the timed
    ``steps`` after ``warmup`` steps, at global batch ``batch``."""
    from promptdelta.train import Trainer

    body, _ = load_body(backbone, quick)
    data = make_batch(body.config.vocab_size, batch * (steps + warmup), seq, "cpu")
    examples = [TokenExample(ids, int(y)) for ids, y in zip(data["input_ids"], data["labels"])]
    model = TokenTask(build_model(body, "lora"))
    cfg = dict(lr=1e-4, batch_size=batch, warmup_ratio=0.0, progress=False, seed=0)
    Trainer(model, max_steps=warmup, **cfg).fit(examples)                       # also joins the process group
    timed = Trainer(model, max_steps=steps, **cfg).fit(examples)
    seconds = timed.train_time_s
    return {"world_size": timed.dist.world_size, "threads": torch.get_num_threads(), "steps": steps,
            "seconds": seconds, "examples_per_s": steps * batch / seconds}


def _in_process(threads: int, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def throughput_rows(backbone: str, quick: bool, batch: int, seq: int, steps: int, warmup: int, nproc: int,
                    threads: int) -> list[dict[str, Any]]:
    """1 process (here) and ``nproc`` gloo ranks (launched), same global batch, ``threads`` CPU threads in all."""
    one = _in_process(threads, lambda: lora_throughput(backbone, quick, batch, seq, steps, warmup))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        argv = ["--worker", "--out", str(out), "--backbone", backbone, "--batch", str(batch), "--seq", str(seq),
                "--steps", str(steps), "--warmup", str(warmup)] + (["--quick"] if quick else [])
        per_rank = max(1, threads // nproc)
        env = {"OMP_NUM_THREADS": str(per_rank), "PROMPTDELTA_BENCH_THREADS": str(per_rank)}
        rc = launch(nproc, argv, module="promptdelta.bench.train", env=env)
        if rc != 0 or not out.is_file():
            raise RuntimeError(f"the {nproc}-process LoRA run failed (exit code {rc}); see its output above")
        many = json.loads(out.read_text())
    return [one, many]


def format_throughput(rows: list[dict[str, Any]], header: str) -> str:
    base = rows[0]["examples_per_s"]
    lines = [header, f"{'processes':>9s} {'threads/proc':>12s} {'steps':>6s} {'seconds':>8s} {'examples/s':>11s} "
                     f"{'speed-up':>8s}"]
    for r in rows:
        lines.append(f"{r['world_size']:9d} {r['threads']:12d} {r['steps']:6d} {r['seconds']:8.2f} "
                     f"{r['examples_per_s']:11.1f} {r['examples_per_s'] / base:8.2f}")
    lines.append("pd.Trainer, LoRA r=8 on q/v + head, AdamW; examples/s over the timed steps after the warm-up; "
                 "the N-process run splits each global batch over gloo ranks and all-reduces the delta gradients")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- entry points
def run_train_bench(backbone: str = "minilm", batch: int = 16, seq: int = 128, repeats: int = 5,
                    steps: int = 20, warmup: int = 3, nproc: int = 2, threads: int | None = None,
                    device: str = "cpu", bf16: bool = False, quick: bool = False) -> str:
    """Both parts, as one text report. quick: tiny random BERT, batch <= 4, seq <= 16, few rounds and steps."""
    if quick:
        batch, seq, repeats, steps, warmup = min(batch, 4), min(seq, 16), min(repeats, 2), min(steps, 3), 1
    threads = threads or torch.get_num_threads()
    body, desc = load_body(backbone, quick)
    _check_sizes(body, batch=batch, seq=seq, repeats=repeats, steps=steps, warmup=warmup, nproc=nproc,
                 threads=threads)
    if nproc < 2:
        raise ConfigError(f"nproc={nproc}: the throughput part compares 1 process against nproc >= 2; pass --nproc 2")
    rows = _in_process(threads, lambda: memory_rows(body, batch, seq, repeats, device, bf16))
    part_a = format_memory(rows, f"(a) full fine-tuning, activation checkpointing: {desc}, batch {batch} x seq "
                                 f"{seq}, device {device}, {threads} threads, {repeats} interleaved rounds")
    del rows
    part_b = format_throughput(throughput_rows(backbone, quick, batch, seq, steps, warmup, nproc, threads),
                               f"(b) LoRA training throughput, 1 vs {nproc} gloo processes: {desc}, global batch "
                               f"{batch} x seq {seq}, CPU, {threads} thread(s) for 1 process and "
                               f"{max(1, threads // nproc)} per rank, {warmup} warm-up + {steps} timed steps")
    report = part_a + "\n\n" + part_b
    logger.debug("%s", report)
    return report


def _worker(args: argparse.Namespace) -> int:
    """One rank of the throughput part (started by ``launch``); rank 0 writes the result to ``--out``."""
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("PROMPTDELTA_BENCH_THREADS", "1")))
    result = lora_throughput(args.backbone, args.quick, args.batch, args.seq, args.steps, args.warmup)
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_json(args.out, result)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI: ``promptdelta bench train [--backbone minilm] [--batch 16] [--seq 128] [--repeats 5] [--steps 20]
    [--warmup 3] [--nproc 2] [--threads N] [--device cpu|cuda] [--bf16] [--quick]``."""
    p = argparse.ArgumentParser(prog="promptdelta bench train", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="minilm", help="preset or checkpoint folder (default minilm)")
    p.add_argument("--batch", type=int, default=16, help="(global) batch size, both parts")
    p.add_argument("--seq", type=int, default=128, help="tokens per example, both parts")
    p.add_argument("--repeats", type=int, default=5, help="(a) interleaved timing rounds (median over them)")
    p.add_argument("--steps", type=int, default=20, help="(b) timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="(b) untimed steps first")
    p.add_argument("--nproc", type=int, default=2, help="(b) gloo processes to compare with one")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads in all (default: torch's setting); N ranks get threads // N each")
    p.add_argument("--device", default="cpu", help="(a) device; (b) always runs on CPU")
    p.add_argument("--bf16", action="store_true", help="(a) also a bf16-autocast row")
    p.add_argument("--quick", action="store_true", help="tiny random BERT, tiny batch, few steps (smoke test)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    print(run_train_bench(args.backbone, args.batch, args.seq, args.repeats, args.steps, args.warmup, args.nproc,
                          args.threads, args.device, args.bf16, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
