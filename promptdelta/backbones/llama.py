"""Native Llama family: Llama (Touvron et al., 2023), Qwen2 (Yang et al., 2024), Mistral (Jiang et al., 2023).

Pre-norm decoder block, nanoGPT-style:
    x = x + o(Attn(RoPE(q(RMS(x))), RoPE(k(RMS(x))), v(RMS(x))));   x = x + fc2(silu(gate(RMS(x))) * fc1(RMS(x)))
    RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)                   (Zhang & Sennrich, 2019; fp32 statistics)
    RoPE: rotate each (x_j, x_{j+d/2}) pair by angle pos * inv_freq_j  (Su et al., 2021, "RoFormer")
    SwiGLU FFN (Shazeer, 2020, "GLU Variants Improve Transformer")
* grouped-query attention (Ainslie et al., 2023): ``num_kv_heads`` k/v heads, each shared by
  ``num_heads / num_kv_heads`` query heads;
* optional q/k/v bias (Qwen2; Llama's ``attention_bias`` also puts one on o) and MLP bias (Llama);
* sliding-window attention (Mistral; Qwen2 on the layers past ``max_window_layers``): query i sees keys
  j with i - W < j <= i, counted in cache positions as transformers does;
* rotary scaling: "default", "linear" (positions / factor) and "llama3" (Llama 3.1's per-frequency blend).

Module names (what delta targets see) are the project's canonical ones, the same as T5 v1.1's gated FFN:
``layers.{i}.attn.{q,k,v,o}_proj``, ``layers.{i}.attn_norm`` / ``mlp_norm``, ``layers.{i}.mlp.gate``
(HF gate_proj), ``mlp.fc1`` (HF up_proj), ``mlp.fc2`` (HF down_proj), ``embed_tokens``, ``final_norm``,
``lm_head``; so the adapter's ``mlp.fc2`` default and the ladder's roles fit as on every other family.
Position ids, KV cache, ``prefix_kv`` (which may have num_kv_heads or num_heads heads) and left padding
work as in gpt.py. ``LLAMA_KEYS`` maps HF names; ``to_hf()`` exports back exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from promptdelta.backbones.base import GradientCheckpointing, call_layer, causal_attention_bias, check_prefix_kv
from promptdelta.backbones.generation import GenerationConfig, decode_loop
from promptdelta.backbones.gpt import KV, CausalLMOutput, KVCache, PrefixKV
from promptdelta.backbones.keymap import KeyTable, load_hf_state, load_into_hf
from promptdelta.errors import BackboneError, ConfigError

logger = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "qwen2", "mistral")
ROPE_KEYS = {"default": ("rope_theta",), "linear": ("rope_theta", "factor"),  # rope_type -> keys it reads
             "llama3": ("rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings")}
ROPE_TYPES = tuple(ROPE_KEYS)
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class LlamaConfig:
    model_type: str = "llama"                 # which transformers class to_hf() builds
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None           # None -> num_heads (plain multi-head attention)
    head_dim: int | None = None               # None -> hidden_size // num_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention" | "sliding_attention"
    attn_dropout: float = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None  # Llama 3 ends a turn at any of several ids
    tie_word_embeddings: bool = False
    has_lm_head: bool = True

    def __post_init__(self) -> None:
        self.num_kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        self.head_dim = self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim
        if self.layer_types is None:
            kind = "full_attention" if self.sliding_window is None else "sliding_attention"
            self.layer_types = (kind,) * self.num_layers
        self.layer_types = tuple(self.layer_types)
        _require(self.model_type in MODEL_TYPES, "model_type", self.model_type, f"one of {MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value,
                     "a positive int")
        _require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", self.num_kv_heads,
                 f"a divisor of num_heads={self.num_heads}")
        _require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "an even int (rotary pairs)")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "a positive float")
        kind = self.rope.get("rope_type", "default")
        _require(kind in ROPE_TYPES, "rope", self.rope, f"a dict with rope_type in {ROPE_TYPES}")
        _require(all(k in self.rope for k in ROPE_KEYS[kind]), "rope", self.rope,
                 f"a dict with the keys {ROPE_KEYS[kind]} (rope_type {kind!r})")
        _require(self.activation in ACTIVATIONS, "activation", self.activation, f"one of {sorted(ACTIVATIONS)}")
        _require(self.sliding_window is None or (isinstance(self.sliding_window, int) and self.sliding_window > 0),
                 "sliding_window", self.sliding_window, "None or a positive int")
        _require(len(self.layer_types) == self.num_layers and
                 set(self.layer_types) <= {"full_attention", "sliding_attention"}, "layer_types",
                 self.layer_types, f"{self.num_layers} of 'full_attention' / 'sliding_attention'")
        _require("sliding_attention" not in self.layer_types or self.sliding_window is not None, "sliding_window",
                 self.sliding_window, "a positive int (layer_types has sliding layers)")
        _require(0.0 <= self.attn_dropout < 1.0, "attn_dropout", self.attn_dropout, "a float in [0, 1)")
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = tuple(self.eos_token_id)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, tuple) and name == "eos_token_id" else (value,)
            _require(value is None or all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids), name,
                     value, f"None or an int in [0, vocab_size={self.vocab_size})" + (" or a tuple of them" if
                                                                                    name == "eos_token_id" else ""))

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> LlamaConfig:
        """Convert a ``transformers`` Llama / Qwen2 / Mistral config; special ids outside the vocabulary -> None."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in MODEL_TYPES:
            raise BackboneError(f"model_type {model_type!r} is not in the Llama family {MODEL_TYPES}. Fix: load it "
                                "through promptdelta.load_backbone, which picks the right family.")
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        rope.setdefault("rope_type", "default")
        rope.setdefault("rope_theta", float(getattr(hf_config, "rope_theta", 10000.0)))
        if rope["rope_type"] not in ROPE_TYPES or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise BackboneError(f"rope_parameters {rope} are not supported by the native Llama family. Fix: use "
                                f"rope_type in {ROPE_TYPES} with a full rotary dim, or the transformers model.")
        bias = bool(getattr(hf_config, "attention_bias", False))
        values = dict(model_type=model_type, vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
                      intermediate_size=hf_config.intermediate_size, num_layers=hf_config.num_hidden_layers,
                      num_heads=hf_config.num_attention_heads, num_kv_heads=hf_config.num_key_value_heads,
                      head_dim=getattr(hf_config, "head_dim", None), rope=rope,
                      max_position_embeddings=hf_config.max_position_embeddings, rms_norm_eps=hf_config.rms_norm_eps,
                      qkv_bias=model_type == "qwen2" or bias, o_bias=bias, mlp_bias=bool(getattr(hf_config,
                      "mlp_bias", False)), activation=hf_config.hidden_act,
                      sliding_window=getattr(hf_config, "sliding_window", None),
                      layer_types=getattr(hf_config, "layer_types", None),
                      attn_dropout=float(hf_config.attention_dropout or 0.0),
                      tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(hf_config, name, None)
            given = list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]
            kept = [i for i in given if 0 <= i < hf_config.vocab_size]
            if len(kept) < len(given):
                logger.warning("%s=%s is outside the vocabulary (%d); using %s", name, value, hf_config.vocab_size,
                               kept or None)
            if name == "eos_token_id" and len(kept) > 1:
                values[name] = tuple(kept)
            else:
                values[name] = kept[0] if kept else None
        return cls(**{**values, **overrides})

    def to_hf(self) -> Any:
        """The equivalent ``transformers`` LlamaConfig / Qwen2Config / MistralConfig."""
        import transformers

        common = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                      intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                      num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                      max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
                      rope_parameters=dict(self.rope), hidden_act=self.activation, attention_dropout=self.attn_dropout,
                      pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id,
                      eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else
                      self.eos_token_id, tie_word_embeddings=self.tie_word_embeddings)
        sliding = "sliding_attention" in self.layer_types
        if self.model_type == "llama" and not sliding and self.qkv_bias == self.o_bias:
            return transformers.LlamaConfig(head_dim=self.head_dim, attention_bias=self.qkv_bias,
                                            mlp_bias=self.mlp_bias, **common)
        if self.model_type == "qwen2" and self.qkv_bias and not (self.o_bias or self.mlp_bias) and \
                self.head_dim * self.num_heads == self.hidden_size:
            return transformers.Qwen2Config(use_sliding_window=self.sliding_window is not None,
                                            sliding_window=self.sliding_window,
                                            layer_types=list(self.layer_types), **common)
        if self.model_type == "mistral" and not (self.qkv_bias or self.o_bias or self.mlp_bias) and \
                set(self.layer_types) == {"sliding_attention" if sliding else "full_attention"}:
            return transformers.MistralConfig(head_dim=self.head_dim, sliding_window=self.sliding_window, **common)
        raise BackboneError(f"this {self.model_type} config (bias q/k/v={self.qkv_bias} o={self.o_bias} "
                            f"mlp={self.mlp_bias}, layer_types={set(self.layer_types)}) has no transformers "
                            "equivalent. Fix: use the bias / window layout of that model_type.")


