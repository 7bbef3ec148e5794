"""Fused LoRA linear as one ``torch.autograd.Function`` (the CPU path; plain torch ops, so any device).

Forward writes the cheap rank-r term first and lets the big GEMM accumulate into it (no (M, N) temporary,
and no extra read-modify-write pass over the output: BLAS adds C into its tiles with beta=1 as it stores them):

    xa  = x_l A^T                   (M, r)   x_l = x, or dropout(x) for the LoRA branch
    out = b + s xa B^T              torch.addmm(b, xa, B^T, alpha=s), B^T kept contiguous (r, N)
    out += x W^T                    out.addmm_(x, W^T)
The other order (out = b + x W^T, then out += s xa B^T) reads and writes out once more.

It saves only x, xa (and x_l when dropout made a separate one). Backward, in the same spirit:

    gb = g B                        (M, r), g @ (contiguous B^T)^T
    dx = s gb A, then dx += g W     the rank-r term first, the big GEMM accumulates into it (beta=1)
    dA = s gb^T x                   (r, K)
    dB = s (xa^T g)^T               (N, r); much faster than g^T xa, whose (N, M) operand is transposed
When dropout gives the LoRA branch its own input x_l, dx = g W and the branch's s gb A goes to x_l.
On fp32 CPU tensors of rank 1/2/4/8/16, ``fused_lora_linear`` runs the native layer instead
(``native.py``: the same algebra, C++ kernels that fuse the skinny products in pairs, one thread per row
range, a C++ autograd node); this function is the path for other dtypes, ranks and devices, and the
comparison in the benchmark (``promptdelta bench kernel``). What this function leaves is the six skinny
products (x A^T, xa B^T, g B, gb A, gb^T x, xa^T g), each a full MKL pass over an (M, K) or (M, N) matrix.

Inference (no gradient, fp32, M (K + N) >= 2 N K) on this function's path takes the exact shortcut
y = x (W + s B A)^T + b (``merge_on_the_fly``): one pass over W instead of two over x. Where the native layer
runs, it runs for inference too. Why these choices: the dated measurements are in docs/results/kernels.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import DeltaError
from .native import RANKS, native_applies, native_error, native_ops
from .reference import merged_weight


# Native path: from this many rows per thread, each thread runs the layer on its own rows, base GEMM included
# (each thread then packs all of W); below it MKL's threaded GEMM measured as fast or faster (docs/results/kernels.md).
PIPELINE_ROWS = 512


class FusedLoRAFunction(torch.autograd.Function):
    """y = x W^T + b + s (x_l A^T) B^T on 2-D inputs, with torch ops; W and b get gradients only if they
    require them. The native path (``native.py``) is the same layer as a C++ autograd function."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_lora: torch.Tensor | None, weight: torch.Tensor,
                bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float) -> torch.Tensor:
        b_t = lora_b.t().contiguous()                                          # (r, N)
        xa = torch.mm(x if x_lora is None else x_lora, lora_a.t())             # (M, r)
        if bias is None:                                                       # the rank-r term first ...
            out = torch.mm(xa, b_t).mul_(scale)                                # (M, N)
        else:
            out = torch.addmm(bias, xa, b_t, alpha=scale)                      # (M, N)
        out.addmm_(x, weight.t())                                              # ... then the GEMM adds into it
        ctx.scale = scale
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, x_lora, xa, weight, lora_a, b_t)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, x_lora, xa, weight, lora_a, b_t = ctx.saved_tensors
        s, needs = ctx.scale, ctx.needs_input_grad
        g = grad_out.contiguous()                                              # (M, N)
        gb = torch.mm(g, b_t.t())                                              # (M, r)
        dx = dx_lora = None
        if needs[0]:
            if x_lora is None:                                                 # dx = s gb A + g W: the GEMM
                dx = torch.mm(gb, lora_a * s)                                  # accumulates into the rank-r
                dx.addmm_(g, weight)                                           # term (beta=1), (M, K)
            else:
                dx = torch.mm(g, weight)                                       # (M, K)
        if x_lora is not None and needs[1]:
            dx_lora = torch.mm(gb, lora_a).mul_(s)                             # (M, K)
        d_a = torch.mm(gb.t(), x if x_lora is None else x_lora).mul_(s) if needs[4] else None   # (r, K)
        d_b = torch.mm(xa.t(), g).t().mul_(s) if needs[5] else None            # (N, r)
        d_w = torch.mm(g.t(), x) if needs[2] else None                         # (N, K)
        d_bias = g.sum(0) if ctx.has_bias and needs[3] else None               # (N,)
        return dx, dx_lora, d_w, d_bias, d_a, d_b, None


def merge_on_the_fly(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                     x_lora: torch.Tensor | None) -> bool:
    """True when y = x (W + s B A)^T + b is the cheaper exact form: no gradient wanted, one input for both
    branches, fp32 (a bf16/fp16 W would round the small s B A away) and enough rows that folding B A into W
    (2 N K r FLOPs, one pass over W) costs less than the two tall-skinny products (2 M r (K + N))."""
    if x_lora is not None or x.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, lora_a, lora_b)):
        return False
    n, k = weight.shape
    return x.numel() // k * (k + n) >= 2 * n * k


def _use_native(native: bool | None, x: torch.Tensor, lora_a: torch.Tensor) -> bool:
    if native is False:
        return False
    applies = native_applies(x, lora_a)
    if native is None:
        return applies and native_ops() is not None
    if not applies:
        raise DeltaError(f"the native LoRA kernels take fp32 CPU tensors and rank {'/'.join(map(str, RANKS))}, "
                         f"got {x.dtype} on {x.device} with rank {lora_a.shape[0]}; use impl='cpu' or 'auto'.")
    if native_ops() is None:
        raise DeltaError(f"the native LoRA kernels could not be built ({native_error()}); install g++ with "
                         "OpenMP and ninja, or use impl='cpu' / 'auto', which fall back to torch ops.")
    return True


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, scale: float, x_lora: torch.Tensor | None = None,
                      native: bool | None = None) -> torch.Tensor:
    """Fused LoRA on x (..., K) -> (..., N); ``x_lora`` (same shape as x) feeds the LoRA branch if given.
    Inference on many rows without the native kernels folds the adapter into the weight first
    (``merge_on_the_fly``).

    ``native``: None uses the compiled kernels where they apply and build; True requires them (DeltaError
    otherwise); False keeps the torch ops."""
    k, n = x.shape[-1], weight.shape[0]
    use_native = _use_native(native, x, lora_a)
    if not use_native and merge_on_the_fly(x, weight, lora_a, lora_b, x_lora):
        return F.linear(x, merged_weight(weight, lora_a, lora_b, float(scale)), bias)
    flat = x.dim() == 2                    # no reshape or view: each is an autograd node, ~5 us a step
    x2 = x if flat else x.reshape(-1, k)                                       # (M, K), a view when possible
    xl2 = x_lora if flat or x_lora is None else x_lora.reshape(-1, k)
    if use_native:
        rows = PIPELINE_ROWS if x2.shape[0] >= torch.get_num_threads() * PIPELINE_ROWS else 0
        out = native_ops().lora_linear(x2, xl2, weight, bias, lora_a, lora_b, float(scale), rows)   # (M, N)
    else:
        out = FusedLoRAFunction.apply(x2, xl2, weight, bias, lora_a, lora_b, float(scale))   # (M, N)
    return out if flat else out.view(*x.shape[:-1], n)
