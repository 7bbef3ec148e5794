"""Native GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners").

Pre-LN decoder block:  x = x + Attn(LN(x));  x = x + MLP(LN(x)),  causal attention through
``F.scaled_dot_product_attention``; learned absolute positions; ``final_norm`` after the last block; a
bias-free ``lm_head`` tied to the word embeddings.

Departures from ``transformers.GPT2Model`` (each deliberate):
* position ids, when not given, come from the attention mask (``cumsum - 1``, 0 at padding), as HF's
  ``generate`` computes them, so a left-padded batch gives the same logits at real tokens as unpadded runs;
* ``token_type_ids`` are accepted for the shared backbone signature and ignored (GPT-2 has no segments);
* the KV cache is a plain tuple, one ``(k, v)`` per layer, each (B, n_heads, S, head_dim); it holds the
  real tokens only: ``prefix_kv`` (Li & Liang, 2021, prefix-tuning) is passed again on every call.

HF's Conv1D weights (``c_attn`` fused q|k|v, (H, 3H); ``c_proj``; ``c_fc``) are split and transposed into
``nn.Linear`` layout at load time (``_conv1d_to_linear``), then renamed through ``GPT2_KEYS`` (keymap.py);
``to_hf()`` does the reverse.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from promptdelta.backbones.base import (BackboneOutput, GradientCheckpointing, call_layer, causal_attention_bias,
                                        check_prefix_kv)
from promptdelta.backbones.generation import GenerationConfig, decode_loop
from promptdelta.backbones.keymap import KeyTable, load_hf_state
from promptdelta.errors import BackboneError, ConfigError

logger = logging.getLogger(__name__)

ACTIVATIONS = {
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),  # GPT-2's tanh approximation (HF name)
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}

KV = tuple[torch.Tensor, torch.Tensor]   # (k, v), each (B, n_heads, S, head_dim)
KVCache = tuple[KV, ...]                 # one per layer
PrefixKV = Sequence[KV | None]


@dataclass
class CausalLMOutput(BackboneOutput):
    past_key_values: KVCache | None = None  # set when forward(use_cache=True); excludes prefix_kv


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int | None = None  # None -> 4 * hidden_size (HF's n_inner=None)
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    embd_dropout: float = 0.1
    resid_dropout: float = 0.1
    attn_dropout: float = 0.1
    pad_token_id: int | None = None       # GPT-2 has no pad token; generate() falls back to EOS
    eos_token_id: int | None = 50256
    tie_word_embeddings: bool = True
    has_lm_head: bool = True              # False only for an untied checkpoint without lm_head.weight

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        for name in ("vocab_size", "n_positions", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value,
                     "a positive int")
        _require(self.hidden_size % self.num_heads == 0, "num_heads", self.num_heads,
                 f"a divisor of hidden_size={self.hidden_size}")
        _require(self.layer_norm_eps > 0, "layer_norm_eps", self.layer_norm_eps, "a positive float")
        _require(self.activation in ACTIVATIONS, "activation", self.activation, f"one of {sorted(ACTIVATIONS)}")
        for name in ("embd_dropout", "resid_dropout", "attn_dropout"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and 0.0 <= value < 1.0, name, value, "a float in [0, 1)")
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, int) and 0 <= value < self.vocab_size), name, value,
                     f"None or an int in [0, vocab_size={self.vocab_size})")
        for name in ("tie_word_embeddings", "has_lm_head"):
            _require(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPT2Config:
        """A named preset (see ``GPT2_PRESETS``) with some fields replaced."""
        if name not in GPT2_PRESETS:
            raise ConfigError(f"unknown GPT-2 preset {name!r}. Fix: use one of {sorted(GPT2_PRESETS)}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown GPT2Config field(s) {unknown}. Fix: use only {sorted(known)}.")
        return cls(**{**GPT2_PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> GPT2Config:
        """Convert a ``transformers.GPT2Config``; special ids outside the vocabulary become None."""
        _check_hf_supported(hf_config)
        values = dict(vocab_size=hf_config.vocab_size, n_positions=hf_config.n_positions,
                      hidden_size=hf_config.n_embd, num_layers=hf_config.n_layer, num_heads=hf_config.n_head,
                      intermediate_size=hf_config.n_inner, layer_norm_eps=hf_config.layer_norm_epsilon,
                      activation=hf_config.activation_function, embd_dropout=hf_config.embd_pdrop,
                      resid_dropout=hf_config.resid_pdrop, attn_dropout=hf_config.attn_pdrop,
                      tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)))
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(hf_config, name, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None and not 0 <= value < hf_config.vocab_size:
                logger.warning("%s=%s is outside the vocabulary (%d); using None", name, value, hf_config.vocab_size)
                value = None
            values[name] = value
        return cls(**{**values, **overrides})

    def to_hf(self) -> Any:
        """The equivalent ``transformers.GPT2Config``."""
        import transformers

        return transformers.GPT2Config(
            vocab_size=self.vocab_size, n_positions=self.n_positions, n_embd=self.hidden_size,
            n_layer=self.num_layers, n_head=self.num_heads, n_inner=self.intermediate_size,
            layer_norm_epsilon=self.layer_norm_eps, activation_function=self.activation,
            embd_pdrop=self.embd_dropout, resid_pdrop=self.resid_dropout, attn_pdrop=self.attn_dropout,
            pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id, bos_token_id=self.eos_token_id,
            tie_word_embeddings=self.tie_word_embeddings)


def _require(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"GPT2Config.{name}={value!r} is invalid. Fix: set {name} to {what}.")


def _check_hf_supported(hf_config: Any) -> None:
    unsupported = {"add_cross_attention": False, "scale_attn_by_inverse_layer_idx": False,
                   "scale_attn_weights": True}
    for name, wanted in unsupported.items():
        if getattr(hf_config, name, wanted) != wanted:
            raise BackboneError(f"{name}={getattr(hf_config, name)!r} is not supported by the native GPT-2. "
                                f"Fix: use a checkpoint with {name}={wanted} (plain GPT-2).")


GPT2_PRESETS: dict[str, dict[str, Any]] = {  # the OpenAI / HF hub sizes
    "distilgpt2": dict(hidden_size=768, num_layers=6, num_heads=12),
    "gpt2": dict(hidden_size=768, num_layers=12, num_heads=12),
    "gpt2-medium": dict(hidden_size=1024, num_layers=24, num_heads=16),
    "gpt2-large": dict(hidden_size=1280, num_layers=36, num_heads=20),
    "gpt2-xl": dict(hidden_size=1600, num_layers=48, num_heads=25),
}

# Names on the left are HF's after ``_conv1d_to_linear``: ``c_attn_{q,k,v}`` are the three thirds of c_attn.
GPT2_KEYS = KeyTable(
    family="gpt2",
    prefixes=("transformer.",),  # GPT2LMHeadModel nests the body under "transformer."
    rules=(
        ("wte", "embeddings.word_embeddings"),
        ("wpe", "embeddings.position_embeddings"),
        ("h.{}.ln_1", "layers.{}.attn_norm"),
        ("h.{}.attn.c_attn_q", "layers.{}.attn.q_proj"),
        ("h.{}.attn.c_attn_k", "layers.{}.attn.k_proj"),
        ("h.{}.attn.c_attn_v", "layers.{}.attn.v_proj"),
        ("h.{}.attn.c_proj", "layers.{}.attn.o_proj"),
        ("h.{}.ln_2", "layers.{}.mlp_norm"),
        ("h.{}.mlp.c_fc", "layers.{}.mlp.fc1"),
        ("h.{}.mlp.c_proj", "layers.{}.mlp.fc2"),
        ("ln_f", "final_norm"),
        ("lm_head", "lm_head"),
        ("h.{}.attn", "layers.{}.attn"),   # no weights of its own: a prefix delta's module name (after its parts)
        ("h.{}", "layers.{}"),   # the block itself (a ladder's targets), after everything inside it
    ),
    ignore=(r"\.attn\.(masked_)?bias$",),  # the causal-mask buffers old checkpoints saved
    tied={"lm_head.weight": "embeddings.word_embeddings.weight"},
    # a live transformers GPT-2's c_attn holds q, k, v (rows of the (out, in) layout): fingerprinted as the parts
    fused=(("h.{}.attn.c_attn", ("layers.{}.attn.q_proj", "layers.{}.attn.k_proj", "layers.{}.attn.v_proj")),),
)
_UNTIED_KEYS = dataclasses.replace(GPT2_KEYS, tied={})

_FUSED = re.compile(r"(^|\.)h\.\d+\.attn\.c_attn\.(weight|bias)$")
_CONV1D = re.compile(r"(^|\.)h\.\d+\.(attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_SPLIT = re.compile(r"(^|\.)h\.\d+\.attn\.c_attn_(?P<qkv>[qkv])\.(?P<leaf>weight|bias)$")


def _conv1d_to_linear(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split each fused ``c_attn`` into ``c_attn_{q,k,v}`` and transpose Conv1D (in, out) weights to (out, in)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        if _FUSED.search(key):
            if tensor.shape[-1] % 3:
                raise BackboneError(f"{key} has shape {tuple(tensor.shape)}: its last dim is not 3 * hidden_size "
                                    "(fused q|k|v). Fix: make sure config.json belongs to these weights.")
            stem, leaf = key.rsplit(".c_attn.", 1)
            for name, part in zip("qkv", tensor.chunk(3, dim=-1)):  # (H, H) each, or (H,) for the bias
                out[f"{stem}.c_attn_{name}.{leaf}"] = part.t() if part.dim() == 2 else part
        elif _CONV1D.search(key):
            out[key] = tensor.t() if tensor.dim() == 2 else tensor
        else:
            out[key] = tensor
    return out


def _linear_to_conv1d(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``_conv1d_to_linear`` (fuse q, k, v back into ``c_attn``; transpose to Conv1D layout)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        split = _SPLIT.search(key)
        if split:
            stem, leaf = key[: split.start("qkv") - len(".c_attn_")], split.group("leaf")
            if f"{stem}.c_attn.{leaf}" in out:
                continue
            parts = [state[f"{stem}.c_attn_{n}.{leaf}"] for n in "qkv"]
            out[f"{stem}.c_attn.{leaf}"] = torch.cat([p.t() if p.dim() == 2 else p for p in parts], dim=-1)
        elif _CONV1D.search(key):
            out[key] = tensor.t().contiguous()
        else:
            out[key] = tensor
    return out


class GPT2Embeddings(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.n_positions, config.hidden_size)
        self.dropout = nn.Dropout(config.embd_dropout)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(inputs_embeds + self.position_embeddings(position_ids))  # (B, T, H)


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attn_dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, prefix: KV | None,
                past: KV | None) -> tuple[torch.Tensor, KV]:
        B, T, H = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, nh, S + T, hd)
        present = (k, v)
        if prefix is not None:
            k = torch.cat([prefix[0].to(k.dtype), k], dim=2)  # (B, nh, P + S + T, hd)
            v = torch.cat([prefix[1].to(v.dtype), v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None and T > 1,
                                           dropout_p=self.dropout_p if self.training else 0.0)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H)), present  # (B, T, H)


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, T, I) -> (B, T, H)


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = GPT2Attention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GPT2MLP(config)
        self.dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, prefix: KV | None = None,
                past: KV | None = None) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.attn_norm(x), bias, prefix, past)
        x = x + self.dropout(a)                              # (B, T, H), pre-LN residual
        return x + self.dropout(self.mlp(self.mlp_norm(x))), present


class GPT2Model(GradientCheckpointing, nn.Module):
    """Native GPT-2 decoder with a tied LM head, KV cache, prefix_kv and ``generate``."""

    family = "gpt2"
    kind = "clm"

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.embeddings = GPT2Embeddings(config)
        self.layers = nn.ModuleList(GPT2Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if config.has_lm_head else None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers)
            if name.endswith(("o_proj.weight", "fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.num_layers))
        if self.lm_head is not None and config.tie_word_embeddings:
            self.lm_head.weight = self.embeddings.word_embeddings.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    @property
    def has_lm_head(self) -> bool:
        return self.lm_head is not None

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, prefix_kv: PrefixKV | None = None,
                output_hidden_states: bool = False, past_key_values: KVCache | None = None,
                use_cache: bool = False) -> CausalLMOutput:
        """Run the decoder over T new tokens, after the S cached ones in ``past_key_values``.

        attention_mask: (B, S + T), 1 = real, 0 = padding, covering cached and new tokens.
        hidden_states (when asked): embeddings, the output of each block, the last one after final_norm
        (as in transformers), so ``hidden_states[-1] is last_hidden_state``.
        """
        x, hidden, present = self._decode(input_ids, attention_mask, position_ids, inputs_embeds, prefix_kv,
                                          past_key_values, use_cache)
        return CausalLMOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            logits=self.lm_head(x) if self.lm_head is not None else None,
            past_key_values=tuple(present) if use_cache else None)

    def _decode(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                prefix_kv: PrefixKV | None, past: KVCache | None,
                use_cache: bool = False) -> tuple[torch.Tensor, list, list]:
        """Embeddings, then the blocks; returns (x, hidden states, per-layer (k, v) when ``use_cache``)."""
        inputs_embeds = self._token_embeddings(input_ids, inputs_embeds)  # (B, T, H)
        B, T, _ = inputs_embeds.shape
        pasts = self._check_past(past, B)
        S = 0 if pasts[0] is None else pasts[0][0].shape[2]
        if attention_mask is not None and tuple(attention_mask.shape) != (B, S + T):
            raise BackboneError(f"attention_mask has shape {tuple(attention_mask.shape)} but {S} cached + {T} new "
                                f"tokens need {(B, S + T)}. Fix: pass a (batch, cached + new) mask, 1 = keep.")
        position_ids = self._positions(position_ids, attention_mask, B, S, T, inputs_embeds.device)
        x = self.embeddings(inputs_embeds, position_ids)  # (B, T, H)
        prefixes = self._check_prefix(prefix_kv, B)
        hidden, present, biases = [x], [], {}
        ckpt = self._checkpoint_layers(cached=use_cache or past is not None)
        for layer, prefix, layer_past in zip(self.layers, prefixes, pasts):
            P = 0 if prefix is None else prefix[0].shape[2]
            if P not in biases:
                biases[P] = causal_attention_bias(attention_mask, T, S, P, None, B, x.dtype, x.device)
            x, kv = call_layer(layer, x, biases[P], prefix, layer_past, checkpoint=ckpt)  # (B, T, H)
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
        low, high = (int(input_ids.min()), int(input_ids.max())) if input_ids.numel() else (0, 0)
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise BackboneError(f"input_ids holds id {bad} but the vocabulary has {self.config.vocab_size} "
                                "tokens. Fix: use the tokenizer of this checkpoint.")
        return self.embeddings.word_embeddings(input_ids)  # (B, T, H)

    def _positions(self, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, B: int, S: int,
                   T: int, device: torch.device) -> torch.Tensor:
        """(B, T) positions: given, else from the mask (cumsum - 1, 0 at padding), else S .. S + T - 1."""
        if position_ids is None and attention_mask is not None:
            mask = attention_mask.long()
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, S:]  # (B, T)
        elif position_ids is None:
            position_ids = torch.arange(S, S + T, device=device).expand(B, T)  # (B, T)
        if position_ids.numel() and int(position_ids.max()) >= self.config.n_positions:
            raise BackboneError(f"position {int(position_ids.max())} exceeds n_positions={self.config.n_positions}. "
                                "Fix: truncate the inputs (or generate fewer tokens).")
        return position_ids

    def _check_past(self, past: KVCache | None, batch: int) -> list:
        if past is None:
            return [None] * len(self.layers)
        if len(past) != len(self.layers) or any(k.shape[0] != batch for k, _ in past):
            raise BackboneError(f"past_key_values does not fit a {len(self.layers)}-layer model and batch {batch} "
                                f"(got {len(past)} layers). Fix: pass the past_key_values returned by the "
                                "previous call with use_cache=True, for the same batch.")
        return list(past)

    def _check_prefix(self, prefix_kv: PrefixKV | None, batch: int) -> list:
        """Validate prefix_kv; a batch dimension of 1 is broadcast to the batch."""
        return check_prefix_kv(prefix_kv, len(self.layers), self.config.num_heads, self.config.head_dim, batch)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 prefix_kv: PrefixKV | None = None) -> torch.Tensor:
        """Continue (left-padded) prompts with the KV cache; returns prompts + new tokens (B, T + N).

        Greedy unless ``do_sample``; sampling applies temperature, top-k, top-p (see generation.py) and
        draws from ``generator``. A row stops at an EOS (default: config.eos_token_id); its later tokens are
        ``pad_token_id`` (default: config.pad_token_id, else the EOS). Call ``.eval()`` first to turn
        dropout off.
        """
        if self.lm_head is None:
            raise BackboneError("this GPT-2 has no LM head, so it cannot generate. Fix: load a checkpoint with "
                                "tied embeddings or an lm_head.weight.")
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                               top_k=top_k, top_p=top_p, eos_token_id=eos, pad_token_id=pad)
        B, T = input_ids.shape
        if T + max_new_tokens > self.config.n_positions:
            raise BackboneError(f"{T} prompt + {max_new_tokens} new tokens exceed n_positions="
                                f"{self.config.n_positions}. Fix: shorten the prompt or lower max_new_tokens.")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        state: dict[str, Any] = {"mask": mask, "past": None}

        def step(new: torch.Tensor | None) -> torch.Tensor:
            if new is not None:
                state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(B, 1)], dim=1)  # (B, S + 1)
            x, _, state["past"] = self._decode(input_ids if new is None else new, state["mask"], None, None,
                                               prefix_kv, state["past"], use_cache=True)
            return self.lm_head(x[:, -1])  # (B, V)

        new_tokens = decode_loop(step, B, cfg, generator=generator, device=input_ids.device)
        return torch.cat([input_ids, new_tokens.to(input_ids.dtype)], dim=1)  # (B, T + N)

    @classmethod
    def from_hf(cls, hf_model_or_state: nn.Module | Mapping[str, torch.Tensor],
                hf_config: Any = None) -> GPT2Model:
        """Native copy of a ``transformers`` GPT-2 (a live model, or a state dict with its HF config)."""
        if isinstance(hf_model_or_state, nn.Module):
            hf_config = hf_config if hf_config is not None else hf_model_or_state.config
            hf_model_or_state = hf_model_or_state.state_dict()
        if hf_config is None:
            raise BackboneError("GPT2Model.from_hf got a state dict without its config. Fix: pass hf_config= the "
                                "transformers.GPT2Config of these weights.")
        return gpt2_from_hf(hf_config, hf_model_or_state)

    def to_hf(self) -> nn.Module:
        """Export to ``transformers`` (GPT2LMHeadModel with an LM head, else GPT2Model), same weights."""
        import transformers

        hf_config = self.config.to_hf()
        hf = transformers.GPT2LMHeadModel(hf_config) if self.has_lm_head else transformers.GPT2Model(hf_config)
        body = "transformer." if self.has_lm_head else ""
        table = GPT2_KEYS if self.config.tie_word_embeddings else _UNTIED_KEYS
        named = {}
        for key, tensor in self.state_dict().items():
            hf_key = table.to_hf(key)
            named[hf_key if hf_key.startswith("lm_head") else body + hf_key] = tensor
        result = hf.load_state_dict(_linear_to_conv1d(named), strict=False)
        missing = [k for k in result.missing_keys if not table.is_ignored(k)]
        if missing or result.unexpected_keys:
            raise BackboneError(f"export to transformers left keys unset {missing} or unused "
                                f"{list(result.unexpected_keys)}. Fix: report this as a promptdelta bug.")
        return hf.to(self.embeddings.word_embeddings.weight.dtype).train(self.training)


def gpt2_from_hf(hf_config: Any, hf_state: Mapping[str, torch.Tensor]) -> GPT2Model:
    """Build a native GPT2Model from an HF config and state dict (the ``load_backbone`` builder for "gpt2")."""
    config = GPT2Config.from_hf(hf_config)
    table = GPT2_KEYS if config.tie_word_embeddings else _UNTIED_KEYS
    if not config.tie_word_embeddings and not any(table.strip_prefix(k) == "lm_head.weight" for k in hf_state):
        config = dataclasses.replace(config, has_lm_head=False)
    try:
        return load_hf_state(GPT2Model(config), _conv1d_to_linear(hf_state), table)
    except BackboneError as e:
        raise BackboneError(f"{e}\n(GPT-2 note: Conv1D weights are shown transposed, in nn.Linear (out, in) "
                            "layout; c_attn_q/k/v are the three thirds of the fused c_attn.)") from e


# --------------------------------------------------------------------------------------------- registration
from promptdelta.backbones.registry import STANDARD_TARGETS, BlockSpec, Family, register_family, single_stack  # noqa: E402

register_family(Family(
    name="gpt2", model_types=("gpt2",), from_hf=gpt2_from_hf, key_table=lambda config: GPT2_KEYS,
    block_spec=lambda c: BlockSpec(pre_norm=True, norm="layernorm", activation=c.activation, gated=False,
                                   positions="absolute", eps=c.layer_norm_eps),
    config_from_hf=GPT2Config.from_hf,
    attention_stacks=lambda m: single_stack(m, m.config.num_heads, m.config.head_dim),
    layer_stacks=lambda m: [m.layers], default_targets=STANDARD_TARGETS, hf_fused_qkv=True))
