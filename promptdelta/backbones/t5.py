"""Native T5 (Raffel et al., 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer") and T5 v1.1 / Flan-T5 (gated-GELU FFN, untied head; Chung et al., 2022).

Pre-norm encoder-decoder, no biases anywhere:
    x = x + SelfAttn(RMSNorm(x));  [decoder] x = x + CrossAttn(RMSNorm(x), enc);  x = x + FFN(RMSNorm(x))
    RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)                       (T5LayerNorm: no mean, no bias)
    Attn = softmax(q k^T + position_bias + mask) v                   (no 1/sqrt(d): folded into the init)
    FFN  = fc2(relu(fc1 x))  |  fc2(gelu_tanh(gate x) * fc1 x)       (HF: wi / wi_0 -> gate, wi_1 -> fc1, wo -> fc2)
    logits = lm_head(y * d_model**-0.5) when the head is tied to the embeddings, lm_head(y) otherwise.
The bucketed relative position bias lives in the first layer of each stack (bidirectional in the encoder,
causal in the decoder) and is shared by the other layers; cross-attention has none. ``prefix_kv`` prepends
per-layer keys/values (Li & Liang, 2021) that are always attended, with zero position bias.
The configuration (``T5Config``, the presets) lives in ``t5_config.py`` and is re-exported here.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from promptdelta.backbones.base import BackboneOutput, GradientCheckpointing, call_layer
from promptdelta.backbones.generation import GenerationConfig, decode_loop
from promptdelta.backbones.keymap import KeyTable, load_hf_state, load_into_hf
from promptdelta.backbones.t5_config import FFN_KINDS, T5_PRESETS, T5Config  # noqa: F401  (re-exported)
from promptdelta.errors import BackboneError

logger = logging.getLogger(__name__)

KV = tuple[torch.Tensor, torch.Tensor]               # (B, nh, S, d_kv) each
PrefixKV = Mapping[str, Sequence[KV | None]]          # {"encoder" | "decoder" | "cross": one per layer}
LayerCache = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # self k, self v, cross k, cross v


def _stack_rules(hf: str, native: str, is_decoder: bool, gated: bool) -> list[tuple[str, str]]:
    b, n = f"{hf}.block.{{}}.layer", f"{native}.layers.{{}}"
    ff = f"{b}.{2 if is_decoder else 1}"
    rules = [(f"{b}.0.SelfAttention.{p}", f"{n}.attn.{p}_proj") for p in "qkvo"]
    rules += [(f"{b}.0.SelfAttention.relative_attention_bias", f"{n}.attn.relative_attention_bias"),
              (f"{b}.0.layer_norm", f"{n}.attn_norm")]
    if is_decoder:
        rules += [(f"{b}.1.EncDecAttention.{p}", f"{n}.cross_attn.{p}_proj") for p in "qkvo"]
        rules += [(f"{b}.1.layer_norm", f"{n}.cross_attn_norm")]
    if gated:
        rules += [(f"{ff}.DenseReluDense.wi_0", f"{n}.mlp.gate"), (f"{ff}.DenseReluDense.wi_1", f"{n}.mlp.fc1")]
    else:
        rules += [(f"{ff}.DenseReluDense.wi", f"{n}.mlp.fc1")]
    rules += [(f"{ff}.DenseReluDense.wo", f"{n}.mlp.fc2"), (f"{ff}.layer_norm", f"{n}.mlp_norm"),
              (f"{hf}.final_layer_norm", f"{native}.final_norm")]
    rules += [(f"{b}.0.SelfAttention", f"{n}.attn")]    # the attention modules themselves (a prefix's targets),
    if is_decoder:                                       # after their projections' rules
        rules += [(f"{b}.1.EncDecAttention", f"{n}.cross_attn")]
    return rules


@functools.lru_cache(maxsize=None)
def t5_key_table(gated: bool, tied: bool) -> KeyTable:
    """HF <-> native key table for one T5 variant (FFN kind and head tying change the names)."""
    rules = [("shared", "embed_tokens"), ("encoder.embed_tokens", "embed_tokens"),
             ("decoder.embed_tokens", "embed_tokens"), ("lm_head", "lm_head")]
    rules += _stack_rules("encoder", "encoder", False, gated) + _stack_rules("decoder", "decoder", True, gated)
    return KeyTable(
        family="t5", rules=tuple(rules),
        # old checkpoints carry an unused cross-attention bias in the first decoder block
        ignore=(r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.",),
        tied={"lm_head.weight": "embed_tokens.weight"} if tied else {})


class T5LayerNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019): w * x / sqrt(mean(x^2) + eps), variance accumulated in fp32."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)  # (B, T, 1) fp32
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x  # (B, T, D)


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Mesh-TF bucketing of key_pos - query_pos: exact buckets for small distances, log-spaced up to
    ``max_distance``, one bucket beyond; bidirectional gives half the buckets to positive offsets."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)  # causal: only past keys, distance >= 0
    max_exact = num_buckets // 2
    scaled = torch.log(relative.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (scaled * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(relative < max_exact, relative, large)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool = False, bidirectional: bool = True):
        super().__init__()
        self.config, self.bidirectional = config, bidirectional
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.q_proj = nn.Linear(config.d_model, inner, bias=False)
        self.k_proj = nn.Linear(config.d_model, inner, bias=False)
        self.v_proj = nn.Linear(config.d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.d_model, bias=False)
        self.relative_attention_bias = (nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
                                        if has_relative_bias else None)

    def position_bias(self, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        """(1, nh, q_len, k_len) learned bias; queries sit at positions offset .. offset + q_len - 1."""
        device = self.relative_attention_bias.weight.device
        query = torch.arange(q_len, device=device)[:, None] + offset
        key = torch.arange(k_len, device=device)[None, :]
        bucket = relative_position_bucket(key - query, self.bidirectional, self.config.relative_attention_num_buckets,
                                          self.config.relative_attention_max_distance)  # (q, k)
        return self.relative_attention_bias(bucket).permute(2, 0, 1)[None]  # (1, nh, q, k)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.d_kv).transpose(1, 2)  # (B, nh, T, d_kv)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, source: torch.Tensor | None = None,
                prefix: KV | None = None, past: KV | None = None, static_kv: KV | None = None
                ) -> tuple[torch.Tensor, KV]:
        """x (B, T, D); bias (B, nh, T, P + S) additive; source: keys/values input (cross-attention);
        past: cached self-attention k/v; static_kv: cached cross-attention k/v. Returns (out, (k, v))."""
        B, T, _ = x.shape
        q = self._heads(self.q_proj(x))  # (B, nh, T, d_kv)
        if static_kv is not None:
            k, v = static_kv
        else:
            src = x if source is None else source
            k, v = self._heads(self.k_proj(src)), self._heads(self.v_proj(src))  # (B, nh, S, d_kv)
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)
        if prefix is not None:
            k = torch.cat([prefix[0].to(k.dtype).expand(B, -1, -1, -1), k], dim=2)  # (B, nh, P + S, d_kv)
            v = torch.cat([prefix[1].to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        p = self.config.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=1.0)  # (B, nh, T, d_kv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), present  # (B, T, D)


class T5MLP(nn.Module):
    """ReLU FFN fc2(relu(fc1 x)) or gated-GELU fc2(gelu_tanh(gate x) * fc1 x) (Shazeer, 2020)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.d_ff, bias=False) if config.is_gated else None
        self.fc1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.fc2 = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            h = F.relu(self.fc1(x))  # (B, T, F)
        else:
            h = F.gelu(self.gate(x), approximate="tanh") * self.fc1(x)  # (B, T, F)
        h = self.dropout(h)
        return self.fc2(h)  # (B, T, D); fc2 may be wrapped by a delta, so no .weight is read here


