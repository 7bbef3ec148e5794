"""Prefix tuning on live transformers models, through their own key/value cache (see ``prefix.py``).

A transformers attention layer that is handed a cache attends to the cache's keys/values before those of the
new tokens, which is exactly prefix tuning's ``softmax(q [K_p; K]^T) [V_p; V]``. So before each forward the
learned prefixes are written into a fresh cache (one (k, v) per layer, (B, n_kv_heads, P, head_dim)), and the
attention mask gets P leading ones so every query sees them.

* decoder-only models (GPT-2, Llama, Qwen2, Mistral, Gemma, Phi-3 ...): every layer's self-attention, in a
  ``transformers.DynamicCache``. Positions continue after the prefix (tokens sit at P, P + 1, ...), as if the
  prefix were P real tokens: the same as PEFT's prefix tuning;
* encoder-decoder models (T5): the decoder's self-attention, in an ``EncoderDecoderCache`` whose
  cross-attention half starts empty (the encoder has no cache, so it gets no prefix here; a native T5 from
  ``load_backbone`` has encoder and cross-attention prefixes too);
* encoder-only models whose forward takes a cache (BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, ERNIE as
  ``...Model``): every layer's self-attention, in an ``EncoderPrefixCache`` that reports length 0, so the
  positions stay 0..T-1 (RoBERTa: its padding-aware numbering) exactly as without a prefix, the same as the
  native backbones' ``prefix_kv`` (PEFT's cache on these models numbers the tokens from P instead). Task heads
  (``BertForSequenceClassification`` ...) take no cache argument: the prefix attaches to their encoder
  (``model.bert``). Encoders without a cache argument (DistilBERT, ALBERT, DeBERTa) are refused, with the fix.

Training under transformers' gradient checkpointing is refused: its checkpointed layers drop the cache.
``generate(..., use_cache=False)`` works (each step runs the whole sequence after a fresh prefix); cached
decoding (a cache that already holds tokens, ``generate``'s default) is refused: the cache positions
``generate`` keeps would not count the prefix.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from promptdelta.backbones.registry import AttentionStack
from promptdelta.errors import DeltaError


def _int(config: Any, *keys: str) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def cache_argument(model: nn.Module) -> str | None:
    """The name under which ``model.forward`` takes a KV cache (``cache`` in newer transformers, else
    ``past_key_values``), None when it takes none. A task head over an encoder (``BertForMaskedLM``) takes
    none itself but hands its ``**kwargs`` on to the encoder (``model.base_model``): the encoder's name."""
    params = inspect.signature(model.forward).parameters
    own = next((k for k in ("cache", "past_key_values") if k in params), None)
    base = getattr(model, "base_model", model)
    if own is None and base is not model and isinstance(base, nn.Module) and encoder_only(model) and \
            any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return cache_argument(base)
    return own


# Encoder families whose self-attention takes a cache (transformers 5.x ``model_type``s); others are refused.
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie"})


