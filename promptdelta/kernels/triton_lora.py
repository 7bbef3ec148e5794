"""Fused LoRA linear in Triton: kernels -> launchers -> ``torch.autograd.Function`` (GPU path).

Forward (x (M, K), W (N, K), A (r, K), B (N, r)):
    1. shrink:  xa = x A^T                                   (M, r)
    2. GEMM:    y = x W^T + b, with the accumulator of each (BM, BN) tile initialised to
                s * xa_tile @ B_tile^T, so no (M, N) temporary or second pass over y exists.
Backward (g (M, N)):
    3. one pass over g: gb = g B (M, r) and dB^T = s xa^T g (r, N), fp32 per-tile partials (each program
       writes its own slice), then one pass summing them in a fixed order: deterministic, no atomics
    4. dA = s gb^T x                                         (r, K), per-split partials summed the same way
    5. GEMM:    dx = g W, accumulator initialised to s * gb_tile @ A_tile.
All products accumulate in fp32; fp32 inputs use IEEE dot products unless
``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32, as torch does). Under ``TRITON_INTERPRET=1``
the kernels run on CPU tensors (the tests do that); numpy has no bfloat16, so bf16 dot operands are
upcast to fp32 there (``UPCAST``), which tests the indexing but not the bf16 rounding.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation; UPCAST works around the interpreter's missing bf16 dot."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, out_ptr, M, K, R, stride_xm, stride_am, stride_om,
                   R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr):
    """out (M, R) = x (M, K) @ A^T, A (R, K); one program per BLOCK_M rows."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, R_PAD), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)             # (BM, BK)
        at = tl.load(a_ptr + rr[None, :] * stride_am + rk[:, None],
                     mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)            # (BK, R_PAD)
        acc = _dot(x, at, acc, PREC, UPCAST)
    tl.store(out_ptr + rm[:, None] * stride_om + rr[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rr[None, :] < R))


