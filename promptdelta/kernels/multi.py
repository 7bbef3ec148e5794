"""Multi-adapter batched LoRA inference: every row uses its own adapter (Punica's SGMV, Chen et al. 2023).

    y_i = x_i W^T + b + s_{a_i} (x_i A_{a_i}^T) B_{a_i}^T        a_i = adapter of row i; a_i = -1: base only

One backbone serves many task deltas in one batch. Rows are sorted by adapter into segments, each cut into
blocks of BLOCK_M rows (the block table is built with tensor ops, no host sync); then two kernels:
    1. segment-gathered shrink:  xa[p] = x[order[p]] A_a^T          (M, r), p = position in sorted order
    2. base GEMM over the same blocks, accumulator initialised to s_a * xa_tile @ B_a^T (expand fused in),
       rows gathered on load and scattered on store.
The torch fallback masks stacked factors (few adapters) or loops over the adapters present; it is
differentiable, Triton is not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_multi_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_stack: torch.Tensor,
                     b_stack: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Fallback on 2-D x (M, K) and ids (M,). With few adapter columns (L r <= max(64, min(K, N) / 4)) all
    adapters go through one shrink and one expand on the stacked factors, each row's columns of other
    adapters masked to zero, then the base GEMM accumulates into that (as the fused CPU path does):

        xa   = x [A_0; ..; A_{L-1}]^T                  (M, L r)
        xa  *= s_a [a_i == a]                          row i keeps only its own adapter's r columns
        out  = b + xa [B_0 | .. | B_{L-1}]^T,  out += x W^T
    Otherwise a loop over the adapters present (one host sync), gathering and scattering their rows."""
    n_adapters, r, k = a_stack.shape
    n = weight.shape[0]
    if n_adapters * r > max(64, min(k, n) // 4):
        return _lora_multi_loop(x, weight, bias, a_stack, b_stack, scales, ids)
    a_cat = a_stack.reshape(n_adapters * r, k)                                 # (L r, K)
    b_cat_t = b_stack.transpose(1, 2).reshape(n_adapters * r, n)               # (L r, N) rows a r + j = B_a[:, j]
    col = torch.arange(n_adapters, device=x.device).repeat_interleave(r)       # (L r,) adapter of each column
    coef = torch.where(ids[:, None] == col[None, :], scales[col][None, :], 0.0).to(x.dtype)   # (M, L r)
    xa = torch.mm(x, a_cat.t()) * coef                                         # (M, L r)
    ops = _native_gemm(x, weight, bias, xa, b_cat_t)
    if ops is not None:                        # the expand as L r more inner steps of the native GEMM
        return ops.gemm(x, weight.t(), xa, b_cat_t, 1.0, bias)
    out = torch.mm(xa, b_cat_t) if bias is None else torch.addmm(bias, xa, b_cat_t)          # (M, N)
    return out.addmm_(x, weight.t())                                           # the base GEMM adds into it


def _native_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *rest: torch.Tensor):
    """The native extension when its GEMM (csrc/lora_gemm.h) can serve this call: fp32 CPU, no gradient wanted
    (the GEMM is no autograd op), and the extension's own rule (built for AVX-512, on, enough rows); else None.
    Why: the fused single-adapter forward runs on it, so the multi-adapter one should too (at M=512,
    K=N=1024, r=16, L=4 it took 1.32x the single-adapter forward with MKL's GEMMs, 2026-12-07)."""
    from .native import native_ops

    tensors = (x, weight, *rest) + ((bias,) if bias is not None else ())
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    ops = native_ops()
    if ops is None or not ops.use_own_gemm(x.shape[0]) or (bias is not None and not bias.is_contiguous()):
        return None
    return ops


def _lora_multi_loop(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_stack: torch.Tensor,
                     b_stack: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Base GEMM, then each adapter's rows get their LoRA term (many adapters or large ranks)."""
    out = F.linear(x, weight, bias)                                            # (M, N)
    for adapter in torch.unique(ids).tolist():
        if adapter < 0:
            continue
        rows = (ids == adapter).nonzero().squeeze(1)                           # (m_a,)
        xa = x.index_select(0, rows) @ a_stack[adapter].t()                    # (m_a, r)
        out = out.index_add(0, rows, xa @ b_stack[adapter].t(), alpha=float(scales[adapter]))
    return out


def segment_blocks(ids: torch.Tensor, num_adapters: int, block_m: int) -> dict[str, torch.Tensor]:
    """Block table for SGMV: rows sorted by adapter, each segment cut into blocks of ``block_m`` rows.

    Returns ``order`` (M,) rows in sorted order and, per block (an upper bound of cdiv(M, block_m) + L + 1
    blocks, unused ones empty): ``adapter`` (-1 = base only), ``start`` and ``end`` positions in ``order``.
    """
    m = ids.shape[0]
    key = ids + 1                                                              # (M,) 0 = no adapter
    order = torch.argsort(key, stable=True)                                    # (M,)
    counts = torch.bincount(key, minlength=num_adapters + 1)                   # (L+1,)
    seg_start = torch.cumsum(counts, 0) - counts                               # (L+1,)
    blocks = (counts + block_m - 1) // block_m                                 # (L+1,)
    block_end = torch.cumsum(blocks, 0)                                        # (L+1,)
    n_blocks = (m + block_m - 1) // block_m + num_adapters + 1
    b = torch.arange(n_blocks, device=ids.device)                              # (nB,)
    seg = torch.searchsorted(block_end, b, right=True)                         # (nB,) L+1 = unused block
    used = seg <= num_adapters
    seg = seg.clamp(max=num_adapters)
    start = seg_start[seg] + (b - (block_end[seg] - blocks[seg])) * block_m
    end = seg_start[seg] + counts[seg]
    zero = torch.zeros_like(start)
    return {"order": order.to(torch.int32), "adapter": torch.where(used, seg - 1, -1).to(torch.int32),
            "start": torch.where(used, start, zero).to(torch.int32),
            "end": torch.where(used, end, zero).to(torch.int32)}