class T5Block(nn.Module):
    def __init__(self, config: T5Config, is_decoder: bool, has_relative_bias: bool):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.attn_norm = T5LayerNorm(config.d_model, eps)
        self.attn = T5Attention(config, has_relative_bias, bidirectional=not is_decoder)
        self.cross_attn_norm = T5LayerNorm(config.d_model, eps) if is_decoder else None
        self.cross_attn = T5Attention(config) if is_decoder else None
        self.mlp_norm = T5LayerNorm(config.d_model, eps)
        self.mlp = T5MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, prefix: KV | None = None, past: KV | None = None,
                enc: torch.Tensor | None = None, cross_bias: torch.Tensor | None = None,
                cross_prefix: KV | None = None, cross_kv: KV | None = None) -> tuple[torch.Tensor, KV, KV | None]:
        h, self_kv = self.attn(self.attn_norm(x), bias, prefix=prefix, past=past)
        x = x + self.dropout(h)  # (B, T, D)
        if self.cross_attn is None:
            cross_kv = None
        else:
            h, cross_kv = self.cross_attn(self.cross_attn_norm(x), cross_bias, source=enc, prefix=cross_prefix,
                                          static_kv=cross_kv)
            x = x + self.dropout(h)
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x, self_kv, cross_kv


def _bias(position_bias: torch.Tensor | None, keep: torch.Tensor, prefix_len: int, heads: int,
          dtype: torch.dtype) -> torch.Tensor:
    """Additive SDPA mask (B, nh, T, P + S): position bias (or 0), dtype-min where ``keep`` (B, 1, T, S) is
    False, zeros for the P prefix columns (always attended, no position bias)."""
    B, _, T, S = keep.shape
    base = keep.new_zeros(1, 1, T, S, dtype=dtype) if position_bias is None else position_bias.to(dtype)
    bias = base.expand(B, heads, T, S).masked_fill(~keep, torch.finfo(dtype).min)
    if prefix_len:
        bias = torch.cat([bias.new_zeros(B, heads, T, prefix_len), bias], dim=-1)
    return bias