def _gemm_configs() -> list[triton.Config]:
    """Tile candidates for the (M, P, Q) GEMMs; one small tile under the interpreter to test masking."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_P": 16, "BLOCK_Q": 16, "GROUP_M": 2})]
    shapes = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4),
              (64, 256, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 5, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_P": p, "BLOCK_Q": q, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for m, p, q, s, w in shapes]


@triton.autotune(configs=_gemm_configs(), key=["M_KEY", "P", "Q", "R_PAD", "HAS_LORA"])
@triton.jit
def _gemm_lora_kernel(a_ptr, b_ptr, u_ptr, v_ptr, bias_ptr, out_ptr, M, M_KEY, P, Q, R, scale,
                      stride_am, stride_aq, stride_bq, stride_bp, stride_um, stride_ur, stride_vr, stride_vp,
                      stride_om, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr,
                      PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_Q: tl.constexpr, GROUP_M: tl.constexpr):
    """out (M, P) = a (M, Q) @ b (Q, P) [+ scale * u (M, R) @ v (R, P)] [+ bias (P,)], grouped tile order.
    M_KEY (``autotune_rows(M)``) only keys the autotuner."""
    pid = tl.program_id(0)
    n_m, n_p = tl.cdiv(M, BLOCK_M), tl.cdiv(P, BLOCK_P)
    first_m = (pid // (GROUP_M * n_p)) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_p)) % size_m
    pid_p = (pid % (GROUP_M * n_p)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_M, BLOCK_P), tl.float32)
    if HAS_LORA:  # the LoRA term initialises the accumulator: no (M, P) temporary
        rr = tl.arange(0, R_PAD)
        u = tl.load(u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur,
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)            # (BM, R_PAD)
        v = tl.load(v_ptr + rr[:, None] * stride_vr + rp[None, :] * stride_vp,
                    mask=(rr[:, None] < R) & (rp[None, :] < P), other=0.0)            # (R_PAD, BP)
        acc = _dot(u.to(v.dtype), v, acc, PREC, UPCAST) * scale
    for q0 in range(0, Q, BLOCK_Q):
        rq = q0 + tl.arange(0, BLOCK_Q)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rq[None, :] * stride_aq,
                    mask=(rm[:, None] < M) & (rq[None, :] < Q), other=0.0)            # (BM, BQ)
        b = tl.load(b_ptr + rq[:, None] * stride_bq + rp[None, :] * stride_bp,
                    mask=(rq[:, None] < Q) & (rp[None, :] < P), other=0.0)            # (BQ, BP)
        acc = _dot(a, b, acc, PREC, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rp, mask=rp < P, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rp[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rp[None, :] < P))


@triton.jit
def _gb_db_kernel(g_ptr, b_ptr, xa_ptr, gb_part_ptr, dbt_part_ptr, M, N, R, scale, n_per_split, stride_gm,
                  stride_bn, stride_xam, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One pass over g; program (i, j) takes row block i and column split j and writes its own slices of the
    partials: gb_part[j] (M, R) rows of i = g[i, j] @ B[j], dbt_part[i] (R, N) columns of j = scale xa[i]^T
    g[i, j]. No element is written twice, so summing over j and i (``_sum_partials``, a fixed order) gives
    the same bits every run; the atomics this replaces added in completion order."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_start = pid_n * n_per_split
    rr = tl.arange(0, R_PAD)
    mask_mr = (rm[:, None] < M) & (rr[None, :] < R)
    xa_t = tl.trans(tl.load(xa_ptr + rm[:, None] * stride_xam + rr[None, :], mask=mask_mr, other=0.0))
    acc_gb = tl.zeros((BLOCK_M, R_PAD), tl.float32)
    for i in range(0, n_per_split, BLOCK_N):
        rn = n_start + i + tl.arange(0, BLOCK_N)
        g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :],
                    mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)            # (BM, BN)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :],
                    mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)            # (BN, R_PAD)
        acc_gb = _dot(g, b, acc_gb, PREC, UPCAST)
        dbt = _dot(xa_t, g, tl.zeros((R_PAD, BLOCK_N), tl.float32), PREC, UPCAST) * scale   # (R_PAD, BN)
        tl.store(dbt_part_ptr + (pid_m * R + rr[:, None]) * N + rn[None, :], dbt,
                 mask=(rr[:, None] < R) & (rn[None, :] < N))
    tl.store(gb_part_ptr + (pid_n * M + rm[:, None]) * R + rr[None, :], acc_gb, mask=mask_mr)


@triton.jit
def _tn_kernel(u_ptr, v_ptr, part_ptr, M, P, R, scale, m_per_split, stride_vm,
               R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr):
    """part[j] (R, P) = scale u^T v over the rows of split j, for u (M, R) fp32 contiguous and v (M, P);
    program (i, j) writes columns block i of part[j] (then ``_sum_partials``; no atomics)."""
    rp = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pid_m = tl.program_id(1)
    m_start = pid_m * m_per_split
    rr = tl.arange(0, R_PAD)
    acc = tl.zeros((R_PAD, BLOCK_P), tl.float32)
    for i in range(0, m_per_split, BLOCK_M):
        rm = m_start + i + tl.arange(0, BLOCK_M)
        v = tl.load(v_ptr + rm[:, None] * stride_vm + rp[None, :],
                    mask=(rm[:, None] < M) & (rp[None, :] < P), other=0.0)            # (BM, BP)
        ut = tl.load(u_ptr + rm[None, :] * R + rr[:, None],
                     mask=(rm[None, :] < M) & (rr[:, None] < R), other=0.0)           # (R_PAD, BM)
        acc = _dot(ut.to(v.dtype), v, acc, PREC, UPCAST)
    tl.store(part_ptr + (pid_m * R + rr[:, None]) * P + rp[None, :], acc * scale,
             mask=(rr[:, None] < R) & (rp[None, :] < P))


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, S, E, BLOCK: tl.constexpr):
    """out (E,) = sum of part (S, E) over S, in order s = 0, 1, ...: the one reduction pass."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, S):
        acc += tl.load(part_ptr + s * E + offs, mask=offs < E, other=0.0)
    tl.store(out_ptr + offs, acc, mask=offs < E)


# ---------------------------------------------------------------------------------------------- launchers

def _r_pad(r: int) -> int:
    """LoRA rank padded to a power of two >= 16 (the smallest tl.dot dimension)."""
    return max(16, triton.next_power_of_2(max(r, 1)))


