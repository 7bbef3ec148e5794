"""Kernel test fixtures.

``triton_interp`` imports triton and the Triton kernel modules with TRITON_INTERPRET=1 (triton reads the
variable when a function is decorated, i.e. at import, its own ``tl.zeros`` & co included). If triton was
already imported without it, its Python modules are dropped and re-imported (the compiled ``triton._C``
stays loaded). On teardown the variable is restored and those modules dropped again, so no other test
folder sees interpreted kernels or the variable.
"""

import importlib
import os
import sys

import pytest
import torch

_KERNEL_MODULES = ("promptdelta.kernels.triton_lora", "promptdelta.kernels.triton_sgmv")


def _drop_triton_modules(triton_too: bool = True) -> None:
    for name in list(sys.modules):
        is_triton = triton_too and (name == "triton" or name.startswith("triton.")) and not name.startswith("triton._C")
        if is_triton or name in _KERNEL_MODULES:
            del sys.modules[name]


@pytest.fixture(scope="module")
def triton_interp():
    """(triton_lora, triton_sgmv) modules whose kernels run on CPU tensors through the Triton interpreter."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    _drop_triton_modules()
    try:
        pytest.importorskip("triton")
        yield tuple(importlib.import_module(name) for name in _KERNEL_MODULES)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
        # Re-importing triton a third time makes nanobind report leaks at exit; only a CUDA session, whose
        # GPU tests need the compiled triton back, pays that.
        _drop_triton_modules(triton_too=torch.cuda.is_available())
