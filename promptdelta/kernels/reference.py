"""Pure-torch oracle for the LoRA linear layer (Hu et al. 2021, "LoRA: Low-Rank Adaptation").

    y  = x W^T + b + s (x A^T) B^T          x (M, K), W (N, K), b (N,), A (r, K), B (N, r)

With g = dL/dy (M, N), xa = x A^T (M, r) and gb = g B (M, r) the gradients (W and b frozen) are

    dx = g W + s gb A          (M, K)
    dA = s gb^T x              (r, K)
    dB = s g^T xa = s (xa^T g)^T   (N, r)

Every other implementation in this package is tested against these two functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """y = x W^T + b + s (x A^T) B^T for x (..., K); plain autograd ops, returns (..., N)."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a), lora_b)


def lora_reference_grads(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                         scale: float, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The closed-form (dx, dA, dB) above, computed in float64 for use as a tight oracle."""
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k).double()                  # (M, K)
    g = grad_out.reshape(-1, n).double()            # (M, N)
    a, b = lora_a.double(), lora_b.double()
    xa = x2 @ a.t()                                 # (M, r)
    gb = g @ b                                      # (M, r)
    dx = g @ weight.double() + scale * gb @ a       # (M, K)
    d_a = scale * gb.t() @ x2                       # (r, K)
    d_b = scale * g.t() @ xa                        # (N, r)
    return dx.reshape(x.shape), d_a, d_b


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W' = W + s B A (N, K): a LoRA layer folded into its base weight for inference at exactly the base cost."""
    return torch.addmm(weight, lora_b.to(weight.dtype), lora_a.to(weight.dtype), alpha=scale)
