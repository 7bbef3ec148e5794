"""The one way the micro-benchmarks build a ``torch.utils.benchmark.Timer``.

``Timer`` runs its statement with ``num_threads=1`` unless told otherwise, whatever
``torch.get_num_threads()`` says; the benchmarks time at the thread count the process runs with (2 on
the 2-core CI machine), so every timer passes it explicitly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.benchmark import Timer


def timer(fn: Callable[[], object]) -> Timer:
    """A Timer for ``fn()`` at the process's current torch thread count."""
    return Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
