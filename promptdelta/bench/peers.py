"""promptdelta against PEFT, method by method, side by side: ``promptdelta bench peers``.

For each method both libraries have (LoRA on query/value, LoRA on all linear layers, BitFit, prefix tuning,
prompt tuning, IA3) three rows train the same pooled classifier on the same batch (mean-pooled last hidden state
-> linear head -> cross-entropy, AdamW over the trainable parameters):

* ``peft``: PEFT on the transformers ``BertModel``;
* ``pd-hf``: promptdelta's ``attach`` on the same transformers model;
* ``pd-native``: promptdelta's ``attach`` on its native backbone (``load_backbone(hf_model)``: same weights).

References: full fine-tuning of the transformers model, and the frozen floor (every weight frozen but the
embedding LayerNorm scale, so backward runs through every layer and computes no weight gradient).

Dropout: promptdelta's rows train the way promptdelta trains on CPU: fused dropout and attention
(``speed.fast_dropout`` on pd-hf; the native backbone's own FastDropout on pd-native and the native floor);
PEFT's rows and the transformers references as PEFT users run them (torch's dropout, SDPA).
``--torch-dropout`` runs promptdelta's rows on torch's dropout too (the same ops as PEFT).

Every row lives in its own worker process (this module with ``--worker``), so its peak RSS is its own. The
parent drives the workers round by round (round i starts at row i): one training step and one inference
forward each; the table gives medians and IQRs of the per-round ratios (load on the shared machine hits
rows of one round alike).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptdelta.errors import ConfigError

METHODS = ["lora_qv", "lora_all", "bitfit", "prefix", "prompt", "ia3"]
IMPLS = ["peft", "pd-hf", "pd-native"]
REFS = [("full", "hf"), ("floor", "hf"), ("floor", "native")]
NUM_LABELS = 4
PROMPT_TOKENS = 10   # prompt tuning's and prefix tuning's virtual tokens
LORA = {"r": 8, "alpha": 16}
IA3_FF = r".*\.layer\.\d+\.output\.dense"   # BERT's FFN output layer (fc2): its input is the inner activation
NOTES = [
    "bitfit: PEFT has no BitFit; its column is plain torch (requires_grad on every bias of the transformers model)",
    "prefix: both libraries without the MLP reparameterisation, keys/values fed as the transformers model's cache "
    "(pd-native: prefix_kv); PEFT numbers the tokens' positions from 10, promptdelta keeps them at 0..T-1",
    "prompt: 10 soft vectors before the input embeddings (promptdelta's SoftTemplate splice, done in the bench); "
    "its rows run seq + 10 tokens through every layer, so its own floor is that much above the seq-token floor",
    "ia3: l_k, l_v on key/value outputs, l_ff on the FFN's inner activation (PEFT: target key|value|layer.N.output."
    "dense, the last as feedforward_modules; PEFT's BERT default would also scale attention.output.dense's input)",
    "bottleneck adapter: the project takes no dependency on and no code from the `adapters` package (no row)",
]


# --------------------------------------------------------------------------------------------- worker side
class Pooled(nn.Module):
    """backbone -> masked mean of the last hidden state -> linear head: logits (B, C).

    ``prompt`` (n, H): soft prompt rows spliced before the input embeddings (prompt tuning, Lester et al. 2021).
    """

    def __init__(self, body: nn.Module, hidden: int, prompt: bool = False) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(hidden, NUM_LABELS)
        self.prompt = nn.Parameter(torch.randn(PROMPT_TOKENS, hidden) * 0.02) if prompt else None

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        if self.prompt is None:
            out = self.body(input_ids=ids, attention_mask=mask)
        else:
            emb = self.body.embeddings.word_embeddings(ids)                                    # (B, T, H)
            p = self.prompt.unsqueeze(0).expand(ids.shape[0], -1, -1).to(emb.dtype)            # (B, n, H)
            full = torch.cat([mask.new_ones(ids.shape[0], PROMPT_TOKENS), mask], 1)           # (B, n + T)
            out = self.body(inputs_embeds=torch.cat([p, emb], 1), attention_mask=full)
        h = out.last_hidden_state[:, -T:]                          # (B, T, H): PEFT's prompt rows come first
        m = mask.unsqueeze(-1).to(h.dtype)                         # (B, T, 1)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))  # (B, C)


def _hf_model(tiny: bool) -> nn.Module:
    """The transformers BertModel: MiniLM's weights, or a seeded random 2 x 32 BERT."""
    import transformers as tf

    if tiny:
        torch.manual_seed(0)
        cfg = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=64)
        return tf.BertModel(cfg)
    from promptdelta.backbones.loading import PRESETS

    return tf.BertModel.from_pretrained(str(PRESETS["minilm"]()))


