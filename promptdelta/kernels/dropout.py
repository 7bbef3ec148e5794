"""Fused CPU dropout (Srivastava et al. 2014, "Dropout"): y = x * m / (1 - p), m_i ~ Bernoulli(1 - p).

The mask comes from a counter-based generator: element i of a call is kept when
``hash(seed, i) >= p * 2^32`` (``csrc/dropout_cpu.cpp``), so

- the backward regenerates the mask from the seed (dx = g * m / (1 - p)) and nothing but the seed is saved
  (torch's dropout keeps a mask tensor alive until the backward);
- the numbers cost a few vectorised integer ops per element: torch's ``bernoulli_`` runs its generator one
  step at a time and was ~12% of a MiniLM training step on CPU;
- the seed is drawn from torch's default CPU generator on every call, so ``torch.manual_seed`` and saved
  RNG states (the trainer's bit-exact resume) reproduce the masks. The masks differ from torch's own.

Element i is the index in the tensor's logical row-major order, whatever its strides; the output is
contiguous. float32, bfloat16 and float64 on CPU use the kernel; other dtypes and devices (torch's dropout
is fast on CUDA), ``p == 1`` and a machine where the build fails use ``F.dropout`` (the failure warns once).
The build is the one of ``native.py``: ``torch.utils.cpp_extension`` with ``-O3 -march=native -fopenmp``,
cached under a name hashing the source, ~20 s once per machine; ``PROMPTDELTA_NATIVE=0`` skips it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from promptdelta.errors import ConfigError

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "dropout_cpu.cpp"
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_module: ModuleType | None = None
_error: str | None = None


def _build_name() -> str:
    """A module name unique to the source, the CPU's flags (``-march=native``) and the torch version."""
    flags = platform.processor()
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith(("flags", "Features"))), flags)
    except OSError:
        pass
    key = SOURCE.read_bytes() + flags.encode() + torch.__version__.encode()
    return "promptdelta_dropout_cpu_" + hashlib.sha1(key).hexdigest()[:12]


def _compile(name: str, build_dir: Path) -> ModuleType:
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    return load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)


def dropout_ops() -> ModuleType | None:
    """The compiled kernels (built on the first call), or None when disabled or unbuildable here."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    if os.environ.get("PROMPTDELTA_NATIVE", "1") == "0":
        _error = "disabled by PROMPTDELTA_NATIVE=0"
        return None
    # the LoRA kernels' build: its lock (stale-lock recovery, bounded wait) and a timeout on a hung compiler
    from promptdelta.kernels.native import _build_with_timeout, _timeout_s, build_directory

    try:
        name = _build_name()
        logger.info("loading the fused CPU dropout kernel (%s; the first use on a machine compiles it)", name)
        _module = _build_with_timeout(name, build_directory(name), _timeout_s(), compile_fn=_compile)
    except Exception as exc:  # no compiler, no OpenMP, a read-only cache: torch's dropout, same statistics
        msg = str(exc).strip()
        _error = f"{type(exc).__name__}: {msg.splitlines()[-1] if msg else ''}"
        logger.warning("fused CPU dropout unavailable (%s); torch's dropout is used instead (same statistics, "
                       "slower). The build needs a C++ compiler with OpenMP (g++) and ninja; set "
                       "PROMPTDELTA_NATIVE=0 to skip it.", _error)
    return _module


def dropout_error() -> str | None:
    """Why the kernel is unavailable (None when it loaded or was not tried yet)."""
    return _error


def draw_seed() -> int:
    """A 63-bit seed from torch's default CPU generator (so manual_seed and RNG-state restores replay it)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"dropout probability must be in [0, 1], got {p}; fix the model's or config's dropout")


def fused_applies(x: Tensor, p: float) -> bool:
    """Whether the kernel takes ``x`` (CPU, float32/bfloat16/float64, 0 < p < 1, the build loaded)."""
    return x.device.type == "cpu" and x.dtype in DTYPES and 0.0 < p < 1.0 and dropout_ops() is not None


class DropoutFunction(torch.autograd.Function):
    """y = x * m / (1 - p); the backward is the same op on g with the same seed (so it is differentiable too)."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float, seed: int) -> Tensor:  # type: ignore[override]
        ctx.p, ctx.seed = p, seed
        return dropout_ops().apply(x, seed, p)  # type: ignore[union-attr]

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return DropoutFunction.apply(g, ctx.p, ctx.seed), None, None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Drop-in for ``F.dropout(x, p, training)``: the fused kernel on CPU, torch's dropout elsewhere."""
    check_p(p)
    if not training or p == 0.0:
        return x
    if not fused_applies(x, p):
        return F.dropout(x, p, training)
    return DropoutFunction.apply(x, p, draw_seed())


def dropout_with_seed(x: Tensor, p: float, seed: int) -> Tensor:
    """The kernel with an explicit seed (tests, and regenerating a mask: ``dropout_with_seed(ones, p, s)``)."""
    check_p(p)
    if dropout_ops() is None:
        raise RuntimeError(f"the fused dropout kernel is unavailable: {dropout_error()}")
    return DropoutFunction.apply(x, p, seed)


class FastDropout(nn.Dropout):
    """Drop-in for ``nn.Dropout`` (same ``p`` and ``inplace``, same empty state_dict) running :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:   # in-place callers keep torch's op: ours writes a new tensor
            return F.dropout(x, self.p, self.training, inplace=True)
        return dropout(x, self.p, self.training)
