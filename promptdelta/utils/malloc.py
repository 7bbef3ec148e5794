"""Keep freed memory in the process (glibc), so CPU training does not page-fault on every step.

torch's CPU allocator hands large buffers to glibc ``malloc``. glibc gives a freed buffer at the top of
the heap back to the kernel once more than ``M_TRIM_THRESHOLD`` bytes are free there, and serves large
requests with fresh ``mmap`` s (its threshold adapts, up to 32 MiB); either way the next step's buffers
arrive as untouched pages, and the first write to each 4 KiB page is a minor page fault (about 10% of a
LoRA layer's step, and timings that jump with the heap's history: docs/results/kernels.md). Raising both
thresholds (what PyTorch's CUDA caching allocator does on the GPU, and what jemalloc/tcmalloc, the
allocators Intel recommends for PyTorch on CPU, do in their own way) keeps the memory in the heap for
reuse: steady-state steps then fault ~0 times.
The cost: the process's resident size stays at its peak instead of shrinking between steps.

It is opt-in. ``promptdelta bench kernel`` applies it (``--default-malloc`` measures without), so its
ratios compare kernels rather than heap histories; ``promptdelta run`` leaves glibc alone, because a whole
training step's time did not move with it (docs/results/kernels.md). A no-op returning False off glibc or
with ``PROMPTDELTA_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1          # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
DEFAULT_BYTES = 1 << 30        # buffers up to 1 GiB come from the heap and stay there when freed
_applied: int | None = None


def keep_freed_memory(threshold_bytes: int = DEFAULT_BYTES) -> bool:
    """Raise glibc's trim and mmap thresholds to ``threshold_bytes``; True when glibc accepted both.

    Process-wide and lasting; call it once at start-up. Returns False (and changes nothing) on a libc
    other than glibc, and when ``PROMPTDELTA_KEEP_FREED_MEMORY=0``."""
    global _applied
    if os.environ.get("PROMPTDELTA_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if _applied == threshold_bytes:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_TRIM_THRESHOLD, threshold_bytes) == 1 and \
            libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1
    except (OSError, AttributeError) as exc:
        logger.debug("mallopt unavailable: %s", exc)
        return False
    if ok:
        _applied = threshold_bytes
    return ok


def freed_memory_kept() -> bool:
    """Whether ``keep_freed_memory`` has been applied in this process."""
    return _applied is not None
