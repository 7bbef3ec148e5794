"""One training step per delta method, side by side: ``promptdelta bench deltas``.

Full fine-tuning and every delta method (each on a fresh copy of the same backbone, with its default
config) train the same classifier on the same batch: mean-pooled last hidden state (B, H) -> a linear head
-> cross-entropy on random labels, AdamW over the trainable parameters (the head is trained in every row).
For each row the table gives

* trainable parameters (count, and share of all parameters of the trained model: backbone + delta + head);
* step time: forward + backward + ``optimizer.step()``, the median over ``repeats`` rounds; the methods are
  interleaved round by round (round i starts at method i), so load on the machine hits them alike;
* memory: one real training step measured by ``promptdelta.deltas.measure_training_memory`` -- parameters
  (frozen ones too), gradients, AdamW state and the tensors autograd saved for backward (unique storages);
  on CUDA the allocator's peak is shown as well.

Every time and memory figure also appears as a ratio to full fine-tuning.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptdelta.backbones.loading import load_backbone
from promptdelta.deltas import attach, measure_training_memory
from promptdelta.deltas.ladder import MemoryReport
from promptdelta.errors import ConfigError

logger = logging.getLogger(__name__)

FULL = "full"
# method -> its attach() config: the defaults, with the sizes the benchmark names made explicit
METHODS: dict[str, dict[str, Any]] = {
    FULL: {},
    "lora": {"r": 8},
    "bitfit": {},
    "adapter": {},
    "prefix": {"num_tokens": 10},
    "intrinsic": {"dim": 1000},
    "ladder": {"reduction": 8},
}
NUM_LABELS = 4
_MB = 2 ** 20


# --------------------------------------------------------------------------------------------- model
class PooledClassifier(nn.Module):
    """backbone -> masked mean of the last hidden state -> linear head: logits (B, num_labels)."""

    def __init__(self, backbone: nn.Module, num_labels: int = NUM_LABELS) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        m = attention_mask.unsqueeze(-1).to(h.dtype)                                              # (B, T, 1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)                                         # (B, H)
        return self.head(pooled)                                                                  # (B, C)


def _tiny_backbone() -> nn.Module:
    """A random 2-layer x 32 transformers BERT converted by load_backbone (the quick mode's backbone)."""
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    return load_backbone(tf.BertModel(cfg))[0]


def build_model(backbone: nn.Module, method: str, seed: int = 0) -> PooledClassifier:
    """A fresh copy of ``backbone`` with ``method`` attached (``"full"``: everything trainable) + a head."""
    torch.manual_seed(seed)
    body = copy.deepcopy(backbone)
    if method == FULL:
        body.requires_grad_(True)
    else:
        attach(body, method, **METHODS[method])
    model = PooledClassifier(body)
    return model.train()


def make_batch(vocab_size: int, batch: int, seq: int, device: str) -> dict[str, torch.Tensor]:
    """Random ids (B, T) (ids 5.. so no special token), a full attention mask and random labels (B,)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (batch, seq), generator=g)
    labels = torch.randint(0, NUM_LABELS, (batch,), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in out.items()}


# --------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One method: its model, optimizer, loss, parameter counts, memory report and per-round seconds."""

    method: str
    model: PooledClassifier
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[], torch.Tensor]
    trainable: int
    total: int
    memory: MemoryReport | None = None
    times: list[float] = field(default_factory=list)


def _setup(backbone: nn.Module, method: str, data: dict[str, torch.Tensor], device: str) -> Row:
    model = build_model(backbone, method).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def loss_fn() -> torch.Tensor:
        logits = model(data["input_ids"], data["attention_mask"])  # (B, C)
        return F.cross_entropy(logits, data["labels"])

    total = sum(p.numel() for p in model.parameters())
    return Row(method, model, opt, loss_fn, sum(p.numel() for p in params), total)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(row: Row) -> float:
    """One optimizer step (zero_grad, forward, backward, AdamW step); returns the loss."""
    row.optimizer.zero_grad(set_to_none=True)
    loss = row.loss_fn()
    loss.backward()
    row.optimizer.step()
    return float(loss.detach())


