"""Prefix tuning on live transformers models, through their own key/value cache (see ``prefix.py``).

A transformers decoder attends to the keys/values of its cache before those of the new tokens, which is
exactly prefix tuning's ``softmax(q [K_p; K]^T) [V_p; V]``. So before each forward the learned prefixes are
written into a fresh ``transformers.DynamicCache`` (one (k, v) per layer, (B, n_kv_heads, P, head_dim)), and
the attention mask gets P leading ones so every query sees them. Positions continue after the prefix
(tokens sit at P, P + 1, ...), as if the prefix were P real tokens: the same as PEFT's prefix tuning.

* decoder-only models (GPT-2, Llama, Qwen2, Mistral, Gemma, Phi-3 ...): every layer's self-attention;
* encoder-decoder models (T5): the decoder's self-attention, in an ``EncoderDecoderCache`` whose
  cross-attention half starts empty (the encoder has no cache, so it gets no prefix here; a native T5 from
  ``load_backbone`` has encoder and cross-attention prefixes too);
* encoder-only models (BERT, RoBERTa, DistilBERT) keep no cache: refused, with the fix (``load_backbone``).

``generate(..., use_cache=False)`` works (each step runs the whole sequence after a fresh prefix); cached
decoding (a cache that already holds tokens, ``generate``'s default) is refused: the cache positions
``generate`` keeps would not count the prefix.
"""

from __future__ import annotations

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
    ``past_key_values``), None when it takes none."""
    params = inspect.signature(model.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def hf_stacks(model: nn.Module, aliases: dict[str, list[str]]) -> list[AttentionStack]:
    """The one attention stack that gets a prefix (decoder self-attention) of a transformers model; raises a
    DeltaError naming the reason when the model cannot take one."""
    config = getattr(model, "config", None)
    decoder = bool(getattr(config, "is_encoder_decoder", False))
    can = getattr(model, "can_generate", None)
    generates = callable(can) and bool(can())
    if config is None or cache_argument(model) is None or not (generates or getattr(config, "is_decoder", False)):
        raise DeltaError(f"prefix tuning on a transformers model goes through its key/value cache, and a "
                         f"{type(model).__name__} keeps none (an encoder-only model). Load it with "
                         f"promptdelta.load_backbone(model) to get a native backbone with a prefix_kv argument "
                         f"(BERT, RoBERTa ...), or use the 'adapter' or 'lora' delta on this model.")
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
    modules = tuple(natives.get(f"{stack}.{i}.attn", f"{stack}.{i}.attn") for i in range(layers))
    return [AttentionStack("layers", modules, kv_heads, head_dim)]


def _batch(args: tuple, kwargs: dict, enc_dec: bool) -> tuple[int, int, torch.device]:
    """(batch, new tokens, device) of a call: of the decoder's inputs (or labels) for an encoder-decoder."""
    keys = ("decoder_input_ids", "decoder_inputs_embeds", "labels") if enc_dec else ("input_ids", "inputs_embeds")
    for key in keys:
        x = kwargs.get(key, args[0] if key == "input_ids" and args else None)
        if isinstance(x, torch.Tensor):
            return x.shape[0], x.shape[1], x.device
    raise DeltaError(f"prefix tuning found none of {list(keys)} in the call; pass them as keywords.")


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
    cache = DynamicCache()
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
    mask = torch.cat([torch.ones(B, P, dtype=mask.dtype, device=mask.device), mask], dim=1)   # (B, P + T)
    if positional:
        args = (args[0], mask, *args[2:])
    else:
        kwargs[key] = mask
    return args, kwargs