def encoder_only(model: nn.Module) -> bool:
    """A transformers encoder of ``ENCODER_TYPES`` (not configured as a decoder): its prefix keeps positions."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in ENCODER_TYPES and not getattr(config, "is_decoder", False) \
        and not getattr(config, "is_encoder_decoder", False)


def hf_stacks(model: nn.Module, aliases: dict[str, list[str]]) -> list[AttentionStack]:
    """The one attention stack that gets a prefix (decoder self-attention, or an encoder's self-attention)
    of a transformers model; raises a DeltaError naming the reason when the model cannot take one."""
    config = getattr(model, "config", None)
    decoder = bool(getattr(config, "is_encoder_decoder", False))
    can = getattr(model, "can_generate", None)
    generates = callable(can) and bool(can()) or bool(getattr(config, "is_decoder", False))
    if config is None or cache_argument(model) is None or not (generates or encoder_only(model)):
        raise DeltaError(f"prefix tuning on a transformers model goes through its key/value cache, and a "
                         f"{type(model).__name__} keeps none (encoders: {', '.join(sorted(ENCODER_TYPES))} only). "
                         f"Load it with promptdelta.load_backbone(model) "
                         f"to get a native backbone with a prefix_kv argument (BERT, RoBERTa ...), or use the "
                         f"'adapter' or 'lora' delta on this model.")
    heads = _int(config, "num_attention_heads", "num_heads", "n_head")
    kv_heads = _int(config, "num_key_value_heads") or heads
    hidden = _int(config, "hidden_size", "d_model", "n_embd")
    head_dim = _int(config, "head_dim", "d_kv") or (hidden // heads if hidden and heads else None)
    layers = _int(config, "num_decoder_layers", "num_layers", "num_hidden_layers", "n_layer") if decoder else \
        _int(config, "num_hidden_layers", "n_layer", "num_layers")
    if not (kv_heads and head_dim and layers):
        raise DeltaError(f"prefix tuning cannot read the attention sizes (heads, head_dim, layers) of "
                         f"{type(model).__name__} from its config; load it with promptdelta.load_backbone(model) "
                         f"or use the 'lora' delta.")
    stack = "decoder.layers" if decoder else "layers"
    natives = {a: own for own, names in aliases.items() for a in names}
    modules = tuple(_attention_module(natives, f"{stack}.{i}.attn") for i in range(layers))
    return [AttentionStack("layers", modules, kv_heads, head_dim)]


def _attention_module(natives: dict[str, str], attn: str) -> str:
    """The model's own name of native ``attn`` (``layers.3.attn``): its alias, else the module holding the query
    projection (BERT's ``encoder.layer.3.attention.self``: its ``attention`` also holds the output LayerNorm)."""
    if attn in natives:
        return natives[attn]
    q = natives.get(f"{attn}.q_proj")
    return q.rpartition(".")[0] if q and "." in q else attn


def _batch(args: tuple, kwargs: dict, enc_dec: bool) -> tuple[int, int, torch.device]:
    """(batch, new tokens, device) of a call: of the decoder's inputs (or labels) for an encoder-decoder."""
    keys = ("decoder_input_ids", "decoder_inputs_embeds", "labels") if enc_dec else ("input_ids", "inputs_embeds")
    for key in keys:
        x = kwargs.get(key, args[0] if key == "input_ids" and args else None)
        if isinstance(x, torch.Tensor):
            return x.shape[0], x.shape[1], x.device
    raise DeltaError(f"prefix tuning found none of {list(keys)} in the call; pass them as keywords.")


@functools.cache
def encoder_prefix_cache() -> type:
    """The class ``EncoderPrefixCache``, defined on first use (transformers is imported lazily)."""
    from transformers import DynamicCache

    class EncoderPrefixCache(DynamicCache):
        """A DynamicCache of prefix keys/values that occupy no positions: an encoder reads ``get_seq_length()``
        as the offset of its position ids, and a prefix must leave them at 0..T-1 (as native ``prefix_kv``)."""

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return 0

    return EncoderPrefixCache


def _checkpoints_without_cache(model: nn.Module) -> bool:
    """A layer of ``model`` checkpoints its forward and sets the cache to None for it (transformers 5.x)."""
    return any(getattr(m, "gradient_checkpointing", False) is True and
               not getattr(m, "_can_checkpoint_with_cache", False) for m in model.modules())


def inject(model: nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]], args: tuple,
           kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook body: a fresh cache holding the prefixes (each (1, n_kv, P, hd), broadcast to the
    batch), and the attention mask (the decoder's, for an encoder-decoder) with P leading ones."""
    from transformers import DynamicCache, EncoderDecoderCache

    name = next((k for k in ("cache", "past_key_values") if kwargs.get(k) is not None), cache_argument(model))
    given = kwargs.get(name)
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    B, T, device = _batch(args, kwargs, enc_dec)
    P = pairs[0][0].shape[2]
    if getattr(given, "_promptdelta_prefix", False) and T > given.get_seq_length() - P:
        given = None   # ours, handed back with the whole sequence again (generate(use_cache=False)): rebuild
    if given is not None and given.get_seq_length() > 0:
        raise DeltaError(f"a prefix delta on {type(model).__name__} cannot run with a cache that already holds "
                         f"tokens (cached decoding): its positions would not count the prefix. Call the model "
                         f"without a cache (generate(..., use_cache=False)), or use a native backbone from "
                         f"promptdelta.load_backbone, whose generate takes prefix_kv.")
    if model.training and torch.is_grad_enabled() and _checkpoints_without_cache(model):
        raise DeltaError(f"{type(model).__name__} has gradient checkpointing on, and transformers then drops the "
                         f"cache that carries the prefix (its layers would run without it). Call "
                         f"model.gradient_checkpointing_disable(), or use promptdelta.load_backbone(model), whose "
                         f"checkpointing keeps prefix_kv.")
    cache = encoder_prefix_cache()() if encoder_only(model) else DynamicCache()
    for i, (k, v) in enumerate(pairs):
        cache.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), i)    # (B, n_kv, P, hd)
    full = EncoderDecoderCache(cache, DynamicCache()) if enc_dec else cache
    full._promptdelta_prefix = True
    kwargs = {**kwargs, name: full}
    key = "decoder_attention_mask" if enc_dec else "attention_mask"
    positional = not enc_dec and len(args) > 1
    mask = args[1] if positional else kwargs.get(key)
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.long, device=device)
    if mask.dim() != 2:
        raise DeltaError(f"a prefix delta on {type(model).__name__} extends a 2D (batch, tokens) {key} by its "
                         f"P={P} columns, got shape {tuple(mask.shape)}; pass the 2D padding mask.")
    mask = torch.cat([torch.ones(B, P, dtype=mask.dtype, device=mask.device), mask], dim=1)   # (B, P + T)
    if positional:
        args = (args[0], mask, *args[2:])
    else:
        kwargs[key] = mask
    return args, kwargs