def _peft(hf: nn.Module, method: str) -> nn.Module:
    import peft

    if method == "bitfit":   # PEFT has no BitFit: bias-only by hand
        for n, p in hf.named_parameters():
            p.requires_grad_(n.endswith("bias"))
        return hf
    configs = {
        "lora_qv": lambda: peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=["query", "value"]),
        "lora_all": lambda: peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear"),
        "prefix": lambda: peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=PROMPT_TOKENS),
        "prompt": lambda: peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=PROMPT_TOKENS),
        "ia3": lambda: peft.IA3Config(target_modules=rf".*\.(key|value)|{IA3_FF}", feedforward_modules=IA3_FF),
    }
    return peft.get_peft_model(hf, configs[method]())


def _promptdelta(body: nn.Module, method: str) -> None:
    from promptdelta.deltas import attach

    if method == "prompt":
        body.requires_grad_(False)   # the soft prompt lives in Pooled
    elif method == "lora_qv":
        attach(body, "lora", **LORA)
    elif method == "lora_all":
        attach(body, "lora", targets="all-linear", **LORA)
    elif method == "prefix":
        attach(body, "prefix", num_tokens=PROMPT_TOKENS, reparam=False)
    else:
        attach(body, method)


def _floor(body: nn.Module) -> None:
    """Freeze everything but the embedding LayerNorm's scale: backward reaches layer 0, no weight grads."""
    body.requires_grad_(False)
    norm = [p for n, p in body.named_parameters() if "embeddings" in n and "norm" in n.lower() and "weight" in n]
    norm[0].requires_grad_(True)


def _dropout_mode(model: nn.Module, impl: str, torch_dropout: bool) -> None:
    """promptdelta's rows as promptdelta trains: fused dropout (``torch_dropout`` False) or torch's own."""
    if impl in ("pd-native", "native"):
        for m in model.modules():
            if hasattr(m, "use_torch_dropout"):
                m.use_torch_dropout(torch_dropout)
    elif impl == "pd-hf" and not torch_dropout:
        from promptdelta.speed import fast_dropout

        fast_dropout(model)


def build_row(method: str, impl: str, tiny: bool, torch_dropout: bool = False) -> nn.Module:
    """The classifier of one table row (see the module doc for the method / impl names)."""
    from promptdelta.backbones.loading import load_backbone

    hf = _hf_model(tiny)
    hidden = hf.config.hidden_size
    body = load_backbone(hf)[0] if impl in ("pd-native", "native") else hf
    if method == "full":
        body.requires_grad_(True)
    elif method == "floor":
        _floor(body)
    elif impl == "peft":
        body = _peft(body, method)
    else:
        _promptdelta(body, method)
    torch.manual_seed(1)
    model = Pooled(body, hidden, prompt=method == "prompt" and impl != "peft").train()
    _dropout_mode(model, impl, torch_dropout)
    return model


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def worker(method: str, impl: str, tiny: bool, batch: int, seq: int, threads: int, torch_dropout: bool = False) -> int:
    """Build one row, answer 'step' lines on stdin with 'train_s infer_s' on stdout; 'quit' -> memory JSON."""
    torch.set_num_threads(threads)
    model = build_row(method, impl, tiny, torch_dropout)
    g = torch.Generator().manual_seed(0)
    vocab = 99 if tiny else 30522
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask, labels = torch.ones_like(ids), torch.randint(0, NUM_LABELS, (batch,), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    built = _rss_mb()

    def train() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(ids, mask), labels).backward()
        opt.step()

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(ids, mask)

    train(), infer()   # warm-up: optimizer state, one-off allocations
    print("ready", sum(p.numel() for p in params), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KB on Linux
            print(json.dumps({"peak_mb": peak, "step_mb": peak - built}), flush=True)
            return 0
        t0 = time.perf_counter()
        train()
        t1 = time.perf_counter()
        infer()
        print(f"{t1 - t0:.6f} {time.perf_counter() - t1:.6f}", flush=True)
    return 0


# --------------------------------------------------------------------------------------------- parent side
@dataclass
class Row:
    """One worker process and what it reported."""

    method: str
    impl: str
    proc: subprocess.Popen | None = None
    err: Any = None
    trainable: int = 0
    train: list[float] = field(default_factory=list)
    infer: list[float] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    skip: str = ""
    group: int = 0   # rows of one group run side by side, with their own references


def _start(row: Row, tiny: bool, batch: int, seq: int, threads: int, torch_dropout: bool = False) -> None:
    if row.impl == "peft" and not _has_peft():
        row.skip = "not installed"
        return
    cmd = [sys.executable, "-m", "promptdelta.bench.peers", "--worker", row.method, row.impl, "--batch", str(batch),
           "--seq", str(seq), "--threads", str(threads)] + (["--tiny"] if tiny else []) + \
        (["--torch-dropout"] if torch_dropout else [])
    row.err = tempfile.TemporaryFile(mode="w+")
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    row.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=row.err, text=True,
                                env=env)