def autotune_rows(m: int) -> int:
    """The row count the GEMM's autotuner keys on: M rounded up to a power of two. Keyed on M itself, it would
    re-tune (every config timed, ~1 s) for each new batch x length of a training run with dynamic padding;
    a tile choice made for 2^k rows serves every M in (2^(k-1), 2^k]."""
    return triton.next_power_of_2(max(m, 1))


def _dot_flags(dtype: torch.dtype) -> dict:
    """PREC and UPCAST constexprs: IEEE fp32 unless torch allows TF32 (half types: triton's default);
    fp32 dots for bf16 when interpreting."""
    ieee = INTERPRET or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    return {"PREC": "ieee" if ieee else "tf32", "UPCAST": INTERPRET and dtype == torch.bfloat16}


def _split_target(device: torch.device) -> int:
    """How many programs the skinny reductions aim for: two per SM; 16 when interpreting, so the tests' small
    shapes get several splits (partials to sum) too."""
    if INTERPRET or device.type != "cuda":
        return 16
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _skinny_tiles(dtype: torch.dtype) -> tuple[int, int]:
    """(rows, columns) tile of the shrink / gb-dB / dA kernels."""
    if INTERPRET:
        return 16, 16
    return 64, (64 if dtype != torch.float32 else 32)


def shrink(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """xa = x A^T for contiguous x (M, K) and A (r, K) -> (M, r) in x's dtype."""
    m, k = x.shape
    r = lora_a.shape[0]
    out = torch.empty(m, r, device=x.device, dtype=x.dtype)
    bm, bk = _skinny_tiles(x.dtype)
    _shrink_kernel[(triton.cdiv(m, bm),)](x, lora_a, out, m, k, r, x.stride(0), lora_a.stride(0), out.stride(0),
                                          R_PAD=_r_pad(r), BLOCK_M=bm, BLOCK_K=bk, **_dot_flags(x.dtype))
    return out


def gemm_lora(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None,
              bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """a (M, Q) @ b (Q, P) + scale * u (M, R) @ v (R, P) + bias in one kernel; b and v may be strided views."""
    m, q = a.shape
    p = b.shape[1]
    out = torch.empty(m, p, device=a.device, dtype=a.dtype)
    has_lora = u is not None
    u_, v_ = (u, v) if has_lora else (out, out)
    r = v.shape[0] if has_lora else 0

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(p, meta["BLOCK_P"]),)

    _gemm_lora_kernel[grid](a, b, u_, v_, out if bias is None else bias, out, m, autotune_rows(m), p, q, r,
                            float(scale), a.stride(0), a.stride(1), b.stride(0), b.stride(1), u_.stride(0),
                            u_.stride(1), v_.stride(0), v_.stride(1), out.stride(0), HAS_LORA=has_lora,
                            HAS_BIAS=bias is not None, R_PAD=_r_pad(r), **_dot_flags(a.dtype))
    return out


def _sum_partials(part: torch.Tensor) -> torch.Tensor:
    """part (S, *shape) fp32, contiguous -> (*shape) fp32, summed over S in a fixed order."""
    if part.shape[0] == 1:
        return part[0]
    out = torch.empty(part.shape[1:], device=part.device, dtype=torch.float32)
    e = out.numel()
    block = 256 if INTERPRET else 1024
    _sum_partials_kernel[(triton.cdiv(e, block),)](part, out, part.shape[0], e, BLOCK=block)
    return out


def gb_and_db(g: torch.Tensor, lora_b: torch.Tensor, xa: torch.Tensor,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """gb = g B (M, r) and dB^T = s xa^T g (r, N), fp32: one pass over g (M, N) writing per-tile partials,
    then one pass summing them (gb over the column splits, dB^T over the row blocks); deterministic."""
    m, n = g.shape
    r = lora_b.shape[1]
    bm, bn = _skinny_tiles(g.dtype)
    blocks_m, blocks_n = triton.cdiv(m, bm), triton.cdiv(n, bn)
    split = max(1, min(blocks_n, _split_target(g.device) // blocks_m))
    n_per_split = triton.cdiv(blocks_n, split) * bn
    grid = (blocks_m, triton.cdiv(n, n_per_split))
    gb_part = torch.empty(grid[1], m, r, device=g.device, dtype=torch.float32)       # (column splits, M, r)
    dbt_part = torch.empty(grid[0], r, n, device=g.device, dtype=torch.float32)      # (row blocks, r, N)
    _gb_db_kernel[grid](g, lora_b, xa, gb_part, dbt_part, m, n, r, float(scale), n_per_split, g.stride(0),
                        lora_b.stride(0), xa.stride(0), R_PAD=_r_pad(r), BLOCK_M=bm, BLOCK_N=bn,
                        **_dot_flags(g.dtype))
    return _sum_partials(gb_part), _sum_partials(dbt_part)


def tn_skinny(u: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """s u^T v (R, P) in fp32 for u (M, R) fp32 contiguous and v (M, P) contiguous (dA = s gb^T x): per-split
    partials, then one summing pass (deterministic)."""
    m, p = v.shape
    r = u.shape[1]
    bm, bp = _skinny_tiles(v.dtype)
    blocks_m, blocks_p = triton.cdiv(m, bm), triton.cdiv(p, bp)
    split = max(1, min(blocks_m, _split_target(v.device) // blocks_p))
    m_per_split = triton.cdiv(blocks_m, split) * bm
    grid = (blocks_p, triton.cdiv(m, m_per_split))
    part = torch.empty(grid[1], r, p, device=v.device, dtype=torch.float32)          # (row splits, r, P)
    _tn_kernel[grid](u, v, part, m, p, r, float(scale), m_per_split, v.stride(0), R_PAD=_r_pad(r),
                     BLOCK_M=bm, BLOCK_P=bp, **_dot_flags(v.dtype))
    return _sum_partials(part)


# ------------------------------------------------------------------------------------------ autograd

class TritonLoRAFunction(torch.autograd.Function):
    """y = x W^T + b + s (x_l A^T) B^T on contiguous 2-D inputs, with the kernels above."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_lora: torch.Tensor | None, weight: torch.Tensor,
                bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float) -> torch.Tensor:
        xa = shrink(x if x_lora is None else x_lora, lora_a)                   # (M, r)
        out = gemm_lora(x, weight.t(), xa, lora_b.t(), bias, scale)            # (M, N)
        ctx.scale, ctx.has_bias = scale, bias is not None
        ctx.save_for_backward(x, x_lora, xa, weight, lora_a, lora_b)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, x_lora, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s, needs = ctx.scale, ctx.needs_input_grad
        g = grad_out.contiguous()                                              # (M, N)
        gb, dbt = gb_and_db(g, lora_b, xa, s)                                  # (M, r), (r, N) fp32
        dx = dx_lora = None
        if needs[0]:
            fold = x_lora is None                                              # dx = g W + s gb A
            dx = gemm_lora(g, weight, gb if fold else None, lora_a if fold else None, None, s)
        if x_lora is not None and needs[1]:
            dx_lora = (torch.mm(gb, lora_a.float()) * s).to(x_lora.dtype)     # (M, K)
        d_a = tn_skinny(gb, x if x_lora is None else x_lora, s).to(lora_a.dtype) if needs[4] else None
        d_b = dbt.t().contiguous().to(lora_b.dtype) if needs[5] else None      # (N, r)
        d_w = torch.mm(g.t(), x) if needs[2] else None                         # (N, K)
        d_bias = g.sum(0) if ctx.has_bias and needs[3] else None               # (N,)
        return dx, dx_lora, d_w, d_bias, d_a, d_b, None


def triton_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, scale: float, x_lora: torch.Tensor | None = None) -> torch.Tensor:
    """Triton fused LoRA on x (..., K) -> (..., N); ``x_lora`` (same shape as x) feeds the LoRA branch."""
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k).contiguous()                                         # (M, K)
    xl2 = None if x_lora is None else x_lora.reshape(-1, k).contiguous()
    out = TritonLoRAFunction.apply(x2, xl2, weight.contiguous(), bias, lora_a.contiguous(),
                                   lora_b.contiguous(), float(scale))          # (M, N)
    return out.view(*x.shape[:-1], n)