class T5Stack(nn.Module):
    """A stack of T5 blocks with its final RMSNorm; layer 0 owns the relative position bias."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.is_decoder = is_decoder
        self.layers = nn.ModuleList(T5Block(config, is_decoder, has_relative_bias=i == 0) for i in range(n))
        self.final_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, prefixes: Sequence[KV | None], offset: int = 0,
                past: Sequence[LayerCache] | None = None, enc: torch.Tensor | None = None,
                enc_keep: torch.Tensor | None = None, cross_prefixes: Sequence[KV | None] | None = None,
                checkpoint: bool = False) -> tuple[torch.Tensor, list[torch.Tensor], list[LayerCache]]:
        """x (B, T, D) embeddings; keep (B, 1, T, S) self-attention keys allowed per query (S = offset + T).
        Returns (final normed output, hidden states, per-layer (self k, self v, cross k, cross v)).
        checkpoint: run each block under activation checkpointing (the caller asks only without a KV cache;
        the per-layer caches are then not kept)."""
        T, S = keep.shape[-2:]
        heads = self.layers[0].attn.num_heads
        pos = self.layers[0].attn.position_bias(T, S, offset)  # (1, nh, T, S), shared by all layers
        cross_prefixes = cross_prefixes or [None] * len(self.layers)
        biases: dict[tuple[str, int], torch.Tensor] = {}

        def bias_for(kind: str, prefix: KV | None) -> torch.Tensor | None:
            P = 0 if prefix is None else prefix[0].shape[2]
            if (kind, P) not in biases:
                biases[kind, P] = (_bias(pos, keep, P, heads, x.dtype) if kind == "self" else
                                   None if enc_keep is None else _bias(None, enc_keep, P, heads, x.dtype))
            return biases[kind, P]

        x = self.dropout(x)
        hidden, present = [x], []
        for i, layer in enumerate(self.layers):
            cache = past[i] if past is not None else None
            x, self_kv, cross_kv = call_layer(
                layer, x, bias_for("self", prefixes[i]), prefix=prefixes[i], past=cache[:2] if cache else None,
                enc=enc, cross_bias=bias_for("cross", cross_prefixes[i]) if self.is_decoder else None,
                cross_prefix=cross_prefixes[i], cross_kv=cache[2:] if cache else None, checkpoint=checkpoint)
            present.append(None if checkpoint else (*self_kv, *cross_kv) if cross_kv is not None else self_kv)
            hidden.append(x)
        x = self.dropout(self.final_norm(x))  # (B, T, D)
        hidden[-1] = x  # as transformers: the last hidden state is the normed output
        return x, hidden, present


@dataclass
class T5Output(BackboneOutput):
    """``last_hidden_state`` / ``hidden_states`` are the decoder's; the encoder's have their own fields."""

    encoder_last_hidden_state: torch.Tensor | None = None             # (B, S, D)
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    past_key_values: tuple[LayerCache, ...] | None = None             # per decoder layer, when use_cache
    loss: torch.Tensor | None = None                                  # mean CE over labels != -100


class T5Model(GradientCheckpointing, nn.Module):
    """Native T5 encoder-decoder with its LM head (tied to the shared embeddings, or a separate ``lm_head``)."""

    family = "t5"
    kind = "seq2seq"
    has_lm_head = True

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)  # shared by encoder, decoder, head
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        """Mesh-TF init: N(0, fan_in**-0.5) linears, q additionally / sqrt(d_kv) (the unscaled dot product)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features ** -0.5)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0 if module is self.embed_tokens else self.config.d_model ** -0.5)
        elif isinstance(module, T5Attention):  # visited after its children by nn.Module.apply
            nn.init.normal_(module.q_proj.weight, std=(self.config.d_model * self.config.d_kv) ** -0.5)

    def input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def key_table(self) -> KeyTable:
        return t5_key_table(self.config.is_gated, self.config.tie_word_embeddings)

    def _embed(self, ids: torch.Tensor | None, embeds: torch.Tensor | None, what: str) -> torch.Tensor:
        if (ids is None) == (embeds is None):
            got = "both" if ids is not None else "neither"
            raise BackboneError(f"got {got} of {what}_ids and {what}_embeds. Fix: pass exactly one of them.")
        if embeds is not None:
            return embeds  # (B, T, D)
        if ids.numel() and (int(ids.max()) >= self.config.vocab_size or int(ids.min()) < 0):
            raise BackboneError(f"{what}_ids holds id {int(ids.max())} (min {int(ids.min())}) but the vocabulary "
                                f"has {self.config.vocab_size} tokens. Fix: use the tokenizer of this checkpoint "
                                "(and replace -100 label padding before using labels as ids).")
        return self.embed_tokens(ids)  # (B, T, D)

    def _check_prefix(self, prefix_kv: PrefixKV | None, part: str, n_layers: int, batch: int) -> list[KV | None]:
        """Validate one part of prefix_kv ("encoder", "decoder" or "cross"); batch dimension 1 broadcasts."""
        if prefix_kv is None or prefix_kv.get(part) is None:
            return [None] * n_layers
        entries = prefix_kv[part]
        if len(entries) != n_layers:
            raise BackboneError(f"prefix_kv[{part!r}] has {len(entries)} entries but that stack has {n_layers} "
                                "layers. Fix: pass one (k, v) pair (or None) per layer.")
        heads, dim = self.config.num_heads, self.config.d_kv
        for i, pair in enumerate(entries):
            if pair is None:
                continue
            k, v = pair
            if k.dim() != 4 or k.shape != v.shape or k.shape[0] not in (1, batch) or (k.shape[1], k.shape[3]) != (
                    heads, dim):
                raise BackboneError(f"prefix_kv[{part!r}][{i}] has k {tuple(k.shape)} and v {tuple(v.shape)}. Fix: "
                                    f"pass k and v of shape (batch={batch} or 1, n_heads={heads}, prefix_len, "
                                    f"d_kv={dim}).")
        return list(entries)

    @staticmethod
    def _check_prefix_keys(prefix_kv: PrefixKV | None) -> None:
        unknown = sorted(set(prefix_kv or {}) - {"encoder", "decoder", "cross"})
        if unknown:
            raise BackboneError(f"prefix_kv has unknown part(s) {unknown}. Fix: use a dict with keys among "
                                "'encoder', 'decoder', 'cross'.")

    @staticmethod
    def _check_mask(mask: torch.Tensor | None, shape: tuple[int, int], name: str) -> torch.Tensor | None:
        if mask is not None and tuple(mask.shape) != shape:
            raise BackboneError(f"{name} has shape {tuple(mask.shape)} but {shape} was expected. Fix: pass a "
                                "(batch, length) mask with 1 = keep, 0 = pad (for the decoder with past_key_values: "
                                "past plus new tokens).")
        return None if mask is None else mask.bool()

    def encode(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               inputs_embeds: torch.Tensor | None = None, prefix_kv: PrefixKV | None = None,
               output_hidden_states: bool = False) -> BackboneOutput:
        """Run the encoder only: last_hidden_state (B, S, D) and, on request, its hidden states."""
        self._check_prefix_keys(prefix_kv)
        x = self._embed(input_ids, inputs_embeds, "input")  # (B, S, D)
        B, S, _ = x.shape
        mask = self._check_mask(attention_mask, (B, S), "attention_mask")
        keep = x.new_ones(B, 1, S, S, dtype=torch.bool) if mask is None else mask[:, None, None, :].expand(B, 1, S, S)
        prefixes = self._check_prefix(prefix_kv, "encoder", len(self.encoder.layers), B)
        out, hidden, _ = self.encoder(x, keep, prefixes, checkpoint=self._checkpoint_layers())
        return BackboneOutput(last_hidden_state=out, hidden_states=tuple(hidden) if output_hidden_states else None)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, decoder_inputs_embeds: torch.Tensor | None = None,
                encoder_outputs: torch.Tensor | BackboneOutput | None = None, prefix_kv: PrefixKV | None = None,
                past_key_values: Sequence[LayerCache] | None = None, use_cache: bool = False,
                output_hidden_states: bool = False, labels: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> T5Output:
        """Encode (unless ``encoder_outputs`` is given), decode, project to the vocabulary.

        Decoder inputs: ``decoder_input_ids`` / ``decoder_inputs_embeds``, else ``labels`` shifted right
        (decoder_start_token_id first, -100 -> pad), else one decoder_start_token_id per row (logits (B, 1, V)).
        ``token_type_ids`` is accepted for the shared backbone contract and ignored (T5 has no segments).
        """
        self._check_prefix_keys(prefix_kv)
        enc = self._encoder_states(input_ids, attention_mask, inputs_embeds, encoder_outputs, prefix_kv,
                                   output_hidden_states)
        enc_x = enc.last_hidden_state  # (B, S, D)
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = (self.shift_right(labels) if labels is not None else
                                 torch.full((enc_x.shape[0], 1), self.config.decoder_start_token_id,
                                            dtype=torch.long, device=enc_x.device))
        y = self._embed(decoder_input_ids, decoder_inputs_embeds, "decoder_input")  # (B, T, D)
        y, hidden, present = self._decode(y, enc_x, attention_mask, decoder_attention_mask, prefix_kv,
                                          past_key_values, use_cache)
        scale = self.config.d_model ** -0.5 if self.config.tie_word_embeddings else 1.0
        logits = self.lm_head(y * scale)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).to(logits.device),
                                   ignore_index=-100)
        return T5Output(last_hidden_state=y, hidden_states=tuple(hidden) if output_hidden_states else None,
                        logits=logits, encoder_last_hidden_state=enc_x, encoder_hidden_states=enc.hidden_states,
                        past_key_values=tuple(present) if use_cache else None, loss=loss)

    def _encoder_states(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                        inputs_embeds: torch.Tensor | None, encoder_outputs: Any, prefix_kv: PrefixKV | None,
                        output_hidden_states: bool) -> BackboneOutput:
        if encoder_outputs is None:
            return self.encode(input_ids, attention_mask, inputs_embeds, prefix_kv, output_hidden_states)
        if isinstance(encoder_outputs, torch.Tensor):
            return BackboneOutput(last_hidden_state=encoder_outputs)
        if isinstance(getattr(encoder_outputs, "last_hidden_state", None), torch.Tensor):
            return BackboneOutput(last_hidden_state=encoder_outputs.last_hidden_state,
                                  hidden_states=getattr(encoder_outputs, "hidden_states", None))
        raise BackboneError(f"encoder_outputs is a {type(encoder_outputs).__name__}. Fix: pass the (B, S, D) "
                            "tensor or the output of model.encode(...).")

    def _decode(self, y: torch.Tensor, enc: torch.Tensor, enc_mask: torch.Tensor | None,
                dec_mask: torch.Tensor | None, prefix_kv: PrefixKV | None,
                past: Sequence[LayerCache] | None,
                use_cache: bool = False) -> tuple[torch.Tensor, list[torch.Tensor], list[LayerCache]]:
        """Decoder stack over y (B, T, D): causal self-attention over past + new, cross-attention to enc."""
        B, T, _ = y.shape
        n = len(self.decoder.layers)
        if past is not None and len(past) != n:
            raise BackboneError(f"past_key_values has {len(past)} entries but the decoder has {n} layers. Fix: "
                                "pass the past_key_values of a previous call with use_cache=True.")
        offset = 0 if past is None else past[0][0].shape[2]
        S = offset + T
        causal = torch.ones(T, S, dtype=torch.bool, device=y.device).tril(diagonal=offset)  # (T, S)
        keep = causal[None, None].expand(B, 1, T, S)
        dec_mask = self._check_mask(dec_mask, (B, S), "decoder_attention_mask")
        if dec_mask is not None:
            keep = keep & dec_mask[:, None, None, :]  # (B, 1, T, S)
        enc_mask = self._check_mask(enc_mask, tuple(enc.shape[:2]), "attention_mask")
        enc_keep = None if enc_mask is None else enc_mask[:, None, None, :].expand(B, 1, T, enc.shape[1])
        return self.decoder(y, keep, self._check_prefix(prefix_kv, "decoder", n, B), offset, past, enc, enc_keep,
                            self._check_prefix(prefix_kv, "cross", n, B),
                            checkpoint=self._checkpoint_layers(cached=use_cache or past is not None))

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for teacher forcing: [start, y_0, ..., y_{T-2}], with -100 replaced by the pad id."""
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)  # (B, T)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
                 generator: torch.Generator | None = None, prefix_kv: PrefixKV | None = None) -> torch.Tensor:
        """Decode with the KV cache: (B, 1 + N) sequences starting with decoder_start_token_id, N <= max_new_tokens.

        Greedy unless ``do_sample``; rows stop at EOS (default config.eos_token_id) and are then padded with
        pad_token_id; the loop ends when every row has finished. Dropout stays as the module's mode says:
        call ``model.eval()`` first.
        """
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_k=top_k, top_p=top_p, pad_token_id=self.config.pad_token_id,
                                  eos_token_id=self.config.eos_token_id if eos_token_id is None else eos_token_id)
        enc = self.encode(input_ids, attention_mask, prefix_kv=prefix_kv).last_hidden_state  # (B, S, D)
        start = torch.full((enc.shape[0], 1), self.config.decoder_start_token_id, dtype=torch.long,
                           device=enc.device)  # (B, 1)
        cache: list[Any] = [None]

        def step(new_tokens: torch.Tensor | None) -> torch.Tensor:
            out = self(decoder_input_ids=start if new_tokens is None else new_tokens, attention_mask=attention_mask,
                       encoder_outputs=enc, prefix_kv=prefix_kv, past_key_values=cache[0], use_cache=True)
            cache[0] = out.past_key_values
            return out.logits[:, -1]  # (B, V)

        new = decode_loop(step, batch_size=enc.shape[0], config=config, generator=generator, device=enc.device)
        return torch.cat([start, new], dim=1)  # (B, 1 + N)

    def to_hf(self) -> nn.Module:
        """Export to ``transformers.T5ForConditionalGeneration`` with the same weights."""
        import transformers

        hf = transformers.T5ForConditionalGeneration(self.config.to_hf())
        if not self.config.tie_word_embeddings:  # transformers >= 5 ties the head regardless of the config
            hf.config.tie_word_embeddings = False
            hf.lm_head.weight = nn.Parameter(hf.lm_head.weight.detach().clone())
        load_into_hf(hf, self.state_dict(), self.key_table())
        return hf.to(self.embed_tokens.weight.dtype).train(self.training)


def t5_from_hf(hf_config: Any, hf_state: Mapping[str, torch.Tensor]) -> T5Model:
    """Build a native T5Model from a ``transformers.T5Config`` and an HF state dict (T5ForConditionalGeneration
    or T5Model; a checkpoint without ``lm_head.weight`` needs a tied config)."""
    config = T5Config.from_hf(hf_config)
    model = T5Model(config)
    return load_hf_state(model, hf_state, model.key_table())


# --------------------------------------------------------------------------------------------- registration
from promptdelta.backbones.registry import (STANDARD_TARGETS, AttentionStack, BlockSpec, Family,  # noqa: E402
                                            LadderExtras, register_family)


def _t5_keys(config: Any) -> KeyTable:
    """Key table from a native or a transformers T5 config (the FFN kind changes the names)."""
    return t5_key_table("gated" in str(getattr(config, "feed_forward_proj", "")),
                        bool(getattr(config, "tie_word_embeddings", True)))


def _t5_block_spec(c: T5Config) -> BlockSpec:
    return BlockSpec(pre_norm=True, norm="rmsnorm", activation="gelu_new" if c.is_gated else "relu",
                     gated=c.is_gated, positions="relative", eps=c.layer_norm_epsilon, bias=False, attn_scale=1.0)


def _t5_attention_stacks(m: T5Model) -> list[AttentionStack]:
    c, n_enc, n_dec = m.config, len(m.encoder.layers), len(m.decoder.layers)
    names = {"encoder": [f"encoder.layers.{i}.attn" for i in range(n_enc)],
             "decoder": [f"decoder.layers.{i}.attn" for i in range(n_dec)],
             "cross": [f"decoder.layers.{i}.cross_attn" for i in range(n_dec)]}
    return [AttentionStack(k, tuple(v), c.num_heads, c.d_kv) for k, v in names.items()]


def _t5_ladder_extras(m: T5Model) -> LadderExtras:
    """The relative position bias of each stack (owned by its layer 0) and the encoder's final norm."""
    def bias_of(attn: T5Attention):
        return lambda T: attn.position_bias(T, T)                                      # (1, nh, T, T)
    return LadderExtras({"encoder": bias_of(m.encoder.layers[0].attn), "decoder": bias_of(m.decoder.layers[0].attn)},
                        m.encoder.final_norm)


register_family(Family(
    name="t5", model_types=("t5",), from_hf=t5_from_hf, key_table=_t5_keys, block_spec=_t5_block_spec,
    config_from_hf=T5Config.from_hf, attention_stacks=_t5_attention_stacks,
    layer_stacks=lambda m: [m.encoder.layers, m.decoder.layers], default_targets=STANDARD_TARGETS,
    ladder_extras=_t5_ladder_extras, stack_names=("encoder", "decoder")))