def _require(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"LlamaConfig.{name}={value!r} is invalid. Fix: set {name} to {what}.")


LLAMA_KEYS = KeyTable(
    family="llama",
    prefixes=("model.",),  # *ForCausalLM nests the body under "model."; lm_head sits beside it
    rules=(
        ("embed_tokens", "embed_tokens"),
        ("layers.{}.input_layernorm", "layers.{}.attn_norm"),
        ("layers.{}.self_attn.q_proj", "layers.{}.attn.q_proj"),
        ("layers.{}.self_attn.k_proj", "layers.{}.attn.k_proj"),
        ("layers.{}.self_attn.v_proj", "layers.{}.attn.v_proj"),
        ("layers.{}.self_attn.o_proj", "layers.{}.attn.o_proj"),
        ("layers.{}.post_attention_layernorm", "layers.{}.mlp_norm"),
        ("layers.{}.mlp.gate_proj", "layers.{}.mlp.gate"),
        ("layers.{}.mlp.up_proj", "layers.{}.mlp.fc1"),
        ("layers.{}.mlp.down_proj", "layers.{}.mlp.fc2"),
        ("layers.{}.self_attn", "layers.{}.attn"),   # no weights: a prefix delta's module name (after q/k/v/o)
        ("layers.{}", "layers.{}"),   # the block itself (a ladder's targets), after everything inside it
        ("norm", "final_norm"),
        ("lm_head", "lm_head"),
    ),
    ignore=(r"rotary_emb\.inv_freq$",),  # old checkpoints saved the rotary buffer
    tied={"lm_head.weight": "embed_tokens.weight"},
)
_UNTIED_KEYS = dataclasses.replace(LLAMA_KEYS, tied={})


