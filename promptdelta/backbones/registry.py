"""The backbone family registry: one ``Family`` record per family holds everything family-specific.

``deltas/`` and ``train/`` never name a family: they ask this registry. A family file (``bert.py``,
``gpt.py`` ...) ends by calling ``register_family(Family(...))`` with:

    model_types       the transformers ``config.model_type`` values it loads ("llama", "qwen2", "mistral")
    from_hf           (hf_config, hf_state) -> native model (what ``load_backbone`` calls)
    key_table         native or HF config -> the HF <-> native ``KeyTable`` (also lets deltas read the native
                      names of a live transformers model's modules)
    block_spec        native config -> ``BlockSpec`` (pre/post norm, norm kind, activation, gating; the ladder)
    attention_stacks  native model -> ``AttentionStack`` list, in ``prefix_kv`` order (prefix tuning)
    layer_stacks      native model -> its ``nn.ModuleList`` s of blocks (FSDP units, activation checkpointing)
    default_targets   delta method (``"adapter.pfeiffer"`` for a placement) -> default targets in native names

How to add a family: docs/guide/families.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from promptdelta.backbones.keymap import KeyTable
from promptdelta.errors import BackboneError

# the family files shipped with promptdelta; importing one registers its family (see _load_builtin)
_BUILTIN_MODULES = ("bert", "roberta", "gpt", "t5", "llama")


@dataclass(frozen=True)
class BlockSpec:
    """What a transformer block of the family looks like (what the ladder's side network copies)."""

    pre_norm: bool                  # x + f(N(x)) (GPT-2, T5, Llama); else N(x + f(x)) (BERT, RoBERTa)
    norm: str                       # "layernorm" | "rmsnorm"
    activation: str                 # "gelu" | "gelu_new" | "relu" | "silu" | ...
    gated: bool                     # SwiGLU / GEGLU FFN: fc2(act(gate x) * fc1 x) (Llama, T5 v1.1)
    positions: str                  # "absolute" | "relative" | "rotary"
    eps: float
    bias: bool = True               # linear layers carry biases (False: T5, Llama)
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim); T5: 1.0 (folded into its init)

    @property
    def gated_mlp(self) -> bool:    # the name the issue uses
        return self.gated

    def __post_init__(self) -> None:
        if self.norm not in ("layernorm", "rmsnorm"):
            raise BackboneError(f"BlockSpec norm={self.norm!r} is unknown. Fix: use 'layernorm' or 'rmsnorm'.")
        if self.positions not in ("absolute", "relative", "rotary"):
            raise BackboneError(f"BlockSpec positions={self.positions!r} is unknown. Fix: use 'absolute', "
                                "'relative' or 'rotary'.")


@dataclass(frozen=True)
class AttentionStack:
    """One set of attention layers that shares one ``prefix_kv`` entry of the native forward.

    name:    "layers" (one stack: ``prefix_kv`` is a list) or a key of a ``prefix_kv`` dict
             ("encoder" | "decoder" | "cross" for T5).
    modules: canonical names of the attention modules, one per layer, in order.
    heads:   key/value heads (grouped-query attention: the KV heads); head_dim: their size.
    """

    name: str
    modules: tuple[str, ...]
    heads: int
    head_dim: int

    @property
    def layers(self) -> int:
        return len(self.modules)


@dataclass(frozen=True)
class LadderExtras:
    """What an encoder-decoder / relative-position family adds to the ladder: per stack the backbone's
    position bias (T -> (1, n_heads, T, T)), and the encoder's final norm (copied after the side encoder)."""

    position_bias: Mapping[str, Callable[[int], torch.Tensor]] = field(default_factory=dict)
    encoder_final_norm: nn.Module | None = None


def _no_extras(model: nn.Module) -> LadderExtras:
    return LadderExtras()


@dataclass(frozen=True)
class Family:
    """Everything family-specific about one backbone family (see the module doc)."""

    name: str
    model_types: tuple[str, ...]
    from_hf: Callable[..., nn.Module]
    key_table: Callable[[Any], KeyTable]
    block_spec: Callable[[Any], BlockSpec]
    attention_stacks: Callable[[nn.Module], list[AttentionStack]]
    layer_stacks: Callable[[nn.Module], list[nn.ModuleList]]
    default_targets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    config_from_hf: Callable[[Any], Any] | None = None   # HF config -> native config (block_spec of a live model)
    ladder_extras: Callable[[nn.Module], LadderExtras] = _no_extras
    stack_names: tuple[str, ...] = ("",)   # ("encoder", "decoder") for encoder-decoder families
    hf_fused_qkv: bool = False   # the transformers checkpoint keeps q|k|v in one (in, out) Conv1D (GPT-2's c_attn)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise BackboneError(f"Family name={self.name!r} must be a non-empty string. Fix: name it (e.g. 'llama').")
        if isinstance(self.model_types, str) or not all(isinstance(t, str) and t for t in self.model_types):
            raise BackboneError(f"Family {self.name!r}: model_types={self.model_types!r} must be a tuple of "
                                "strings. Fix: e.g. model_types=('llama', 'qwen2').")
        for key in ("from_hf", "key_table", "block_spec", "attention_stacks", "layer_stacks"):
            if not callable(getattr(self, key)):
                raise BackboneError(f"Family {self.name!r}: {key} is not callable. Fix: pass a function.")

    def targets_for(self, method: str, placement: str | None = None) -> tuple[str, ...] | None:
        """Default targets of ``method`` (``"adapter"`` with a placement: ``"adapter.<placement>"`` first)."""
        if placement is not None and f"{method}.{placement}" in self.default_targets:
            return tuple(self.default_targets[f"{method}.{placement}"])
        found = self.default_targets.get(method)
        return tuple(found) if found is not None else None

    def hf_block_spec(self, hf_config: Any) -> BlockSpec | None:
        """The block spec of a live transformers model of this family (None without ``config_from_hf``)."""
        return None if self.config_from_hf is None else self.block_spec(self.config_from_hf(hf_config))


