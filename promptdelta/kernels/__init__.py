"""Fused LoRA matmul kernels: reference oracle, fused CPU autograd function, Triton kernels, dispatch.

    lora_linear(x, weight, bias, lora_a, lora_b, scale, *, dropout_p=0.0, training=False, impl="auto")
    lora_linear_multi(x, weight, bias, lora_a_stack, lora_b_stack, scales, adapter_ids, *, impl="auto")
    merged_weight(weight, lora_a, lora_b, scale)        W + s B A, for inference at exactly the base cost
Triton is imported only when a CUDA tensor (or impl="triton") asks for it.
"""

from .cpu import FusedLoRAFunction, fused_lora_linear
from .dispatch import IMPLS, MULTI_IMPLS, lora_linear, lora_linear_multi, plain_lora_linear, triton_available
from .reference import lora_reference, lora_reference_grads, merged_weight

__all__ = [
    "IMPLS", "MULTI_IMPLS", "FusedLoRAFunction", "fused_lora_linear", "lora_linear", "lora_linear_multi",
    "lora_reference", "lora_reference_grads", "merged_weight", "plain_lora_linear", "triton_available",
]