def rope_inv_freq(head_dim: int, rope: Mapping[str, Any]) -> torch.Tensor:
    """(head_dim / 2,) inverse frequencies f_j = theta^(-2j/d), scaled by the rope_type:

    linear (Chen et al., 2023, position interpolation):  f_j / s
    llama3 (Llama 3.1), with wavelength w_j = 2 pi / f_j and the original context L:
        w_j < L / high: f_j;   w_j > L / low: f_j / s;   else (1 - a) f_j / s + a f_j,
        a = (L / w_j - low) / (high - low)
    """
    inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope.get("rope_type", "default")
    if kind == "linear":  # pos / s and f / s give the same angles
        return inv / rope["factor"]
    if kind == "llama3":  # long wavelengths / factor, short ones kept, a smooth blend between
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, blended, scaled)
    return inv


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, h, T, d) rotated: x * cos + rotate_half(x) * sin, with cos/sin (B, 1, T, d)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps), statistics in fp32 (cast back before the weight, as transformers)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)  # (B, T, H)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        H, inner, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(H, inner, bias=config.qkv_bias)
        self.k_proj = nn.Linear(H, kv, bias=config.qkv_bias)
        self.v_proj = nn.Linear(H, kv, bias=config.qkv_bias)
        self.o_proj = nn.Linear(inner, H, bias=config.o_bias)
        self.dropout_p = config.attn_dropout

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, hd)

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_kv, S, hd) -> (B, n_heads, S, hd): each k/v head serves num_heads / num_kv_heads queries."""
        B, n, S, hd = x.shape
        rep = self.num_heads // n
        # expand + reshape, not repeat_interleave: its backward is a plain sum over the copies
        return x if rep == 1 else x[:, :, None].expand(B, n, rep, S, hd).reshape(B, n * rep, S, hd)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None,
                prefix: KV | None, past: KV | None) -> tuple[torch.Tensor, KV]:
        B, T, _ = x.shape
        cos, sin = rope
        q = apply_rope(self._heads(self.q_proj(x), self.num_heads), cos, sin)     # (B, nh, T, hd)
        k = apply_rope(self._heads(self.k_proj(x), self.num_kv_heads), cos, sin)  # (B, nkv, T, hd)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, nkv, S + T, hd)
        present = (k, v)
        if prefix is not None:
            if prefix[0].shape[1] != self.num_kv_heads:  # one prefix per query head: repeat k/v first
                k, v = self._repeat(k), self._repeat(v)  # (B, nh, S + T, hd)
            k, v = torch.cat([prefix[0].to(k.dtype), k], dim=2), torch.cat([prefix[1].to(v.dtype), v], dim=2)
        gqa = k.shape[1] != self.num_heads
        if gqa and bias is not None:  # SDPA's grouped path is fast only without a mask (as transformers does)
            k, v, gqa = self._repeat(k), self._repeat(v), False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None and T > 1,
                                           dropout_p=self.dropout_p if self.training else 0.0,
                                           enable_gqa=gqa)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), present  # (B, T, H)


class LlamaMLP(nn.Module):
    """SwiGLU: fc2(silu(gate x) * fc1 x)  (HF: down_proj(act(gate_proj x) * up_proj x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        H, inner = config.hidden_size, config.intermediate_size
        self.gate = nn.Linear(H, inner, bias=config.mlp_bias)
        self.fc1 = nn.Linear(H, inner, bias=config.mlp_bias)
        self.fc2 = nn.Linear(inner, H, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.gate(x)) * self.fc1(x))  # (B, T, I) -> (B, T, H)


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig, sliding: bool):
        super().__init__()
        self.sliding = sliding  # whether this layer masks keys older than the sliding window
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = LlamaAttention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None,
                prefix: KV | None = None, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.attn_norm(x), rope, bias, prefix, past)
        x = x + a                                     # (B, T, H), pre-norm residual
        return x + self.mlp(self.mlp_norm(x)), present