def _ask(row: Row, msg: str) -> str:
    assert row.proc is not None and row.proc.stdin is not None and row.proc.stdout is not None
    if msg:
        row.proc.stdin.write(msg + "\n")
        row.proc.stdin.flush()
    line = row.proc.stdout.readline()
    if not line:
        row.err.seek(0)
        tail = row.err.read().strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"the {row.method}/{row.impl} worker died: {tail[0]}; rerun it alone with "
                          f"python -m promptdelta.bench.peers --worker {row.method} {row.impl} to see why.")
    return line.strip()


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def _stats(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) < 4:
        return f"{statistics.median(xs):.2f}"
    q = statistics.quantiles(xs, n=4)
    return f"{statistics.median(xs):.2f} [{q[0]:.2f}-{q[2]:.2f}]"


def _ratios(a: Row, b: Row | None, attr: str) -> list[float]:
    if b is None or b.skip or a.skip:
        return []
    return [x / y for x, y in zip(getattr(a, attr), getattr(b, attr))]


def _format(rows: list[Row], header: str) -> str:
    by = {(r.method, r.impl): r for r in rows if r.method not in ("full", "floor")}
    refs = {(r.group, r.method, r.impl): r for r in rows if r.method in ("full", "floor")}
    cols = (f"{'method':9s} {'impl':10s} {'trainable':>10s} {'step ms':>8s} {'step/PEFT [IQR]':>18s} "
            f"{'step/full':>9s} {'step/floor':>10s} {'infer ms':>8s} {'infer/PEFT':>10s} {'peak MB':>8s} "
            f"{'step MB':>8s} {'MB/PEFT':>7s}")
    lines = [header, cols]
    for r in rows:
        if r.method in ("full", "floor") and r.group > 0:   # later groups' references: used, not printed
            continue
        if r.skip:
            lines.append(f"{r.method:9s} {r.impl:10s} {r.skip}")
            continue
        full, floor = refs.get((r.group, "full", "hf")), refs.get((r.group, "floor", "hf"))
        peft_row = by.get((r.method, "peft")) if r.method not in ("full", "floor") else None
        mem_ratio = "-"
        if peft_row is not None and not peft_row.skip and peft_row.memory.get("step_mb", 0) > 0:
            mem_ratio = f"{r.memory['step_mb'] / peft_row.memory['step_mb']:.2f}"
        lines.append(
            f"{r.method:9s} {r.impl:10s} {r.trainable:10,d} {statistics.median(r.train) * 1e3:8.1f} "
            f"{_stats(_ratios(r, peft_row, 'train')):>18s} {_stats(_ratios(r, full, 'train')):>9s} "
            f"{_stats(_ratios(r, floor, 'train')):>10s} {statistics.median(r.infer) * 1e3:8.1f} "
            f"{_stats(_ratios(r, peft_row, 'infer')):>10s} {r.memory.get('peak_mb', 0):8.0f} "
            f"{r.memory.get('step_mb', 0):8.0f} {mem_ratio:>7s}")
    lines.append("step = zero_grad + forward + backward + AdamW step; infer = one forward under inference_mode; "
                 "ratios: medians of per-round ratios [IQR]; floor = frozen transformers BERT, backward to layer 0; "
                 "peak MB = the row's process peak RSS, step MB = peak minus RSS after building the model")
    lines += ["note: " + n for n in NOTES]
    return "\n".join(lines)