def _timed_step(row: Row, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    train_step(row)
    _sync(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------- report
def _ratio(x: float, base: float) -> str:
    return f"{x / base:6.2f}" if base > 0 else "   n/a"


def _format(rows: list[Row], header: str) -> str:
    full = rows[0]
    base_ms = statistics.median(full.times) * 1e3
    base_mem = full.memory.total
    cuda = full.memory.device_peak is not None
    cols = (f"{'method':10s} {'trainable':>11s} {'share %':>8s} {'step ms':>9s} {'ratio':>6s} {'memory MB':>10s} "
            f"{'ratio':>6s} {'param':>7s} {'grad':>7s} {'optim':>7s} {'activ':>7s}")
    lines = [header, cols + (f" {'CUDA peak':>10s} {'ratio':>6s}" if cuda else "")]
    for r in rows:
        ms, m = statistics.median(r.times) * 1e3, r.memory
        line = (f"{r.method:10s} {r.trainable:11,d} {100.0 * r.trainable / r.total:8.3f} {ms:9.2f} "
                f"{_ratio(ms, base_ms)} {m.total / _MB:10.2f} {_ratio(m.total, base_mem)} "
                f"{m.parameters / _MB:7.1f} {m.gradients / _MB:7.1f} {m.optimizer_state / _MB:7.1f} "
                f"{m.activations / _MB:7.1f}")
        if cuda:
            line += f" {m.device_peak / _MB:10.1f} {_ratio(m.device_peak, full.memory.device_peak)}"
        lines.append(line)
    lines.append("share % = trainable / all parameters of the trained model (backbone + delta + head); step = "
                 "forward + backward + AdamW step, median ms; memory = parameters + gradients + AdamW state + "
                 "saved activations (MB, measured in one real step); ratios are to full fine-tuning")
    return "\n".join(lines)


def _methods(methods: str | Sequence[str] | None) -> list[str]:
    """The rows to run: full fine-tuning first (the ratios' baseline), then the chosen methods in order."""
    if methods is None:
        return list(METHODS)
    chosen = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    chosen = [m for m in chosen if m]
    bad = [m for m in chosen if m not in METHODS]
    if bad or not chosen:
        raise ConfigError(f"methods={methods!r} is not usable (unknown: {bad}); pass a comma-separated subset "
                          f"of {list(METHODS)}, e.g. methods='lora,ladder'.")
    return [FULL] + [m for m in dict.fromkeys(chosen) if m != FULL]


def _check(batch: int, seq: int, repeats: int) -> None:
    for name, value in (("batch", batch), ("seq", seq), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be an integer >= 1; e.g. batch=16, seq=128, repeats=5.")


def _load(backbone: str | nn.Module, quick: bool, seq: int) -> tuple[nn.Module, str]:
    if quick:
        return _tiny_backbone(), "tiny random BERT (2 x 32)"
    model = backbone if isinstance(backbone, nn.Module) and hasattr(backbone, "family") \
        else load_backbone(backbone)[0]
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq > limit:
        raise ConfigError(f"seq={seq} exceeds the backbone's {limit} positions; pass --seq {limit} or less.")
    name = backbone if isinstance(backbone, str) else type(backbone).__name__
    cfg = model.config
    return model, f"{name} ({cfg.num_layers} x {cfg.hidden_size})"


def run_deltas_bench(backbone: str | nn.Module = "minilm", batch: int = 16, seq: int = 128,
                     methods: str | Sequence[str] | None = None, repeats: int = 5, quick: bool = False,
                     device: str = "cpu", threads: int | None = None) -> str:
    """Train one step per method (full fine-tuning first) and return the comparison table as text.

    quick: a tiny random BERT, batch <= 2, seq <= 16, one round, 1 thread (a smoke test in seconds).
    threads: torch CPU threads while the benchmark runs (None = leave torch's setting); restored after.
    """
    names = _methods(methods)
    _check(batch, seq, repeats)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r} must be an integer >= 1 (or None to keep torch's setting).")
    if quick:
        batch, seq, repeats, threads = min(batch, 2), min(seq, 16), 1, threads or 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _run(backbone, names, batch, seq, repeats, quick, device)
    finally:
        torch.set_num_threads(before)


def _run(backbone: str | nn.Module, names: list[str], batch: int, seq: int, repeats: int, quick: bool,
         device: str) -> str:
    body, desc = _load(backbone, quick, seq)   # each row deep-copies it (and moves the copy to device)
    data = make_batch(body.config.vocab_size, batch, seq, device)
    rows = [_setup(body, m, data, device) for m in names]
    for row in rows:
        row.memory = measure_training_memory(row.model, row.loss_fn, row.optimizer)  # also the warm-up step
        train_step(row)                                                            # optimizer state in place
    for i in range(repeats):
        for row in rows[i % len(rows):] + rows[:i % len(rows)]:
            row.times.append(_timed_step(row, device))
    header = (f"delta benchmark: {desc}, batch {batch} x seq {seq}, device {device}, "
              f"{str(next(body.parameters()).dtype).removeprefix('torch.')}, "
              f"{torch.get_num_threads()} threads, {repeats} interleaved rounds")
    table = _format(rows, header)
    logger.debug("%s", table)
    return table


def main(argv: list[str] | None = None) -> int:
    """CLI: ``promptdelta bench deltas [--backbone minilm] [--batch 16] [--seq 128] [--methods lora,ladder]
    [--repeats 5] [--quick] [--device cpu|cuda] [--threads N]``."""
    p = argparse.ArgumentParser(prog="promptdelta bench deltas", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="minilm", help="preset or checkpoint folder (default minilm)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS)
                   + " (full fine-tuning always runs: it is the baseline)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median over them)")
    p.add_argument("--quick", action="store_true", help="tiny random BERT, tiny batch, one round (smoke test)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's setting)")
    args = p.parse_args(argv)
    print(run_deltas_bench(args.backbone, args.batch, args.seq, args.methods, args.repeats, args.quick,
                           args.device, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
