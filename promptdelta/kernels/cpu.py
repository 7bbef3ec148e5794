"""Fused LoRA linear as one ``torch.autograd.Function`` (the CPU path; plain torch ops, so any device).

Forward writes the cheap rank-r term first and lets the big GEMM accumulate into it (no (M, N) temporary,
and no extra read-modify-write pass over the output: BLAS adds C into its tiles with beta=1 as it stores them):

    xa  = x_l A^T                   (M, r)   x_l = x, or dropout(x) for the LoRA branch
    out = b + s xa B^T              torch.addmm(b, xa, B^T, alpha=s), B^T kept contiguous (r, N)
    out += x W^T                    out.addmm_(x, W^T)
The other order (out = b + x W^T, then out += s xa B^T) costs a second pass over out: measured on the 2-core
CPU, forward 1.04x the frozen layer against 1.11x (1 thread, M=2048, K=N=768, r=8).

It saves only x, xa (and x_l when dropout made a separate one). Backward, measured on a 2-core CPU
(fp32, M=2048, K=N=768, r=8; see ``promptdelta/bench/kernel.py``: 1.03x the frozen layer, against
1.06-1.09x with dx and gb as two GEMMs and 1.16x for plain LoRA):

    [dx | gb] = g [W + s B A | B]   one GEMM for both (one pass over g); the rank-r update of W costs
                                    N K r, far less than M N r. dx is returned as a (M, K) view with row
                                    stride K + r; its consumers (autograd sums, reshapes) take it as is.
    gb = g B (dropout case)         g @ (contiguous B^T)^T: 2x faster than g @ B with B (N, r)
    dA = s gb^T x                   (r, K)
    dB = s (xa^T g)^T               8x faster than g^T xa, whose (N, M) operand is transposed
When dropout gives the LoRA branch its own input x_l, dx = g W and the branch's s gb A goes to x_l.
"""

from __future__ import annotations

import torch


def _lora_delta_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """W + s B A (N, K)."""
    return torch.addmm(weight, lora_b, lora_a, alpha=scale)


class FusedLoRAFunction(torch.autograd.Function):
    """y = x W^T + b + s (x_l A^T) B^T on 2-D inputs; W and b get gradients only if they require them."""

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
        dx = dx_lora = None
        if x_lora is None and needs[0]:
            k = weight.shape[1]                                                # g [W + s B A | B]: one pass
            both = torch.mm(g, torch.cat([_lora_delta_weight(weight, lora_a, b_t.t(), s), b_t.t()], 1))
            dx, gb = both[:, :k], both[:, k:]                                  # (M, K) view, (M, r) view
        else:
            gb = torch.mm(g, b_t.t())                                          # (M, r)
        if x_lora is not None:
            dx = torch.mm(g, weight) if needs[0] else None                     # (M, K)
            dx_lora = torch.mm(gb, lora_a).mul_(s) if needs[1] else None       # (M, K)
        d_a = torch.mm(gb.t(), x if x_lora is None else x_lora).mul_(s) if needs[4] else None   # (r, K)
        d_b = torch.mm(xa.t(), g).t().mul_(s) if needs[5] else None            # (N, r)
        d_w = torch.mm(g.t(), x) if needs[2] else None                         # (N, K)
        d_bias = g.sum(0) if ctx.has_bias and needs[3] else None               # (N,)
        return dx, dx_lora, d_w, d_bias, d_a, d_b, None


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, scale: float, x_lora: torch.Tensor | None = None) -> torch.Tensor:
    """Fused LoRA on x (..., K) -> (..., N); ``x_lora`` (same shape as x) feeds the LoRA branch if given."""
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)                                                      # (M, K), a view when possible
    xl2 = None if x_lora is None else x_lora.reshape(-1, k)
    out = FusedLoRAFunction.apply(x2, xl2, weight, bias, lora_a, lora_b, float(scale))   # (M, N)
    return out.view(*x.shape[:-1], n)