class LlamaModel(GradientCheckpointing, nn.Module):
    """Native Llama / Qwen2 / Mistral decoder with an LM head, KV cache, prefix_kv and ``generate``."""

    family = "llama"
    kind = "clm"

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(LlamaBlock(config, t == "sliding_attention") for t in config.layer_types)
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if config.has_lm_head else None
        # fp32 always, not a buffer: model.to(bfloat16) would round the frequencies and shift every angle
        self._inv_freq = rope_inv_freq(config.head_dim, config.rope)  # (hd / 2,)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if self.lm_head is not None and config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def model_type(self) -> str:
        return self.config.model_type

    def input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    @property
    def has_lm_head(self) -> bool:
        return self.lm_head is not None

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, prefix_kv: PrefixKV | None = None,
                output_hidden_states: bool = False, past_key_values: KVCache | None = None,
                use_cache: bool = False) -> CausalLMOutput:
        """Run the decoder over T new tokens, after the S cached ones in ``past_key_values``.

        attention_mask: (B, S + T), 1 = real, 0 = padding; token_type_ids are accepted and ignored.
        hidden_states (when asked): embeddings, then each block's output, the last one after final_norm.
        """
        x, hidden, present = self._decode(input_ids, attention_mask, position_ids, inputs_embeds, prefix_kv,
                                          past_key_values, use_cache)
        return CausalLMOutput(last_hidden_state=x, hidden_states=tuple(hidden) if output_hidden_states else None,
                              logits=self.lm_head(x) if self.lm_head is not None else None,
                              past_key_values=tuple(present) if use_cache else None)

    def _decode(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, prefix_kv: PrefixKV | None,
                past: KVCache | None, use_cache: bool = False) -> tuple[torch.Tensor, list, list]:
        x = self._token_embeddings(input_ids, inputs_embeds)  # (B, T, H)
        B, T, _ = x.shape
        pasts = self._check_past(past, B)
        S = 0 if pasts[0] is None else pasts[0][0].shape[2]
        if attention_mask is not None and tuple(attention_mask.shape) != (B, S + T):
            raise BackboneError(f"attention_mask has shape {tuple(attention_mask.shape)} but {S} cached + {T} new "
                                f"tokens need {(B, S + T)}. Fix: pass a (batch, cached + new) mask, 1 = keep.")
        if position_ids is None and attention_mask is not None:  # left padding: count real tokens only
            mask = attention_mask.long()
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, S:]  # (B, T)
        elif position_ids is None:
            position_ids = torch.arange(S, S + T, device=x.device).expand(B, T)
        if self._inv_freq.device != x.device:
            self._inv_freq = self._inv_freq.to(x.device)
        freqs = position_ids[..., None].float() * self._inv_freq  # (B, T, hd / 2), in fp32
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]                  # (B, 1, T, hd)
        rope = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        prefixes = self._check_prefix(prefix_kv, B)
        hidden, present, biases = [x], [], {}
        ckpt = self._checkpoint_layers(cached=use_cache or past is not None)
        for layer, prefix, layer_past in zip(self.layers, prefixes, pasts):
            P = 0 if prefix is None else prefix[0].shape[2]
            window = self.config.sliding_window if layer.sliding else None
            if (P, window) not in biases:
                biases[P, window] = causal_attention_bias(attention_mask, T, S, P, window, B, x.dtype, x.device)
            x, kv = call_layer(layer, x, rope, biases[P, window], prefix, layer_past, checkpoint=ckpt)
            hidden.append(x)
            present.append(kv if use_cache else None)  # an unused cache would hold every layer's k, v
        x = self.final_norm(x)
        hidden[-1] = x
        return x, hidden, present

    def _token_embeddings(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            got = "both" if input_ids is not None else "neither"
            raise BackboneError(f"got {got} of input_ids and inputs_embeds. Fix: pass exactly one of them.")
        if inputs_embeds is not None:
            return inputs_embeds
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            bad = int(input_ids.min()) if int(input_ids.min()) < 0 else int(input_ids.max())
            raise BackboneError(f"input_ids holds id {bad} but the vocabulary has {self.config.vocab_size} "
                                "tokens. Fix: use the tokenizer of this checkpoint.")
        return self.embed_tokens(input_ids)  # (B, T, H)

    def _check_past(self, past: KVCache | None, batch: int) -> list:
        if past is None:
            return [None] * len(self.layers)
        if len(past) != len(self.layers) or any(k.shape[0] != batch for k, _ in past):
            raise BackboneError(f"past_key_values does not fit a {len(self.layers)}-layer model and batch {batch} "
                                f"(got {len(past)} layers). Fix: pass the past_key_values returned by the "
                                "previous call with use_cache=True, for the same batch.")
        return list(past)

    def _check_prefix(self, prefix_kv: PrefixKV | None, batch: int) -> list:
        """Validate prefix_kv: (B or 1, num_kv_heads or num_heads, P, head_dim) per layer."""
        c = self.config
        first = next((p for p in prefix_kv or () if p is not None), None)
        heads = c.num_heads if first is not None and first[0].dim() == 4 and first[0].shape[1] == c.num_heads \
            else c.num_kv_heads
        return check_prefix_kv(prefix_kv, len(self.layers), heads, c.head_dim, batch)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 prefix_kv: PrefixKV | None = None) -> torch.Tensor:
        """Continue (left-padded) prompts with the KV cache; returns prompts + new tokens (B, T + N).

        Greedy unless ``do_sample`` (temperature, top-k, top-p; see generation.py). A row stops at an EOS
        (default config.eos_token_id); its later tokens are ``pad_token_id`` (default config's, else the EOS).
        """
        if self.lm_head is None:
            raise BackboneError("this model has no LM head, so it cannot generate. Fix: load a checkpoint with "
                                "tied embeddings or an lm_head.weight.")
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                               top_k=top_k, top_p=top_p, eos_token_id=eos, pad_token_id=pad)
        B = input_ids.shape[0]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()  # (B, T)
        state: dict[str, Any] = {"past": None, "mask": mask}

        def step(new: torch.Tensor | None) -> torch.Tensor:
            if new is not None:
                state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(B, 1)], dim=1)  # (B, S + 1)
            x, _, state["past"] = self._decode(input_ids if new is None else new, state["mask"], None, None,
                                               prefix_kv, state["past"], use_cache=True)
            return self.lm_head(x[:, -1])  # (B, V)

        new_tokens = decode_loop(step, B, cfg, generator=generator, device=input_ids.device)
        return torch.cat([input_ids, new_tokens.to(input_ids.dtype)], dim=1)  # (B, T + N)

    @classmethod
    def from_hf(cls, hf_model_or_state: nn.Module | Mapping[str, torch.Tensor], hf_config: Any = None) -> LlamaModel:
        """Native copy of a ``transformers`` Llama / Qwen2 / Mistral (a live model, or a state dict + its config)."""
        if isinstance(hf_model_or_state, nn.Module):
            hf_config = hf_config if hf_config is not None else hf_model_or_state.config
            hf_model_or_state = hf_model_or_state.state_dict()
        if hf_config is None:
            raise BackboneError("LlamaModel.from_hf got a state dict without its config. Fix: pass hf_config= the "
                                "transformers config of these weights.")
        return llama_from_hf(hf_config, hf_model_or_state)

    def to_hf(self) -> nn.Module:
        """Export to ``transformers`` (*ForCausalLM with an LM head, else the bare *Model), same weights."""
        import transformers

        hf_config = self.config.to_hf()
        name = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[self.config.model_type]
        cls = getattr(transformers, f"{name}ForCausalLM" if self.has_lm_head else f"{name}Model")
        hf = cls(hf_config)
        table = LLAMA_KEYS if self.config.tie_word_embeddings else _UNTIED_KEYS
        load_into_hf(hf, self.state_dict(), table)
        return hf.to(self.embed_tokens.weight.dtype).train(self.training)


