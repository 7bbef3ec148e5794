"""What every native backbone returns, and the attributes every native backbone has.

Contract (all families):
    model.family: str              # the name of its registered Family (registry.py): "bert", "llama" ...
    model.kind: str                # "mlm" (masked LM), "clm" (causal LM), "seq2seq"
    model.config                   # a dataclass; model.config.hidden_size, vocab_size, pad_token_id
    model.input_embeddings()       # -> nn.Embedding (word embeddings; shared with a tied head)
    model.has_lm_head: bool        # True when the checkpoint carried an LM/MLM head
    model.forward(input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                  inputs_embeds=None, prefix_kv=None, output_hidden_states=False) -> BackboneOutput
    model.gradient_checkpointing_enable() / _disable()   # activation checkpointing (GradientCheckpointing)
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import torch

#: The batch row (N,) of each token while a backbone runs its layers on packed (N, H) real tokens, else None.
#: Why: a module that needs a token's sequence (mixed-batch routing, deltas/mixed.py) reads it here.
PACKED_ROWS: ContextVar[torch.Tensor | None] = ContextVar("promptdelta_packed_rows", default=None)


@dataclass
class BackboneOutput:
    last_hidden_state: torch.Tensor                       # (B, T, H)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # (n_layers + 1) x (B, T, H), embeddings first
    logits: torch.Tensor | None = None                    # (B, T, V) when the model has an LM head
    pooler_output: torch.Tensor | None = None             # (B, H) when the model has a pooler


def check_prefix_kv(prefix_kv, n_layers: int, heads: int, head_dim: int, batch: int) -> list:
    """Validate a per-layer ``prefix_kv`` list; a batch dimension of 1 is broadcast to the batch.

    Returns one ``(k, v)`` (each (B, n_heads, P, head_dim)) or None per layer.
    """
    from promptdelta.errors import BackboneError

    if prefix_kv is None:
        return [None] * n_layers
    if len(prefix_kv) != n_layers:
        raise BackboneError(f"prefix_kv has {len(prefix_kv)} entries but the model has {n_layers} "
                            "layers. Fix: pass one (k, v) pair (or None) per layer.")
    out = []
    for i, pair in enumerate(prefix_kv):
        if pair is None:
            out.append(None)
            continue
        k, v = pair
        if k.dim() != 4 or k.shape != v.shape or k.shape[0] not in (1, batch) or \
                (k.shape[1], k.shape[3]) != (heads, head_dim):
            raise BackboneError(f"prefix_kv[{i}] has k {tuple(k.shape)} and v {tuple(v.shape)}. Fix: pass k "
                                f"and v of shape (batch={batch} or 1, n_heads={heads}, prefix_len, "
                                f"head_dim={head_dim}).")
        out.append((k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)))
    return out


class GradientCheckpointing:
    """Activation (gradient) checkpointing for a native backbone's layer stacks (Chen et al., 2016,
    "Training Deep Nets with Sublinear Memory Cost").

    When on, each layer's forward runs inside ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``:
    only the layer's inputs are kept for backward and its activations are recomputed there, trading about
    one extra forward for memory that no longer grows with depth. Dropout draws the same masks in the
    recomputation (the RNG state is saved), so loss and gradients equal those without checkpointing. It
    applies only in training mode, with gradients on and no KV cache (``use_cache`` / ``past_key_values``):
    evaluation, ``torch.no_grad`` and generation run as before. Same method names as ``transformers``.
    """

    gradient_checkpointing: bool = False

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.gradient_checkpointing

    def _checkpoint_layers(self, cached: bool = False) -> bool:
        """Whether this forward checkpoints its layers: switched on, training, grad enabled, no KV cache."""
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled() and not cached


def call_layer(layer: torch.nn.Module, *args, checkpoint: bool = False, **kwargs):
    """``layer(*args, **kwargs)``, under non-reentrant activation checkpointing when ``checkpoint``."""
    if checkpoint:
        from torch.utils.checkpoint import checkpoint as run_checkpointed

        return run_checkpointed(layer, *args, use_reentrant=False, **kwargs)
    return layer(*args, **kwargs)


def causal_attention_bias(key_mask: torch.Tensor | None, T: int, S: int, P: int, window: int | None,
                          batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Additive SDPA mask (B, 1, T, P + S + T): query i (cache position S + i) sees every prefix key and the
    real keys j with S + i - window < j <= S + i (no lower bound when window is None). None (SDPA's own causal
    mask) when only causality applies. Masked entries get dtype-min, not -inf, so a padding query that sees no
    key stays finite instead of NaN. Shared by the causal decoders (GPT-2, Llama family)."""
    if key_mask is None and S == 0 and P == 0 and (window is None or window >= T):
        return None
    q_pos = torch.arange(S, S + T, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S + T, device=device)[None, :]     # (1, S + T)
    allowed = k_pos <= q_pos                                 # (T, S + T)
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    allowed = allowed.expand(batch, T, S + T)
    if key_mask is not None:
        allowed = allowed & key_mask.to(device).bool()[:, None, :]  # (B, T, S + T)
    if P:
        allowed = torch.cat([allowed.new_ones(batch, T, P), allowed], dim=-1)  # (B, T, P + S + T)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
