"""Native backbones against transformers with the same weights: ``promptdelta bench backbone``.

For each family (BERT, RoBERTa, GPT-2, T5, Llama) a random transformers model of a realistic small size is built,
converted with ``load_backbone(hf_model)`` (same weights), and both run the same right-padded batch:
forward (eval, no_grad) and forward+backward (eval mode, so dropout is off, with gradients on). Each family
runs with no delta (the backward reaches every parameter) and, with ``--deltas``, with the same LoRA attached
to both sides (q,v or all linear layers, r=8; the backbone frozen, so the backward computes input gradients
and LoRA gradients only: what a LoRA training step costs). The output gradient is zero at padding (a loss
reads real tokens). The four variants of every row are interleaved round by round (the HF/native order alternates), each measured by
``torch.utils.benchmark.Timer``; the table gives the median ms over the rounds, and the ratio ours/HF as the
median of the per-round ratios with its interquartile range (the noise). HF models use
``attn_implementation="sdpa"`` (what our models use), and the table names the implementation each got.
A parity column (max |ours - HF| over real tokens, in eval mode) checks that like is compared with like.
``--train`` runs both columns in train mode, dropout on, as each library's users train: transformers with its own
dropout (``nn.Dropout``, sdpa's probability dropout), native with promptdelta's fused CPU dropout (the default;
``--torch-dropout`` gives the native model torch's dropout too, see ``BertModel.use_torch_dropout``; the other
native families have torch's dropout only). On a machine loaded
by other processes, ``--clock cpu`` (with ``OMP_WAIT_POLICY=PASSIVE``) times the process's CPU time instead of
the wall clock: work, not preemption; it cannot see load imbalance between threads, so quote the wall clock from
an idle machine.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from promptdelta.backbones.loading import load_backbone
from promptdelta.bench.timing import timer
from promptdelta.errors import ConfigError

logger = logging.getLogger(__name__)

FAMILIES = ("bert", "roberta", "gpt2", "t5", "llama")
DELTAS = ("none", "lora_qv", "lora_all")   # what is attached to both models of a row
LORA = {"r": 8, "alpha": 16}               # as bench peers
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------- models
def _hf_config(family: str, quick: bool):
    """The transformers config: MiniLM-like 6 x 384 encoders, GPT-2 6 x 384, T5-small (6+6 x 512), a Llama of
    6 x 384 with grouped-query attention (6 query / 2 key-value heads, SwiGLU 1024, 32k vocabulary, untied
    head); tiny if quick."""
    import transformers as tf

    if family == "llama":
        if quick:
            return tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return tf.LlamaConfig(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048)

    if family in ("bert", "roberta"):
        cls = tf.BertConfig if family == "bert" else tf.RobertaConfig
        extra = {} if family == "bert" else {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}
        if quick:
            return cls(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, max_position_embeddings=66, **extra)
        return cls(vocab_size=30522 if family == "bert" else 50265, hidden_size=384, num_hidden_layers=6,
                   num_attention_heads=12, intermediate_size=1536, max_position_embeddings=514, **extra)
    if family == "gpt2":
        if quick:
            return tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                 bos_token_id=98, eos_token_id=98)
        return tf.GPT2Config(n_embd=384, n_layer=6, n_head=6, n_positions=1024)
    if quick:
        return tf.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return tf.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                       num_heads=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def _describe(family: str, cfg) -> str:
    if family == "t5":
        return f"{cfg.num_layers}+{cfg.num_decoder_layers} x {cfg.d_model}, ff {cfg.d_ff}, V {cfg.vocab_size}, head"
    if family == "llama":
        return (f"{cfg.num_hidden_layers} x {cfg.hidden_size}, {cfg.num_attention_heads}/{cfg.num_key_value_heads} "
                f"heads, ff {cfg.intermediate_size}, V {cfg.vocab_size}, head")
    hidden, layers = (cfg.n_embd, cfg.n_layer) if family == "gpt2" else (cfg.hidden_size, cfg.num_hidden_layers)
    return f"{layers} x {hidden}, V {cfg.vocab_size}" + (", head" if family == "gpt2" else ", no head")


def build_pair(family: str, quick: bool = False, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module, str]:
    """(transformers model, native model with the same weights, size description), both eval, on device.

    BERT/RoBERTa are encoders without a head (like MiniLM). GPT-2, T5 and Llama carry their LM head on both sides:
    a native GPT-2 with tied embeddings always computes logits, so a headless HF GPT2Model would be unfair.
    """
    import transformers as tf

    if family not in FAMILIES:
        raise ConfigError(f"unknown family {family!r} for the backbone benchmark; choose from {list(FAMILIES)}.")
    cfg = _hf_config(family, quick)
    cls = {"bert": tf.BertModel, "roberta": tf.RobertaModel, "gpt2": tf.GPT2LMHeadModel,
           "t5": tf.T5ForConditionalGeneration, "llama": tf.LlamaForCausalLM}[family]
    torch.manual_seed(0)
    hf = cls._from_config(cfg, attn_implementation="sdpa").eval()
    ours = load_backbone(hf)[0]
    return hf.to(device, dtype), ours.to(device, dtype).eval(), _describe(family, cfg)


def attach_deltas(model: nn.Module, deltas: str) -> None:
    """Attach the row's delta: nothing, LoRA on the attention query/value projections, or on every linear."""
    from promptdelta.deltas import attach

    if deltas == "lora_qv":
        attach(model, "lora", **LORA)
    elif deltas == "lora_all":
        attach(model, "lora", targets="all-linear", **LORA)