def llama_from_hf(hf_config: Any, hf_state: Mapping[str, torch.Tensor]) -> LlamaModel:
    """Build a native LlamaModel from an HF config and state dict (the ``load_backbone`` builder)."""
    config = LlamaConfig.from_hf(hf_config)
    table = LLAMA_KEYS if config.tie_word_embeddings else _UNTIED_KEYS
    if not config.tie_word_embeddings and not any(table.strip_prefix(k) == "lm_head.weight" for k in hf_state):
        config = dataclasses.replace(config, has_lm_head=False)
    return load_hf_state(LlamaModel(config), hf_state, table)



# --------------------------------------------------------------------------------------------- registration
from promptdelta.backbones.registry import STANDARD_TARGETS, BlockSpec, Family, register_family, single_stack  # noqa: E402


def _key_table(config: Any) -> KeyTable:
    """The key table of a native or transformers config (tied heads have no lm_head.weight of their own)."""
    return LLAMA_KEYS if getattr(config, "tie_word_embeddings", False) else _UNTIED_KEYS


register_family(Family(
    name="llama", model_types=MODEL_TYPES, from_hf=llama_from_hf, key_table=_key_table,
    block_spec=lambda c: BlockSpec(pre_norm=True, norm="rmsnorm", activation=c.activation, gated=True,
                                   positions="rotary", eps=c.rms_norm_eps,
                                   bias=c.qkv_bias and c.o_bias and c.mlp_bias),
    config_from_hf=LlamaConfig.from_hf,
    attention_stacks=lambda m: single_stack(m, m.config.num_kv_heads, m.config.head_dim),  # GQA: the k/v heads
    layer_stacks=lambda m: [m.layers], default_targets=STANDARD_TARGETS))
