"""Delta (parameter-efficient) tuning: attach a method to a model, train, save, merge, detach.

    handle = attach(model, "lora", targets=["q_proj", "v_proj"], r=8, alpha=16)   # freezes the rest
    handle.save("run/lora"); handle.detach(); load_delta(model, "run/lora")
"""

from promptdelta.deltas.base import (
    DeltaHandle,
    DeltaMethod,
    DeltaWrapper,
    attach,
    deltas_of,
    load_delta,
    model_fingerprint,
    register_delta,
)
from promptdelta.deltas.bitfit import BitFit, BitFitConfig
from promptdelta.deltas.lora import LoRA, LoRAConfig, LoRALinear

__all__ = [
    "attach", "load_delta", "deltas_of", "DeltaHandle", "DeltaMethod", "DeltaWrapper", "register_delta",
    "model_fingerprint", "LoRA", "LoRAConfig", "LoRALinear", "BitFit", "BitFitConfig",
]
