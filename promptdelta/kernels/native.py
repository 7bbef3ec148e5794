"""Native CPU kernels for the fused LoRA layer (``csrc/``: ``lora_cpu.cpp`` including ``lora_simd.h`` and
``lora_rank16.h``), compiled on first use.

The torch-ops layer (``cpu.py``) spends what it costs above the frozen layer in six tall-skinny products,
each a separate MKL pass over an (M, K) or (M, N) matrix at a fraction of peak. The native layer is a C++
autograd function (``lora_linear``) over kernels that do them in four steps:

    shrink   xa = x_l A^T                           forward
    expand   out = b + s xa B^T                     forward (the base GEMM then accumulates into out)
    backward gb = g B and dB^T = xa^T g, then       one pass over each 16-row block of g,
             s gb A (dx's start) and dA = gb^T x_l  then of x_l, while the block is in L1/L2

Where the compiler targets AVX-512, the base GEMM is our own (``csrc/lora_gemm.h``, cache-blocked, 8 x 32
register tiles) and carries the low-rank product as R more steps of its inner dimension: the forward is
``shrink`` then one GEMM ``b + x W^T + xa (s B^T)``, the backward the blocked pass then one GEMM
``dx = g W + gb (s A)``, so no expand pass writes out or dx first (on the 2-core Zen 4 we measure on, this
GEMM runs ~8-15% faster than MKL's at these shapes; ``set_own_gemm(False)`` switches back for comparison).
Elsewhere, with MKL's GEMM: from ``cpu.PIPELINE_ROWS`` rows per thread, each thread runs the whole layer on
its own rows, base GEMM included (single-threaded MKL on its rows), so a row block goes from the skinny
products to the GEMM on one core; fewer rows keep torch's multi-threaded GEMMs. Being C++, the autograd node costs no
Python call (a Python ``autograd.Function`` around the same kernels measured ~1% slower).

fp32 on CPU, rank 1, 2, 4, 8 or 16; other ranks, dtypes and devices keep the torch ops. The build
(``torch.utils.cpp_extension.load`` with ``-O3 -march=native -fopenmp``, about 40 s once per machine,
cached under ``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``) needs a C++ compiler with OpenMP
and ninja; when it fails, a warning names the cause and the torch ops are used, with the same results.
``PROMPTDELTA_NATIVE=0`` skips the build altogether.

The build can never wedge a machine: torch's own build lock (a bare ``lock`` file, left behind forever by a
build that was killed) is guarded by our lock ``<build dir>.promptdelta-lock`` holding the builder's pid and
host. A lock whose pid is dead is stale and removed (with torch's lock under it); a live builder is waited
for with a message, at most ``PROMPTDELTA_NATIVE_TIMEOUT`` seconds (default 300), as is the build itself;
past that the torch ops are used with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "lora_cpu.cpp"             # the one translation unit; it includes the csrc/*.h headers
RANKS = (1, 2, 4, 8, 16)
TIMEOUT_ENV, DEFAULT_TIMEOUT_S = "PROMPTDELTA_NATIVE_TIMEOUT", 300.0
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


def source_files() -> list[Path]:
    """Every file the build reads (csrc/lora_*.cpp and lora_*.h), in a fixed order: all of them key the build.
    Other extensions' sources in csrc/ (dropout_cpu.cpp) are not read, so editing them forces no rebuild."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h") and p.name.startswith("lora_"))


def _build_name() -> str:
    """A module name unique to these sources (names and bytes), compiler target and torch version."""
    key = b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in source_files())
    key += _cpu_flags().encode() + torch.__version__.encode()
    return "promptdelta_lora_cpu_" + hashlib.sha1(key).hexdigest()[:12]


def _timeout_s() -> float:
    try:
        return max(0.0, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def build_directory(name: str) -> Path:
    """Where torch builds ``name`` (its usual cache folder, so an earlier build is reused)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, verbose=False))
    except (ImportError, TypeError):      # a private helper: fall back to its documented default
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
        return Path(root) / name


def _lock_owner(lock: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file; None when it cannot be read (being written, or garbage)."""
    try:
        pid, host = lock.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def _is_stale(lock: Path) -> bool:
    """A lock left by a dead process on this host (or unreadable for over a minute: a torn write)."""
    from promptdelta.utils.proc import pid_alive

    owner = _lock_owner(lock)
    if owner is None:
        try:
            return time.time() - lock.stat().st_mtime > 60
        except OSError:
            return False
    pid, host = owner
    return host == socket.gethostname() and not pid_alive(pid)


def acquire_build_lock(build_dir: Path, timeout_s: float, poll_s: float = 0.5) -> Path | None:
    """Take ``<build_dir>.promptdelta-lock`` (O_EXCL, holding our pid and host); a stale lock is removed
    along with torch's ``lock`` under it. Returns the lock path, or None after ``timeout_s`` of waiting."""
    lock = build_dir.parent / f"{build_dir.name}.promptdelta-lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    deadline, told = time.monotonic() + timeout_s, False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _is_stale(lock):
                logger.warning("removing the stale native-kernel build lock %s (its process %s is gone)",
                               lock, _lock_owner(lock))
                lock.unlink(missing_ok=True)
                continue
            if time.monotonic() >= deadline:
                return None
            if not told:
                logger.info("waiting for process %s, which is building the native CPU LoRA kernels (at most "
                            "%.0f s; %s sets the limit)", _lock_owner(lock), timeout_s, TIMEOUT_ENV)
                told = True
            time.sleep(poll_s)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        (build_dir / "lock").unlink(missing_ok=True)   # torch's: only a killed build (under our lock) leaves it
        return lock


def _compile(name: str, build_dir: Path):
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    return load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)


def _build_with_timeout(name: str, build_dir: Path, timeout_s: float,
                        compile_fn: Callable[[str, Path], ModuleType] | None = None) -> ModuleType:
    """Build under the lock, in a thread so a hung compiler costs at most ``timeout_s`` (the thread then
    finishes in the background and frees the lock). ``compile_fn(name, build_dir)`` builds and loads the
    module (default: these LoRA sources); other extensions pass their own."""
    lock = acquire_build_lock(build_dir, timeout_s)
    if lock is None:
        raise TimeoutError(f"another process held the build lock for over {timeout_s:.0f} s")
    out: dict[str, object] = {}

    def work() -> None:
        try:
            out["module"] = (compile_fn or _compile)(name, build_dir)
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
            out["error"] = exc
        finally:
            lock.unlink(missing_ok=True)

    thread = threading.Thread(target=work, name="promptdelta-native-build", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"the build took over {timeout_s:.0f} s")
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["module"]  # type: ignore[return-value]


def native_ops() -> ModuleType | None:
    """The compiled kernels (built on the first call), or None when disabled or unbuildable here."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    if os.environ.get("PROMPTDELTA_NATIVE", "1") == "0":
        _error = "disabled by PROMPTDELTA_NATIVE=0"
        return None
    try:
        name = _build_name()
        logger.info("loading the native CPU LoRA kernels (%s; the first use on a machine compiles them, "
                    "about 30 s)", name)
        _module = _build_with_timeout(name, build_directory(name), _timeout_s())
    except Exception as exc:  # no compiler, no OpenMP, a read-only cache, a timeout: fall back to the torch ops
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
