"""Delta (parameter-efficient) tuning: attach a method to a model, train, save, merge, detach.

    handle = attach(model, "lora", targets=["q_proj", "v_proj"], r=8, alpha=16)   # freezes the rest
    handle.save("run/lora"); handle.detach(); load_delta(model, "run/lora")
    handle.save("run/peft", format="peft")    # PEFT's adapter folder; load_delta reads those too
    merge_and_unload(model)                    # fold the deltas in for good: a plain model again
"""

from promptdelta.deltas.base import (
    DeltaHandle,
    DeltaMethod,
    DeltaWrapper,
    WrappingMethod,
    attach,
    canonical_aliases,
    deltas_of,
    load_delta,
    model_fingerprint,
    register_delta,
)
from promptdelta.deltas.bitfit import AddedBias, BitFit, BitFitConfig
from promptdelta.deltas.lora import LoRA, LoRAConfig, LoRALinear
from promptdelta.deltas.ia3 import IA3, IA3Config, IA3Linear
from promptdelta.deltas.adapter import Adapter, AdapterConfig, AdapterWrapper, Bottleneck
from promptdelta.deltas.prefix import PrefixConfig, PrefixTuning, prefix_kv
from promptdelta.deltas.intrinsic import Fastfood, Intrinsic, IntrinsicConfig, IntrinsicWrapper, fwht
from promptdelta.deltas.merge import base_state_dict, merge_and_unload, register_unload
from promptdelta.deltas.peft_format import (export_prompt_tuning, import_prompt_tuning, load_peft, read_peft_config,
                                           save_peft)
from promptdelta.deltas.ladder import (Ladder, LadderConfig, MemoryReport, SideNetwork, SideSeq2Seq,
                                       measure_training_memory)
from promptdelta.deltas import ipt, s3delta, unipelt  # noqa: F401  (register "ipt", "s3delta", "unipelt"; issue 21)

__all__ = [
    "attach", "load_delta", "deltas_of", "DeltaHandle", "DeltaMethod", "WrappingMethod", "DeltaWrapper",
    "register_delta", "model_fingerprint", "canonical_aliases", "LoRA", "LoRAConfig", "LoRALinear", "BitFit",
    "BitFitConfig",
]
__all__ += ["Intrinsic", "IntrinsicConfig", "IntrinsicWrapper", "Fastfood", "fwht",
            "Ladder", "LadderConfig", "SideNetwork", "SideSeq2Seq", "MemoryReport", "measure_training_memory"]
__all__ += ["IA3", "IA3Config", "IA3Linear"]
__all__ += ["AddedBias", "Adapter", "AdapterConfig", "AdapterWrapper", "Bottleneck", "PrefixConfig", "PrefixTuning",
            "prefix_kv"]
__all__ += ["merge_and_unload", "register_unload", "base_state_dict", "save_peft", "load_peft", "read_peft_config",
            "export_prompt_tuning", "import_prompt_tuning"]