def make_batch(family: str, hf: nn.Module, batch: int, seq: int, device: str,
               padded: bool = True) -> dict[str, torch.Tensor]:
    """Random ids (B, T), right-padded: row i keeps T - i * T // (2B) tokens (the last rows about half);
    every row full when not ``padded``."""
    cfg = hf.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=g)  # (B, T)
    lengths = torch.tensor([seq - (i * seq // (2 * batch) if padded else 0) for i in range(batch)])
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()  # (B, T)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    out = {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}
    if family == "t5":
        out["decoder_input_ids"] = torch.randint(5, cfg.vocab_size, (batch, max(1, seq // 4)), generator=g)
    return {k: v.to(device) for k, v in out.items()}


def _output(family: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What both models return: logits (B, T or T_dec, V) for GPT-2, T5, Llama, else last_hidden_state (B, T, H)."""
    out = model(**batch)
    return out.logits if family in ("gpt2", "t5", "llama") else out.last_hidden_state


def parity(family: str, hf: nn.Module, ours: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """max |ours - HF| over real (non-padding) positions; for T5 over all decoder positions."""
    with torch.no_grad():
        a, b = _output(family, hf, batch).float(), _output(family, ours, batch).float()
    diff = (a - b).abs()
    if family != "t5":
        diff = diff[batch["attention_mask"].bool()]
    return float(diff.max())


# --------------------------------------------------------------------------------------------- timing
def _forward(family: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return _output(family, model, batch)
    return run


def _train_step(family: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], object]:
    """Forward + backward into every trainable parameter (in the model's mode), with a fixed output gradient,
    zero at padded positions (for T5, whose outputs are decoder positions, everywhere)."""
    grads: dict[str, torch.Tensor] = {}

    def run():
        model.zero_grad(set_to_none=True)
        out = _output(family, model, batch)
        if "g" not in grads:
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
            if family != "t5":
                g = g * batch["attention_mask"][..., None].to(g.dtype)  # (B, T, D)
            grads["g"] = g
        out.backward(grads["g"])
    return run


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _calibrate(fn: Callable[[], object], target_s: float) -> int:
    """How many calls make one measurement of about target_s (after a warm-up call); 1 when target_s <= 0."""
    fn()
    if target_s <= 0:
        return 1
    once = timer(fn).timeit(1).median
    return max(1, int(target_s / max(once, 1e-6)))


def _wall(fn: Callable[[], object], number: int) -> float:
    """Seconds per call of fn, wall clock (torch.utils.benchmark at the process's thread count)."""
    return timer(fn).timeit(number).median


def _cpu(fn: Callable[[], object], number: int) -> float:
    """Seconds per call of fn in the process's CPU time over all threads: on a loaded machine, time spent
    preempted does not count (run with OMP_WAIT_POLICY=PASSIVE, else threads spinning at barriers count)."""
    start = time.process_time()
    for _ in range(number):
        fn()
    return (time.process_time() - start) / number


CLOCKS: dict[str, Callable[[Callable[[], object], int], float]] = {"wall": _wall, "cpu": _cpu}


@dataclass
class Row:
    """One family's per-round seconds for the four variants, its size and parity."""

    family: str
    deltas: str
    size: str
    attn: str
    diff: float
    times: dict[str, list[float]]


def _time_family_round(fns: dict[str, Callable[[], object]], numbers: dict[str, int], swap: bool,
                       times: dict[str, list[float]], clock: str = "wall") -> None:
    """Time each variant once with ``CLOCKS[clock]``; HF before ours, or ours first when ``swap``."""
    for kind in ("fwd", "train"):
        order = ("ours", "hf") if swap else ("hf", "ours")
        for who in order:
            name = f"{kind}_{who}"
            times[name].append(CLOCKS[clock](fns[name], numbers[name]))


def set_mode(ours: nn.Module, hf: nn.Module, train: bool, torch_dropout: bool = False) -> None:
    """Both models in train mode (dropout on) or eval mode; ``torch_dropout``: the native model runs torch's own
    dropout (where it has the switch) instead of promptdelta's fused one."""
    for model in (hf, ours):
        model.train(train)
    if torch_dropout and hasattr(ours, "use_torch_dropout"):
        ours.use_torch_dropout()


def _setup(family: str, deltas: str, batch: int, seq: int, quick: bool, device: str, dtype: torch.dtype,
           target_s: float, padded: bool = True, train: bool = False, torch_dropout: bool = False
           ) -> tuple[Row, dict[str, Callable[[], object]], dict[str, int]]:
    """Build one row's pair (with its deltas) and batch, its four timed callables, and calls per measurement."""
    hf, ours, size = build_pair(family, quick, device, dtype)
    for model in (hf, ours):
        torch.manual_seed(2)   # the same LoRA init on both sides
        attach_deltas(model, deltas)
    data = make_batch(family, hf, batch, seq, device, padded)
    diff = parity(family, hf, ours, data)   # eval mode: dropout would make the outputs differ
    set_mode(ours, hf, train, torch_dropout)
    fns = {"fwd_hf": _forward(family, hf, data), "fwd_ours": _forward(family, ours, data),
           "train_hf": _train_step(family, hf, data), "train_ours": _train_step(family, ours, data)}
    numbers = {k: _calibrate(fn, target_s) for k, fn in fns.items()}
    row = Row(family, deltas, size, str(hf.config._attn_implementation), diff, {k: [] for k in fns})
    return row, fns, numbers


# --------------------------------------------------------------------------------------------- report
def _ratio(ours: list[float], hf: list[float]) -> tuple[float, float, float]:
    r = [a / b for a, b in zip(ours, hf)]
    if len(r) < 2:
        return r[0], r[0], r[0]
    q1, q2, q3 = statistics.quantiles(r, n=4, method="inclusive")
    return q1, q2, q3


def _format(rows: list[Row], header: str, train: bool = False) -> str:
    lines = [header, f"{'family':8s} {'deltas':8s} {'size':44s} {'HF attn':8s} {'fwd HF':>9s} {'fwd ours':>9s} "
             f"{'ours/HF (IQR)':>19s} {'f+b HF':>9s} {'f+b ours':>9s} {'ours/HF (IQR)':>19s} {'max|diff|':>9s}"]
    for r in rows:
        cells = [f"{r.family:8s} {r.deltas:8s} {r.size:44s} {r.attn:8s}"]
        for kind in ("fwd", "train"):
            hf, ours = r.times[f"{kind}_hf"], r.times[f"{kind}_ours"]
            q1, q2, q3 = _ratio(ours, hf)
            cells.append(f"{statistics.median(hf) * 1e3:9.2f} {statistics.median(ours) * 1e3:9.2f} "
                         f"{q2:6.3f} ({q1:5.3f}-{q3:5.3f})")
        cells.append(f"{r.diff:9.1e}")
        lines.append(" ".join(cells))
    mode = ("train mode (dropout on, each side's own kind; parity in eval mode)" if train else
            "eval mode (dropout off)")
    lines.append(f"times in ms (median over rounds); fwd = no_grad forward, f+b = forward + backward, both in {mode}: "
                 "deltas none = into every parameter, lora_* = frozen backbone, LoRA r=8 (q,v or "
                 "all linear) gradients only; ratio < 1 means ours is faster")
    return "\n".join(lines)


def _check(families: Sequence[str], batch: int, seq: int, repeats: int, deltas: Sequence[str] = ("none",)) -> None:
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise ConfigError(f"families={list(families)!r} is not usable; choose one or more of {list(FAMILIES)}.")
    if not deltas or any(d not in DELTAS for d in deltas):
        raise ConfigError(f"deltas={list(deltas)!r} is not usable; choose one or more of {list(DELTAS)}.")
    for name, value, low in (("batch", batch, 1), ("seq", seq, 4), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}={value!r} must be an integer >= {low}; e.g. batch=8, seq=128, repeats=5.")


def run_backbone_bench(families: Sequence[str] = FAMILIES, batch: int = 16, seq: int = 128, repeats: int = 5,
                       quick: bool = False, device: str = "cpu", dtype: str = "float32",
                       deltas: Sequence[str] = ("none",), padded: bool = True, clock: str = "wall",
                       train: bool = False, torch_dropout: bool = False) -> str:
    """Time native backbones against transformers (same weights, same batch); return the table as text.

    deltas: one row per family and entry of ``DELTAS`` (none, lora_qv, lora_all). padded: the ragged batch
    (default) or every row full. quick: tiny models (2 layers x 32), batch 2, seq 16, one round: a smoke test.
    clock: "wall" (default) or "cpu" (the process's CPU time, for a machine loaded by other processes).
    train: both models in train mode, dropout on (transformers' own; native: promptdelta's fused dropout, or
    torch's with ``torch_dropout``).
    """
    families = [families] if isinstance(families, str) else list(families)
    deltas = [deltas] if isinstance(deltas, str) else list(deltas)
    if quick:
        batch, seq, repeats = min(batch, 2), min(seq, 16), 1
    _check(families, batch, seq, repeats, deltas)
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported here; use one of {sorted(_DTYPES)}.")
    if clock not in CLOCKS or (clock == "cpu" and device.startswith("cuda")):
        raise ConfigError(f"clock={clock!r} does not fit device {device!r}; use 'wall', or 'cpu' on a CPU device "
                          "(OMP_WAIT_POLICY=PASSIVE promptdelta bench backbone --clock cpu).")
    target_s = 0.0 if quick else 0.2
    setups = [_setup(f, d, batch, seq, quick, device, _DTYPES[dtype], target_s, padded, train, torch_dropout)
              for f in families for d in deltas]
    for i in range(repeats):
        for row, fns, numbers in setups:
            _time_family_round(fns, numbers, swap=i % 2 == 1, times=row.times, clock=clock)
            _sync(device)
    header = (f"backbone benchmark: native vs transformers {_tf_version()} (same weights), device {device}, "
              f"{dtype}, {torch.get_num_threads()} threads, batch {batch} x seq {seq} ("
              + (f"right-padded rows down to {seq - (batch - 1) * seq // (2 * batch)} tokens" if padded else
                 "no padding") + f"; T5 decoder {max(1, seq // 4)} tokens), "
              f"{repeats} interleaved rounds, clock {clock}, "
              + (f"train mode, native dropout: {'torch' if torch_dropout else 'promptdelta fused'}" if train
                 else "eval mode"))
    table = _format([s[0] for s in setups], header, train)
    return table


def _tf_version() -> str:
    import transformers

    return transformers.__version__


# --------------------------------------------------------------------------------------------- profile
def profile_family(family: str, batch: int = 16, seq: int = 128, train: bool = True, quick: bool = False,
                   device: str = "cpu", top: int = 15, deltas: str = "none", padded: bool = True,
                   train_mode: bool = False, torch_dropout: bool = False) -> str:
    """torch.profiler tables (self CPU time, top ops) of one HF and one native step, to see what differs."""
    from torch.profiler import ProfilerActivity, profile

    hf, ours, size = build_pair(family, quick, device)
    for model in (hf, ours):
        torch.manual_seed(2)
        attach_deltas(model, deltas)
    data = make_batch(family, hf, batch, seq, device, padded)
    set_mode(ours, hf, train_mode, torch_dropout)
    out = [f"profile of {family} ({size}), deltas {deltas}, {'forward+backward' if train else 'forward'}, "
           f"batch {batch} x {seq}" + ("" if padded else ", no padding")
           + (f", train mode (native dropout: {'torch' if torch_dropout else 'fused'})" if train_mode else "")]
    for who, model in (("transformers", hf), ("ours", ours)):
        fn = (_train_step if train else _forward)(family, model, data)
        fn()   # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        out += [f"--- {who}", prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``promptdelta bench backbone [--families bert,t5] [--deltas none,lora_qv,lora_all] [--batch 16]
    [--seq 128] [--repeats 5] [--no-padding] [--quick] [--device cpu|cuda] [--dtype float32|bfloat16|float16]
    [--clock wall|cpu] [--train [--torch-dropout]] [--profile FAMILY [--profile-forward]]``."""
    p = argparse.ArgumentParser(prog="promptdelta bench backbone", description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    p.add_argument("--deltas", default="none", help="comma-separated subset of " + ",".join(DELTAS)
                   + " (one row per family and entry; the profile takes the first)")
    p.add_argument("--no-padding", action="store_true", help="every row full length (default: ragged rows)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians over them)")
    p.add_argument("--quick", action="store_true", help="tiny models, one round (a smoke test)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                   help="wall (default) or cpu: the process's CPU time, for a loaded machine (with OMP_WAIT_POLICY=PASSIVE)")
    p.add_argument("--train", action="store_true",
                   help="train mode, dropout on: transformers with its own dropout, native with promptdelta's fused one")
    p.add_argument("--torch-dropout", action="store_true", help="with --train: the native model uses torch's dropout")
    p.add_argument("--profile", metavar="FAMILY", help="print torch.profiler tables for one family instead")
    p.add_argument("--profile-forward", action="store_true", help="profile the forward only (default f+b)")
    args = p.parse_args(argv)
    deltas = [d.strip() for d in args.deltas.split(",") if d.strip()]
    if args.profile:
        _check([args.profile], args.batch, args.seq, 1, deltas)
        print(profile_family(args.profile, args.batch, args.seq, not args.profile_forward, args.quick, args.device,
                             deltas=deltas[0], padded=not args.no_padding, train_mode=args.train,
                             torch_dropout=args.torch_dropout))
        return 0
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    print(run_backbone_bench(families, args.batch, args.seq, args.repeats, args.quick, args.device, args.dtype,
                             deltas, not args.no_padding, args.clock, args.train, args.torch_dropout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
