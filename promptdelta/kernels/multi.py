"""Multi-adapter batched LoRA inference: every row uses its own adapter (Punica's SGMV, Chen et al. 2023).

    y_i = x_i W^T + b + s_{a_i} (x_i A_{a_i}^T) B_{a_i}^T        a_i = adapter of row i; a_i = -1: base only

One backbone serves many task deltas in one batch. Rows are sorted by adapter into segments, each cut into
blocks of BLOCK_M rows (the block table is built with tensor ops, no host sync); then two kernels:
    1. segment-gathered shrink:  xa[p] = x[order[p]] A_a^T          (M, r), p = position in sorted order
    2. base GEMM over the same blocks, accumulator initialised to s_a * xa_tile @ B_a^T (expand fused in),
       rows gathered on load and scattered on store.
The torch fallback loops over the adapters present (one host sync); it is differentiable, Triton is not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_multi_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_stack: torch.Tensor,
                     b_stack: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Fallback on 2-D x (M, K) and ids (M,): base GEMM, then each adapter's rows get their LoRA term."""
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