def _versions() -> str:
    import transformers

    out = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    try:
        import peft
        out.append(f"peft {peft.__version__}")
    except ImportError:
        out.append("peft not installed")
    from promptdelta import __version__ as pd_version
    return ", ".join([f"promptdelta {pd_version}"] + out)


def _methods(methods: str | Sequence[str] | None) -> list[str]:
    if methods is None:
        return list(METHODS)
    chosen = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    bad = [m for m in chosen if m not in METHODS]
    if bad or not [m for m in chosen if m]:
        raise ConfigError(f"methods={methods!r} is not usable (unknown: {bad}); pass a comma-separated subset of "
                          f"{METHODS}, e.g. --methods lora_qv,bitfit.")
    return list(dict.fromkeys(m for m in chosen if m))


def _group_size(max_workers: int | None, tiny: bool) -> int:
    """Methods per group: the references and 3 rows per method must fit ``max_workers`` processes (default:
    as many as the available memory holds at about 1.8 GB per MiniLM worker)."""
    if max_workers is None:
        if tiny:
            return len(METHODS)
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        max_workers = int(avail_kb / 2 ** 20 / 1.8)
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < len(REFS) + len(IMPLS):
        raise ConfigError(f"max_workers={max_workers!r} cannot hold the {len(REFS)} references and one method's "
                          f"{len(IMPLS)} rows; pass --max-workers {len(REFS) + len(IMPLS)} or more (or free memory).")
    return (max_workers - len(REFS)) // len(IMPLS)


def _run_group(rows: list[Row], rounds: int, tiny: bool, batch: int, seq: int, threads: int,
               torch_dropout: bool = False) -> None:
    """Start the group's workers, time them round by round (round i starts at row i), collect memory, stop them."""
    try:
        for r in rows:
            _start(r, tiny, batch, seq, threads, torch_dropout)
        live = [r for r in rows if not r.skip]
        for r in live:
            r.trainable = int(_ask(r, "").split()[1])
        for i in range(rounds):
            for r in live[i % len(live):] + live[:i % len(live)]:
                t, f = _ask(r, "step").split()
                r.train.append(float(t))
                r.infer.append(float(f))
        for r in live:
            r.memory = json.loads(_ask(r, "quit"))
    finally:
        for r in rows:
            if r.proc is not None:
                r.proc.kill() if r.proc.poll() is None else None
                r.proc.wait()
                r.err.close()


