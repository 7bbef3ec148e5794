"""``promptdelta info``: what this installation has, in one screen.

Versions, the native CPU kernel's status (without building it: that takes ~40 s), the registered delta
methods, templates and verbalizers, and whether a GPU and Triton are usable. Each part is gathered on its own,
so one failing import shows as a line in the output instead of stopping the command.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import shutil
from typing import Any, Callable


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import promptdelta

    out = {"promptdelta": promptdelta.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    for name in ("peft", "datasets", "triton"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # not installed, or fails to import here: say so rather than stop
            out[name] = "not installed"
    return out


def _native() -> dict[str, Any]:
    """The native CPU LoRA kernels: disabled, already loaded, built in the cache, or what a first build needs."""
    from promptdelta.kernels import native

    if os.environ.get("PROMPTDELTA_NATIVE", "1") == "0":
        return {"status": "disabled by PROMPTDELTA_NATIVE=0 (torch ops are used)"}
    if native.native_error() is not None:
        return {"status": f"unavailable: {native.native_error()}"}
    tools = {"c++ compiler": shutil.which(os.environ.get("CXX", "c++")) is not None,
             "ninja": shutil.which("ninja") is not None or importlib.util.find_spec("ninja") is not None}
    try:  # torch's own build folder for this source + CPU + torch version
        from torch.utils.cpp_extension import _get_build_directory

        built = any(f.endswith(".so") for f in os.listdir(_get_build_directory(native._build_name(), False)))
    except Exception:
        built = False
    if built:
        status = "built (cached; loads on the first LoRA layer)"
    elif all(tools.values()):
        status = "not built yet: compiles on the first LoRA layer (about 40 s, once per machine)"
    else:
        missing = [k for k, ok in tools.items() if not ok]
        status = f"cannot build here (missing {', '.join(missing)}): LoRA uses torch ops (same results, slower)"
    return {"status": status, **tools}


def _deltas() -> list[str]:
    import promptdelta.deltas  # noqa: F401  (each method file registers itself on import)
    from promptdelta.deltas import base

    listed = getattr(base, "registered_deltas", None)
    return sorted(listed() if callable(listed) else base._REGISTRY)


def _prompt_registry(kind: str) -> list[str] | str:
    """Names in the template / verbalizer registry (promptdelta/prompts/registry.py), when it exists."""
    try:
        registry = importlib.import_module("promptdelta.prompts.registry")
    except ModuleNotFoundError:
        return "no registry in this version (promptdelta/prompts/registry.py)"
    for attr in (f"registered_{kind}s", f"{kind}_names", f"list_{kind}s"):
        fn = getattr(registry, attr, None)
        if callable(fn):
            return sorted(fn())
    tables = [v for k, v in vars(registry).items() if kind.upper() in k.upper() and isinstance(v, dict)]
    return sorted(tables[0]) if tables else f"the registry lists no {kind}s"


def _gpu() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"cuda": torch.cuda.is_available()}
    if out["cuda"]:
        out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    from promptdelta.kernels.dispatch import triton_available

    triton = triton_available()
    out["triton"] = ("usable on the GPU" if triton and out["cuda"] else
                     "importable (CPU only under TRITON_INTERPRET=1)" if triton else "not importable")
    return out


PARTS: dict[str, Callable[[], Any]] = {"versions": _versions, "native_cpu_kernels": _native, "deltas": _deltas,
                                       "templates": lambda: _prompt_registry("template"),
                                       "verbalizers": lambda: _prompt_registry("verbalizer"), "gpu": _gpu}


def collect_info() -> dict[str, Any]:
    """Every part of ``promptdelta info``; a part that fails reads ``"error: <Type>: <message>"``."""
    out: dict[str, Any] = {}
    for name, fn in PARTS.items():
        try:
            out[name] = fn()
        except Exception as exc:  # one broken part must not hide the others
            out[name] = f"error: {type(exc).__name__}: {exc}"
    return out


def format_info(info: dict[str, Any]) -> str:
    """Plain text: one ``key: value`` line per entry, nested mappings indented."""
    lines = []
    for name, value in info.items():
        if isinstance(value, dict):
            lines.append(f"{name}:")
            lines += [f"  {k}: {v}" for k, v in value.items()]
        elif isinstance(value, list):
            lines.append(f"{name}: {', '.join(value)}")
        else:
            lines.append(f"{name}: {value}")
    return "\n".join(lines)
