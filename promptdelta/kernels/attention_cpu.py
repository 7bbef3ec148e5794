"""Softmax attention with fused probability dropout on CPU (Vaswani et al. 2017; dropout on the probabilities
as in BERT): out = dropout(softmax(q k^T * scale + bias)) v.

One autograd function: the forward saves q, k, v, the probabilities P and the dropout seed; the backward
regenerates the dropped probabilities from the seed (one cheap pass, ``csrc/dropout_cpu.cpp``) and runs the
probability dropout's and the softmax's backward in one pass per row:

    Pd  = P * m / (1 - p)                          (regenerated)
    dv  = Pd^T g                 dPd = g v^T
    dS  = P * (dP - rowsum(dP * P)),  dP = dPd * m / (1 - p)       (one fused pass)
    dq  = scale dS k             dk  = scale dS^T q          dbias = dS summed to bias's shape

torch's eager attention keeps P, the mask and Pd alive for the backward (plus torch's dropout draws its
numbers one generator step at a time); this keeps P only. The mask is the one of
``dropout.dropout(ones(B, nh, Tq, Tk), p)`` under the same torch RNG state. Without dropout (eval, p == 0)
it is ``F.scaled_dot_product_attention`` (torch's fused CPU kernel); on other devices or dtypes, or without
the compiled kernel, SDPA with its own dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from promptdelta.kernels.dropout import check_p, draw_seed, dropout_ops, fused_applies


def additive_bias(bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean keep-mask (True = attend, SDPA's convention) as an additive bias; a float bias as is."""
    if bias is None or bias.dtype != torch.bool:
        return bias
    return torch.zeros(bias.shape, dtype=dtype, device=bias.device).masked_fill_(~bias, torch.finfo(dtype).min)


class AttentionDropoutFunction(torch.autograd.Function):
    """softmax(q k^T scale + bias) with probability dropout, times v; mask regenerated from the seed."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, p: float,  # type: ignore[override]
                seed: int) -> Tensor:
        ops = dropout_ops()
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)        # (B, nh, Tq, Tk)
        if bias is not None:
            scores = scores.add_(bias)
        prob = torch.softmax(scores, dim=-1)                              # (B, nh, Tq, Tk), in place of scores
        del scores
        out = torch.matmul(ops.apply(prob, seed, p), v)                   # (B, nh, Tq, hd_v)
        ctx.save_for_backward(q, k, v, prob)
        ctx.scale, ctx.p, ctx.seed = scale, p, seed
        ctx.bias_shape = None if bias is None else bias.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        q, k, v, prob = ctx.saved_tensors
        ops = dropout_ops()
        g = g.contiguous()
        dq = dk = dv = dbias = None
        if ctx.needs_input_grad[2]:
            dv = torch.matmul(ops.apply(prob, ctx.seed, ctx.p).transpose(-2, -1), g)   # (B, nh, Tk, hd_v)
        if any(ctx.needs_input_grad[:2]) or ctx.needs_input_grad[3]:
            ds = ops.softmax_backward(torch.matmul(g, v.transpose(-2, -1)), prob, ctx.seed, ctx.p)  # (B, nh, Tq, Tk)
            if ctx.needs_input_grad[3]:
                dbias = ds.sum_to_size(ctx.bias_shape)
            if ctx.needs_input_grad[0]:
                dq = torch.matmul(ds, k).mul_(ctx.scale)                  # (B, nh, Tq, hd)
            if ctx.needs_input_grad[1]:
                dk = torch.matmul(ds.transpose(-2, -1), q).mul_(ctx.scale)  # (B, nh, Tk, hd)
        return dq, dk, dv, dbias, None, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, scale: float | None = None,
              p: float = 0.0, training: bool = False) -> Tensor:
    """out (B, nh, Tq, hd_v) = dropout(softmax(q k^T scale + bias), p) v for q (B, nh, Tq, hd), k (B, nh, Tk, hd),
    v (B, nh, Tk, hd_v); ``bias`` additive (or a boolean keep-mask), broadcastable to (B, nh, Tq, Tk)."""
    check_p(p)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    bias = additive_bias(bias, q.dtype)
    if not training or p == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, scale=scale)
    same_heads = q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
    if not (same_heads and fused_applies(q, p) and q.dtype == k.dtype == v.dtype):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=scale)
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    return AttentionDropoutFunction.apply(q, k, v, bias, scale, p, draw_seed())
