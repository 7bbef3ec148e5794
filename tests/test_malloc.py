"""keep_freed_memory: freed buffers stay in the heap, so reallocating them does not page-fault."""

import platform
import subprocess
import sys

import pytest

from promptdelta.utils import malloc

SCRIPT = """
import resource, sys, torch
from promptdelta.utils.malloc import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
for _ in range(3):
    torch.empty(16 << 20).fill_(1.0)                  # 64 MiB a few times (the heap settles), then freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(16 << 20).fill_(1.0)                  # the same size again: fresh pages or the freed ones?
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


def _faults(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={"PATH": "", "OMP_NUM_THREADS": "1"})
    applied, faults = out.stdout.split()
    return applied, float(faults)


@glibc
def test_reallocating_a_freed_buffer_stops_page_faulting():
    applied, kept = _faults("keep")
    _, default = _faults("default")
    assert applied == "True"
    assert default > 8000          # 64 MiB is above glibc's mmap threshold: 16,384 fresh pages per allocation
    assert kept < 100              # served from the heap's freed memory


def test_env_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("PROMPTDELTA_KEEP_FREED_MEMORY", "0")
    assert malloc.keep_freed_memory() is False
