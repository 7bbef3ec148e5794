"""Faster CPU training of transformers models: the fused dropout (``kernels/dropout.py``) and fused attention
(``kernels/attention_cpu.py``) put into a model in place, and taken out again.

    handle = fast_dropout(model)     # every nn.Dropout -> FastDropout (same p, same state_dict), and the
    ...train...                      # attention -> "promptdelta_cpu" where it goes through AttentionInterface
    handle.restore()                 # the original modules and attention implementation back

Why: on CPU, torch's dropout draws its random numbers one generator step at a time, ~12% of a MiniLM
training step (19 ``bernoulli_`` calls); the fused kernels hash (seed, index) instead and do not keep a
mask for the backward. Eval is unchanged: dropout is the identity and "promptdelta_cpu" runs transformers'
own SDPA attention when the module is not training (or has no dropout), so eval outputs are bit-identical
to the "sdpa" implementation. The trainer applies this on CPU by default (``train.fast_dropout``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from promptdelta.kernels.attention_cpu import attention
from promptdelta.kernels.dropout import FastDropout, dropout_error, dropout_ops

logger = logging.getLogger(__name__)

ATTENTION_NAME = "promptdelta_cpu"
_UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "s_aux")   # attention variants the fused core does not do


def promptdelta_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' AttentionInterface signature: q, k, v (B, nh, T, hd) -> ((B, Tq, nh, hd), None).
    Training with dropout runs :func:`attention_cpu.attention`; everything else transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    plain = (not module.training or dropout == 0.0 or key.shape[1] != query.shape[1]
             or (attention_mask is None and causal and query.shape[2] > 1)        # causality left to SDPA's flag
             or any(kwargs.get(k) is not None for k in _UNSUPPORTED_KWARGS) or kwargs.get("output_attentions"))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = attention(query, key, value, attention_mask, scaling, dropout, True)   # (B, nh, Tq, hd)
    return out.transpose(1, 2).contiguous(), None


def _promptdelta_mask(*args: Any, **kwargs: Any) -> Any:
    """SDPA's boolean mask, but never skipped for causal models (the fused core has no is_causal flag)."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register_attention() -> None:
    """Register "promptdelta_cpu" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, promptdelta_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _promptdelta_mask)


@dataclass
class FastDropoutHandle:
    """What :func:`fast_dropout` changed; ``restore()`` undoes it (also on leaving a ``with`` block)."""

    swapped: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)   # (parent, name, original)
    attention: list[tuple[nn.Module, str]] = field(default_factory=list)            # (HF model, previous impl)
    native: list[nn.Module] = field(default_factory=list)     # native backbones put on torch's dropout
    message: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.swapped or self.attention or self.native)

    def restore(self) -> None:
        """Put back every original dropout module and attention implementation (a second call does nothing)."""
        for parent, name, original in reversed(self.swapped):
            setattr(parent, name, original)
        for model, previous in reversed(self.attention):
            model.set_attn_implementation(previous)
        for backbone in reversed(self.native):
            backbone.use_torch_dropout(False)
        self.swapped, self.attention, self.native = [], [], []

    def __enter__(self) -> "FastDropoutHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def _hf_models(module: nn.Module) -> list[nn.Module]:
    """The outermost transformers PreTrainedModels in ``module`` (set_attn_implementation reaches their parts)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    if isinstance(module, PreTrainedModel):
        return [module]
    return [m for child in module.children() for m in _hf_models(child)]


def _swap_dropouts(model: nn.Module, handle: FastDropoutHandle) -> None:
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:          # exactly nn.Dropout: subclasses may do more than drop
                fast = FastDropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
                handle.swapped.append((parent, name, child))


def _set_attention(model: nn.Module, handle: FastDropoutHandle) -> list[str]:
    """Select "promptdelta_cpu" in each transformers model that dispatches through AttentionInterface."""
    skipped = []
    for hf in _hf_models(model):
        previous = getattr(hf.config, "_attn_implementation", None)
        if not (isinstance(previous, str) and type(hf)._can_set_attn_implementation()):
            skipped.append(type(hf).__name__)
            continue
        if previous != ATTENTION_NAME:
            register_attention()
            hf.set_attn_implementation(ATTENTION_NAME)
            handle.attention.append((hf, previous))
    return skipped


def fast_dropout(model: nn.Module) -> FastDropoutHandle:
    """Swap ``model``'s nn.Dropout modules for FastDropout and its transformers attention for "promptdelta_cpu"
    (CPU models only); returns the handle whose ``restore()`` undoes both. A model it cannot speed up (not on
    CPU, no compiled kernel) is left untouched; ``handle.message`` says what was and was not changed."""
    handle = FastDropoutHandle()
    devices = {p.device.type for p in model.parameters()}
    has_dropout = any(type(m) is nn.Dropout for m in model.modules()) or bool(_hf_models(model))
    if not has_dropout:
        handle.message = f"fast_dropout: {type(model).__name__} left untouched: no nn.Dropout, no transformers model"
    elif devices - {"cpu"}:
        handle.message = (f"fast_dropout: {type(model).__name__} left untouched: it is on {sorted(devices)}, "
                          "where torch's dropout is already fast")
    elif dropout_ops() is None:
        handle.message = (f"fast_dropout: {type(model).__name__} left untouched: the fused kernel is unavailable "
                          f"({dropout_error()})")
    else:
        _swap_dropouts(model, handle)
        skipped = _set_attention(model, handle)
        attn = f"attention of {len(handle.attention)} transformers model(s) -> {ATTENTION_NAME}"
        if skipped:
            attn += f"; attention left as is in {', '.join(skipped)} (no AttentionInterface dispatch)"
        handle.message = f"fast_dropout: {len(handle.swapped)} nn.Dropout -> FastDropout; {attn}"
    logger.info("%s", handle.message)
    return handle


def torch_dropout(model: nn.Module) -> FastDropoutHandle:
    """The opposite of :func:`fast_dropout` for native backbones, which run the fused dropout in training by
    themselves: each one in ``model`` that has ``use_torch_dropout`` is put on torch's dropout until
    ``restore()`` (``train.fast_dropout: false``, so such a run draws torch's masks, as runs before it did)."""
    handle = FastDropoutHandle()
    for m in model.modules():
        layers = getattr(m, "layers", None)
        if callable(getattr(m, "use_torch_dropout", None)) and layers is not None and \
                not all(getattr(layer.attn, "torch_dropout", False) for layer in layers):
            m.use_torch_dropout(True)
            handle.native.append(m)
    handle.message = f"torch_dropout: {len(handle.native)} native backbone(s) on torch's dropout"
    logger.info("%s", handle.message)
    return handle
