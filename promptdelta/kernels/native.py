"""Native CPU kernels for the fused LoRA layer (``csrc/lora_cpu.cpp``), compiled on first use.

The torch-ops layer (``cpu.py``) spends what it costs above the frozen layer in six tall-skinny products,
each a separate MKL pass over an (M, K) or (M, N) matrix at a fraction of peak. The native layer is a C++
autograd function (``lora_linear``) over kernels that do them in four steps:

    shrink   xa = x_l A^T                           forward
    expand   out = b + s xa B^T                     forward (the base GEMM then accumulates into out)
    backward gb = g B and dB^T = xa^T g, then       one pass over each 16-row block of g,
             s gb A (dx's start) and dA = gb^T x_l  then of x_l, while the block is in L1/L2

With at least ``cpu.PIPELINE_ROWS`` rows per thread, each thread runs the whole layer on its own rows,
base GEMM included (single-threaded MKL on its rows), so a row block goes from the skinny products to
the GEMM on one core; fewer rows keep torch's multi-threaded GEMMs. Being C++, the autograd node costs no
Python call (a Python ``autograd.Function`` around the same kernels measured ~1% slower).

fp32 on CPU, rank 1, 2, 4, 8 or 16; other ranks, dtypes and devices keep the torch ops. The build
(``torch.utils.cpp_extension.load`` with ``-O3 -march=native -fopenmp``, about 40 s once per machine,
cached under ``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``) needs a C++ compiler with OpenMP
and ninja; when it fails, a warning names the cause and the torch ops are used, with the same results.
``PROMPTDELTA_NATIVE=0`` skips the build altogether.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "lora_cpu.cpp"
RANKS = (1, 2, 4, 8, 16)
_module: ModuleType | None = None
_error: str | None = None


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` compiles for them, so they are part of the build key)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_name() -> str:
    """A module name unique to this source, compiler target and torch version."""
    key = SOURCE.read_bytes() + _cpu_flags().encode() + torch.__version__.encode()
    return "promptdelta_lora_cpu_" + hashlib.sha1(key).hexdigest()[:12]


def native_ops() -> ModuleType | None:
    """The compiled kernels (built on the first call), or None when disabled or unbuildable here."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    if os.environ.get("PROMPTDELTA_NATIVE", "1") == "0":
        _error = "disabled by PROMPTDELTA_NATIVE=0"
        return None
    try:
        from torch.utils.cpp_extension import load

        name = _build_name()
        logger.info("loading the native CPU LoRA kernels (%s; the first use on a machine compiles them, "
                    "about 30 s)", name)
        _module = load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no OpenMP, a read-only cache: fall back to the torch ops
        _error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        logger.warning("native CPU LoRA kernels unavailable (%s); the fused LoRA layer uses torch ops instead "
                       "(same results, slower). The build needs a C++ compiler with OpenMP (g++) and "
                       "ninja (`pip install ninja`); set PROMPTDELTA_NATIVE=0 to skip it.", _error)
    return _module


def native_error() -> str | None:
    """Why the native kernels are unavailable (None when they loaded or were not tried yet)."""
    return _error


def native_applies(x: torch.Tensor, lora_a: torch.Tensor) -> bool:
    """Whether the native kernels take these operands: fp32 CPU tensors and a rank in ``RANKS``."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and lora_a.dtype == torch.float32
            and lora_a.shape[0] in RANKS)