def run_peers_bench(methods: str | Sequence[str] | None = None, batch: int = 16, seq: int = 128, rounds: int = 5,
                    tiny: bool = False, threads: int | None = None, max_workers: int | None = None,
                    torch_dropout: bool = False) -> str:
    """Run every (method, impl) row in its own process, interleaved for ``rounds`` rounds; the table as text.
    Methods run in groups that fit ``max_workers`` live processes (``_group_size``), each group beside its own
    full / floor references, so its ratios compare rows measured at the same time."""
    names = _methods(methods)
    for name, value in (("batch", batch), ("seq", seq), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be an integer >= 1; e.g. --batch 16 --seq 128 --rounds 5.")
    limit = 64 if tiny else 512
    if seq + PROMPT_TOKENS > limit:
        raise ConfigError(f"seq={seq} plus {PROMPT_TOKENS} prompt tokens exceeds the model's {limit} positions; "
                          f"pass --seq {limit - PROMPT_TOKENS} or less.")
    threads = threads or torch.get_num_threads()
    per = _group_size(max_workers, tiny)
    rows: list[Row] = []
    for g, start in enumerate(range(0, len(names), per)):
        group = [Row(m, i, group=g) for m, i in REFS] + [Row(m, i, group=g) for m in names[start:start + per]
                                                         for i in IMPLS]
        _run_group(group, rounds, tiny, batch, seq, threads, torch_dropout)
        rows += group
    model = "tiny random BERT (2 x 32)" if tiny else "all-MiniLM-L6-v2 (6 x 384)"
    header = (f"peers benchmark: {model}, batch {batch} x seq {seq}, cpu, {threads} threads, {rounds} interleaved "
              f"rounds, one process per row, {per} method(s) at a time beside their own references; {_versions()}; {platform.machine()}, load {os.getloadavg()[0]:.2f}")
    dropout = ("promptdelta rows on torch's dropout (--torch-dropout), like PEFT's" if torch_dropout else
               "promptdelta rows with fused CPU dropout + attention (as promptdelta trains; --torch-dropout: "
               "torch's), PEFT rows and references with torch's")
    return _format(rows, header + "\ndropout: " + dropout)


def step_ops(method: str, impl: str, tiny: bool = False, batch: int = 16, seq: int = 128,
             torch_dropout: bool = False) -> dict[str, tuple[int, float]]:
    """torch.profiler over one training step of a row (after two warm-up steps): op name -> (calls, self CPU ms).
    Autograd-engine bookkeeping, views and detaches are left out."""
    from torch.profiler import ProfilerActivity, profile

    vocab = 99 if tiny else 30522
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask, labels = torch.ones_like(ids), torch.randint(0, NUM_LABELS, (batch,), generator=g)
    model = build_row(method, impl, tiny, torch_dropout)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(ids, mask), labels).backward()
        opt.step()

    step(), step()   # warm-up: optimizer state, one-off allocations
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return {e.key: (e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()
            if not e.key.startswith(("autograd::engine", "Optimizer", "aten::view", "detach", "aten::detach"))}


def profile_method(method: str, tiny: bool = False, batch: int = 16, seq: int = 128, threads: int | None = None,
                   top: int = 12, torch_dropout: bool = False) -> str:
    """Op-by-op comparison of one method's rows (``step_ops``, in this process), the frozen floor beside them:
    the ops whose call counts differ between the impls, with their self CPU ms, then each row's busiest ops.
    The counts are exact on a loaded machine; the milliseconds are not (one step each)."""
    if method not in METHODS + ["floor"]:
        raise ConfigError(f"--profile {method!r} is not a method; use one of {METHODS} or 'floor'.")
    torch.set_num_threads(threads or torch.get_num_threads())
    specs = [("floor", "hf")] + [(method, i) for i in IMPLS if (i != "peft" or _has_peft()) and method != "floor"]
    ops = {f"{m}/{i}": step_ops(m, i, tiny, batch, seq, torch_dropout) for m, i in specs}
    names = list(ops)
    lines = [f"op-by-op profile of one training step: {method}, batch {batch} x seq {seq}, "
             f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}; calls and self CPU ms per row",
             f"{'op':44s}" + "".join(f"{n:>24s}" for n in names)]
    for key in sorted(set().union(*ops.values())):
        got = [ops[n].get(key, (0, 0.0)) for n in names]
        if len({c for c, _ in got[1:] or got}) > 1:   # work one impl does and another does not (the floor:
            lines.append(f"{key[:44]:44s}" + "".join(f"{c:>8d} {t:10.2f} ms  " for c, t in got))   # reference)
    lines.append(f"{'total self CPU':44s}" + "".join(f"{'':>8s} {sum(t for _, t in ops[n].values()):10.2f} ms  "
                                                   for n in names))
    for n in names:
        busiest = sorted(ops[n].items(), key=lambda kv: -kv[1][1])[:top]
        lines.append(f"{n}: " + ", ".join(f"{k.removeprefix('aten::')} {c}x {t:.1f} ms" for k, (c, t) in busiest))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``promptdelta bench peers [--methods lora_qv,...] [--batch 16] [--seq 128] [--rounds 5] [--tiny]
    [--threads N] [--max-workers N] [--profile METHOD] [--torch-dropout]``."""
    p = argparse.ArgumentParser(prog="promptdelta bench peers", description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (medians over them)")
    p.add_argument("--tiny", action="store_true", help="a random 2 x 32 BERT instead of MiniLM (smoke test)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker (default: torch's)")
    p.add_argument("--max-workers", type=int, default=None,
                   help="live worker processes at most (default: available memory / 1.8 GB); methods run in groups")
    p.add_argument("--profile", metavar="METHOD", default=None,
                   help="instead of the table: one method's rows op by op (torch.profiler, one step each)")
    p.add_argument("--torch-dropout", action="store_true",
                   help="promptdelta's rows on torch's dropout too (default: fused CPU dropout, as promptdelta trains)")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(*args.worker, args.tiny, args.batch, args.seq, args.threads or torch.get_num_threads(),
                      args.torch_dropout)
    if args.profile:
        print(profile_method(args.profile, args.tiny, args.batch, args.seq, args.threads,
                             torch_dropout=args.torch_dropout))
        return 0
    print(run_peers_bench(args.methods, args.batch, args.seq, args.rounds, args.tiny, args.threads,
                          args.max_workers, args.torch_dropout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
