"""Public entry points: pick the LoRA implementation by device, dtype and dropout.

``impl`` for ``lora_linear``:
    "auto" / "fused"  CUDA with Triton importable and fp32/bf16/fp16 -> "triton", otherwise -> "cpu"
    "cpu"             the fused layer: for fp32 CPU tensors of rank 1/2/4/8/16, the native C++ kernels and
                      autograd function (``native.py``) when they build; otherwise the torch autograd
                      function of ``cpu.py`` (plain torch ops, so any device)
    "native"          the native path, required (DeltaError when it does not apply or did not build)
    "torch-ops"       the torch autograd function only (for comparison)
    "triton"          the Triton kernels (``triton_lora.py``); CUDA, or CPU under TRITON_INTERPRET=1
    "plain"           base linear + separate A and B linears, as unfused LoRA modules compute it
Dropout (``dropout_p > 0`` and ``training``) is applied to x for the LoRA branch only; every path then
takes that dropped input as a second operand, so correctness does not depend on the path.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DeltaError
from .cpu import fused_lora_linear
from .multi import lora_multi_torch

logger = logging.getLogger(__name__)

IMPLS = ("auto", "fused", "plain", "triton", "cpu", "native", "torch-ops")
MULTI_IMPLS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_triton_error: str | None = None


def _triton(module: str = "triton_lora"):
    """The Triton module (imported on first use), or None when triton cannot be imported here."""
    global _triton_error
    if _triton_error is not None:
        return None
    try:
        return importlib.import_module(f"{__package__}.{module}")
    except Exception as exc:  # ImportError, or a triton that fails at import on this machine
        _triton_error = f"{type(exc).__name__}: {exc}"
        logger.info("Triton LoRA kernels unavailable (%s); using the torch paths", _triton_error)
        return None


def triton_available() -> bool:
    """True when the Triton kernels can be imported (they still need CUDA tensors or TRITON_INTERPRET=1)."""
    return _triton() is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def plain_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, scale: float, x_lora: torch.Tensor | None = None) -> torch.Tensor:
    """Unfused LoRA: F.linear(x, W, b) + s * B(A(x_l)), each a separate op with its own temporary."""
    lora_in = x if x_lora is None else x_lora
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(lora_in, lora_a), lora_b)


def _check_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                    lora_b: torch.Tensor) -> None:
    """Raise DeltaError naming the operand whose shape, dtype or device does not fit x (..., K)."""
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise DeltaError(f"weight has shape {tuple(weight.shape)} but x has {k} features; pass weight (N, {k}).")
    n = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (n,):
        raise DeltaError(f"bias has shape {tuple(bias.shape)}; pass bias ({n},) or None.")
    if lora_a.dim() != 2 or lora_a.shape[1] != k:
        raise DeltaError(f"lora_a has shape {tuple(lora_a.shape)}; pass lora_a (r, {k}).")
    r = lora_a.shape[0]
    if tuple(lora_b.shape) != (n, r):
        raise DeltaError(f"lora_b has shape {tuple(lora_b.shape)}; pass lora_b ({n}, {r}) to match weight "
                         f"({n}, {k}) and lora_a ({r}, {k}).")
    for name, t in (("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise DeltaError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; move it "
                             f"with .to(x.device, x.dtype) (for a delta: model.to(...) after attach).")


def _autocast_operands(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under ``torch.autocast`` for the operands' device, cast them all to the autocast dtype, as autocast
    does for ``F.linear``; a custom autograd function is not autocast by torch. Gradients flow back through
    the casts, so fp32 parameters still receive fp32 gradients."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)


def _resolve(impl: str, x: torch.Tensor) -> str:
    """The concrete path ("cpu", "native", "torch-ops", "triton" or "plain") for ``impl`` on x's device and dtype."""
    if impl not in IMPLS:
        raise ConfigError(f"impl={impl!r} is not a LoRA implementation; use one of {', '.join(IMPLS)}.")
    if impl in ("auto", "fused"):
        fast = x.is_cuda and x.dtype in _TRITON_DTYPES and triton_available()
        return "triton" if fast else "cpu"
    if impl == "triton":
        if not triton_available():
            raise DeltaError(f"impl='triton' but triton cannot be imported ({_triton_error}); install it with "
                             "`pip install promptdelta[gpu]` or use impl='auto'.")
        if not (x.is_cuda or _interpreting()) or x.dtype not in _TRITON_DTYPES:
            raise DeltaError(f"impl='triton' needs CUDA tensors in fp32/bf16/fp16, got {x.dtype} on {x.device}; "
                             "use impl='auto' (or TRITON_INTERPRET=1, for tests only).")
    return impl


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, *, dropout_p: float = 0.0, training: bool = False,
                impl: str = "auto") -> torch.Tensor:
    """LoRA linear y = x W^T + b + s (drop(x) A^T) B^T: x (..., K), W (N, K), A (r, K), B (N, r) -> (..., N)."""
    x, weight, bias, lora_a, lora_b = _autocast_operands(x, weight, bias, lora_a, lora_b)
    path = _resolve(impl, x)
    if not 0.0 <= dropout_p < 1.0:
        raise ConfigError(f"dropout_p={dropout_p} is outside [0, 1); pass a LoRA dropout such as 0.0 or 0.1.")
    _check_operands(x, weight, bias, lora_a, lora_b)
    x_lora = F.dropout(x, dropout_p, training=True) if training and dropout_p > 0 else None
    if path == "plain":
        return plain_lora_linear(x, weight, bias, lora_a, lora_b, scale, x_lora)
    if path == "triton":
        return _triton().triton_lora_linear(x, weight, bias, lora_a, lora_b, scale, x_lora)
    native = {"native": True, "torch-ops": False}.get(path)
    return fused_lora_linear(x, weight, bias, lora_a, lora_b, scale, x_lora, native=native)


