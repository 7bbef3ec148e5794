"""Triton SGMV kernels for multi-adapter LoRA inference (see ``multi.py`` for the formula and block table).

Forward only. Every program owns one block of BLOCK_M rows that share an adapter (or none: adapter -1,
whose LoRA loads are masked to zero), so each weight tile it loads serves the whole block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi import segment_blocks
from .triton_lora import INTERPRET, _dot, _dot_flags, _r_pad


@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, xa_ptr, order_ptr, blk_adapter_ptr, blk_start_ptr, blk_end_ptr,
                        K, R, stride_xm, stride_al, stride_ar,
                        R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                        PREC: tl.constexpr, UPCAST: tl.constexpr):
    """xa[p] (sorted position p) = x[order[p]] @ A_a^T for the rows of one block."""
    blk = tl.program_id(0)
    adapter = tl.load(blk_adapter_ptr + blk)
    start = tl.load(blk_start_ptr + blk)
    n_live = (tl.load(blk_end_ptr + blk) - start) * (adapter >= 0).to(tl.int32)   # 0 rows: nothing to do
    pos = start + tl.arange(0, BLOCK_M)
    live = tl.arange(0, BLOCK_M) < n_live                                      # (BM,)
    rows = tl.load(order_ptr + pos, mask=live, other=0)
    rr = tl.arange(0, R_PAD)
    a_base = a_ptr + tl.maximum(adapter, 0).to(tl.int64) * stride_al
    acc = tl.zeros((BLOCK_M, R_PAD), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + rk[None, :], mask=live[:, None] & (rk[None, :] < K),
                    other=0.0)                                                   # (BM, BK)
        at = tl.load(a_base + rr[None, :] * stride_ar + rk[:, None],
                     mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)   # (BK, R_PAD)
        acc = _dot(x, at, acc, PREC, UPCAST)
    tl.store(xa_ptr + pos[:, None] * R + rr[None, :], acc.to(xa_ptr.dtype.element_ty),
             mask=live[:, None] & (rr[None, :] < R))


@triton.jit
def _sgmv_gemm_kernel(x_ptr, w_ptr, bias_ptr, xa_ptr, b_ptr, scales_ptr, out_ptr, order_ptr, blk_adapter_ptr,
                      blk_start_ptr, blk_end_ptr, N, K, R, stride_xm, stride_wn, stride_bl, stride_bn,
                      stride_om, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """out[rows] = x[rows] W^T + b + s_a xa[pos] B_a^T for one (row block, column block)."""
    blk, pid_n = tl.program_id(0), tl.program_id(1)
    adapter = tl.load(blk_adapter_ptr + blk)
    pos = tl.load(blk_start_ptr + blk) + tl.arange(0, BLOCK_M)
    live = pos < tl.load(blk_end_ptr + blk)                                    # (BM,)
    rows = tl.load(order_ptr + pos, mask=live, other=0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R_PAD)
    r_live = R * (adapter >= 0).to(tl.int32)                                   # rank 0 for base-only rows
    xa = tl.load(xa_ptr + pos[:, None] * R + rr[None, :], mask=live[:, None] & (rr[None, :] < r_live),
                 other=0.0)                                                      # (BM, R_PAD)
    bt = tl.load(b_ptr + tl.maximum(adapter, 0).to(tl.int64) * stride_bl + rn[None, :] * stride_bn + rr[:, None],
                 mask=(rr[:, None] < r_live) & (rn[None, :] < N), other=0.0)    # (R_PAD, BN)
    scale = tl.load(scales_ptr + tl.maximum(adapter, 0)).to(tl.float32)
    acc = _dot(xa, bt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PREC, UPCAST) * scale
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + rk[None, :], mask=live[:, None] & (rk[None, :] < K),
                    other=0.0)                                                   # (BM, BK)
        wt = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None], mask=(rn[None, :] < N) & (rk[:, None] < K),
                     other=0.0)                                                  # (BK, BN)
        acc = _dot(x, wt, acc, PREC, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=live[:, None] & (rn[None, :] < N))


def _tiles(m: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); small row blocks for decoding-sized batches."""
    if INTERPRET:
        return 16, 16, 16, 4, 1
    bk = 32 if dtype == torch.float32 else 64
    return (16 if m <= 256 else 64), 128, bk, 4, 3


def lora_multi_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_stack: torch.Tensor,
                      b_stack: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """SGMV forward on contiguous x (M, K) with ids (M,) in [-1, L); returns (M, N) in x's dtype."""
    m, k = x.shape
    n, r = weight.shape[0], a_stack.shape[1]
    bm, bn, bk, warps, stages = _tiles(m, x.dtype)
    table = segment_blocks(ids, a_stack.shape[0], bm)
    n_blocks = table["adapter"].shape[0]
    xa = torch.empty(m, r, device=x.device, dtype=x.dtype)                     # (M, r) in sorted order
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)                    # (M, N)
    flags = {"R_PAD": _r_pad(r), "BLOCK_M": bm, "BLOCK_K": bk, **_dot_flags(x.dtype)}
    blk_args = (table["order"], table["adapter"], table["start"], table["end"])
    _sgmv_shrink_kernel[(n_blocks,)](x, a_stack, xa, *blk_args, k, r, x.stride(0), a_stack.stride(0),
                                     a_stack.stride(1), num_warps=warps, **flags)
    _sgmv_gemm_kernel[(n_blocks, triton.cdiv(n, bn))](
        x, weight, out if bias is None else bias, xa, b_stack, scales, out, *blk_args, n, k, r, x.stride(0),
        weight.stride(0), b_stack.stride(0), b_stack.stride(1), out.stride(0), HAS_BIAS=bias is not None,
        BLOCK_N=bn, num_warps=warps, num_stages=stages, **flags)
    return out