# default delta targets in the canonical module names every family uses (docs/architecture.md); a family
# passes these, or its own (a gated FFN adds "mlp.gate" to intrinsic)
STANDARD_TARGETS: Mapping[str, tuple[str, ...]] = {
    "lora": ("q_proj", "v_proj"),
    "adapter.houlsby": ("attn.o_proj", "mlp.fc2"), "adapter.pfeiffer": ("mlp.fc2",), "adapter.parallel": ("mlp",),
    "intrinsic": ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "mlp.gate"),
}


def single_stack(model: nn.Module, heads: int, head_dim: int) -> list[AttentionStack]:
    """Attention stacks of a one-stack family (``layers.{i}.attn``): what BERT, RoBERTa, GPT-2 pass."""
    return [AttentionStack("layers", tuple(f"layers.{i}.attn" for i in range(len(model.layers))), heads, head_dim)]


_FAMILIES: dict[str, Family] = {}
_BY_MODEL_TYPE: dict[str, str] = {}
_loaded = False


def register_family(family: Family, *, overwrite: bool = False) -> Family:
    """Register ``family`` under its name and its transformers model types; duplicates raise unless
    ``overwrite=True``."""
    if not isinstance(family, Family):
        raise BackboneError(f"register_family got a {type(family).__name__}. Fix: pass a promptdelta.backbones."
                            "registry.Family record.")
    taken = [t for t in (family.name, *family.model_types)
             if (t in _FAMILIES and _FAMILIES[t].name != family.name) or
             (t in _BY_MODEL_TYPE and _BY_MODEL_TYPE[t] != family.name)]
    if not overwrite and (family.name in _FAMILIES or taken):
        raise BackboneError(f"family {family.name!r} (model types {list(family.model_types)}) clashes with a "
                            f"registered family ({sorted({family.name, *taken} & (set(_FAMILIES) | set(_BY_MODEL_TYPE)))})"
                            ". Fix: pick another name or pass overwrite=True.")
    old = _FAMILIES.pop(family.name, None)
    if old is not None:
        for t in old.model_types:
            _BY_MODEL_TYPE.pop(t, None)
    _FAMILIES[family.name] = family
    for t in family.model_types:
        _BY_MODEL_TYPE[t] = family.name
    return family


def unregister_family(name: str) -> None:
    """Remove a family (tests registering a toy family clean up with this)."""
    old = _FAMILIES.pop(name, None)
    if old is None:
        raise BackboneError(f"no family named {name!r} is registered. Fix: use one of {registered_families()}.")
    for t in old.model_types:
        if _BY_MODEL_TYPE.get(t) == name:
            del _BY_MODEL_TYPE[t]


def _load_builtin() -> None:
    """Import the shipped family files once (each registers itself at its end)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(f"promptdelta.backbones.{mod}")
        except ModuleNotFoundError as e:   # a family file not (yet) in this checkout
            if e.name != f"promptdelta.backbones.{mod}":
                raise


def find_family(name_or_model_type: str | None) -> Family | None:
    """The family registered under this name or transformers model type, or None."""
    _load_builtin()
    if not isinstance(name_or_model_type, str):
        return None
    if name_or_model_type in _FAMILIES:
        return _FAMILIES[name_or_model_type]
    name = _BY_MODEL_TYPE.get(name_or_model_type)
    return _FAMILIES[name] if name is not None else None


def get_family(name_or_model_type: str) -> Family:
    """The family registered under this name or transformers model type; BackboneError when unknown."""
    family = find_family(name_or_model_type)
    if family is None:
        raise BackboneError(f"no backbone family for {name_or_model_type!r}. Fix: use a registered family "
                            f"({registered_families()}) or model type ({sorted(_BY_MODEL_TYPE)}), or "
                            "register_family() one (docs/guide/families.md).")
    return family


def family_of(model: nn.Module) -> Family | None:
    """The family of a native backbone (its ``model.family``), None for any other module (a transformers
    model, a prompt model)."""
    name = getattr(model, "family", None)
    if not isinstance(name, str) or not hasattr(model, "input_embeddings"):
        return None
    _load_builtin()
    return _FAMILIES.get(name)


def hf_family(model: nn.Module) -> Family | None:
    """The family of a live transformers model (by ``config.model_type``), None when none is registered or
    ``model`` is a native backbone."""
    if family_of(model) is not None:
        return None
    return find_family(getattr(getattr(model, "config", None), "model_type", None))


def registered_families() -> list[str]:
    _load_builtin()
    return sorted(_FAMILIES)


def registered_model_types() -> list[str]:
    _load_builtin()
    return sorted(_BY_MODEL_TYPE)