def _multi_scales(scales: float | Sequence[float] | torch.Tensor, n_adapters: int,
                  like: torch.Tensor) -> torch.Tensor:
    """Per-adapter scales as a float32 tensor (L,) on x's device."""
    s = torch.as_tensor(scales, dtype=torch.float32, device=like.device)
    if s.dim() == 0:
        s = s.expand(n_adapters)
    if tuple(s.shape) != (n_adapters,):
        raise DeltaError(f"scales has shape {tuple(s.shape)} for {n_adapters} adapters; pass one float or "
                         f"{n_adapters} of them.")
    return s.contiguous()


def _multi_ids(adapter_ids: torch.Tensor | Sequence[int], x: torch.Tensor, n_adapters: int) -> torch.Tensor:
    """Adapter ids broadcast to every row of x (..., K) and flattened to (M,) int64."""
    ids = torch.as_tensor(adapter_ids, device=x.device)
    lead = tuple(x.shape[:-1])
    if ids.dtype.is_floating_point or tuple(ids.shape) != lead[:ids.dim()]:
        raise DeltaError(f"adapter_ids has shape {tuple(ids.shape)} ({ids.dtype}) for x of shape "
                         f"{tuple(x.shape)}; pass integer ids of shape {lead} (per row) or {lead[:1]} "
                         "(per sequence).")
    ids = ids.reshape(ids.shape + (1,) * (len(lead) - ids.dim())).expand(lead).reshape(-1).long()
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= n_adapters):
        raise DeltaError(f"adapter_ids must lie in [-1, {n_adapters - 1}] (-1 = no adapter), got "
                         f"[{int(ids.min())}, {int(ids.max())}]; fix the ids or stack every adapter.")
    return ids


def lora_linear_multi(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      lora_a_stack: torch.Tensor, lora_b_stack: torch.Tensor,
                      scales: float | Sequence[float] | torch.Tensor, adapter_ids: torch.Tensor | Sequence[int],
                      *, impl: str = "auto") -> torch.Tensor:
    """Multi-adapter LoRA: row i gets y_i = x_i W^T + b + s_a (x_i A_a^T) B_a^T with a = adapter_ids[i].

    x (..., K); A stack (L, r, K); B stack (L, N, r); adapter_ids shaped like x's leading dims or a prefix
    of them (one id per sequence), -1 = base layer only. impl: "auto" (Triton SGMV on CUDA when no gradient
    is needed, else the torch fallback), "torch" or "triton".
    """
    if impl not in MULTI_IMPLS:
        raise ConfigError(f"impl={impl!r} is not a multi-adapter implementation; use one of "
                          f"{', '.join(MULTI_IMPLS)}.")
    if lora_a_stack.dim() != 3 or lora_b_stack.dim() != 3 or lora_a_stack.shape[0] != lora_b_stack.shape[0]:
        raise DeltaError(f"got lora_a_stack {tuple(lora_a_stack.shape)} and lora_b_stack "
                         f"{tuple(lora_b_stack.shape)}; stack adapters as (L, r, K) and (L, N, r).")
    _check_operands(x, weight, bias, lora_a_stack[0], lora_b_stack[0])
    n_adapters, n = lora_a_stack.shape[0], weight.shape[0]
    s = _multi_scales(scales, n_adapters, x)
    ids = _multi_ids(adapter_ids, x, n_adapters)
    x2 = x.reshape(-1, x.shape[-1])                                            # (M, K)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_a_stack, lora_b_stack))
    use_triton = impl == "triton" or (impl == "auto" and x.is_cuda and not needs_grad
                                      and x.dtype in _TRITON_DTYPES and triton_available())
    if not use_triton:
        return lora_multi_torch(x2, weight, bias, lora_a_stack, lora_b_stack, s, ids).view(*x.shape[:-1], n)
    _resolve("triton", x)
    out = _triton("triton_sgmv").lora_multi_triton(x2.contiguous(), weight.contiguous(), bias,
                                                   lora_a_stack.contiguous(), lora_b_stack.contiguous(), s, ids)
    return out.view(*x.shape[:-1], n)
