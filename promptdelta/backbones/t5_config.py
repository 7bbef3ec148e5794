"""T5's configuration: the ``T5Config`` dataclass (checked fields, HF config conversion both ways) and the named
presets (t5-small/base/large, flan-t5-small/base/large). The model is in ``t5.py``, which re-exports these."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from promptdelta.errors import BackboneError, ConfigError

FFN_KINDS = ("relu", "gated-gelu")


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64                      # per-head size; n_heads * d_kv need not equal d_model
    d_ff: int = 2048
    num_layers: int = 6                 # encoder layers
    num_decoder_layers: int | None = None  # None: same as num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"     # "relu" (t5) | "gated-gelu" (t5 v1.1, flan-t5)
    tie_word_embeddings: bool = True    # True: head = embeddings, decoder output scaled by d_model**-0.5
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0     # T5 starts decoding from the pad id

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value,
                     "a positive int")
        _require(self.relative_attention_num_buckets >= 4, "relative_attention_num_buckets",
                 self.relative_attention_num_buckets, "an int >= 4 (T5 uses 32)")
        _require(self.relative_attention_max_distance > self.relative_attention_num_buckets // 2,
                 "relative_attention_max_distance", self.relative_attention_max_distance,
                 f"an int > relative_attention_num_buckets // 2 = {self.relative_attention_num_buckets // 2}")
        _require(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0, "dropout", self.dropout,
                 "a float in [0, 1)")
        _require(self.layer_norm_epsilon > 0, "layer_norm_epsilon", self.layer_norm_epsilon, "a positive float")
        _require(self.feed_forward_proj in FFN_KINDS, "feed_forward_proj", self.feed_forward_proj,
                 f"one of {list(FFN_KINDS)}")
        _require(isinstance(self.tie_word_embeddings, bool), "tie_word_embeddings", self.tie_word_embeddings,
                 "True or False")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and 0 <= value < self.vocab_size,
                     name, value, f"an int in [0, vocab_size={self.vocab_size})")

    @property
    def hidden_size(self) -> int:  # the name every backbone config offers
        return self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_kv

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> T5Config:
        """A named preset (see ``T5_PRESETS``) with some fields replaced."""
        if name not in T5_PRESETS:
            raise ConfigError(f"unknown T5 preset {name!r}. Fix: use one of {sorted(T5_PRESETS)}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown T5Config field(s) {unknown}. Fix: use only {sorted(known)}.")
        return cls(**{**T5_PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> T5Config:
        """Convert a ``transformers.T5Config`` (t5, t5 v1.1, flan-t5)."""
        if hf_config.feed_forward_proj not in FFN_KINDS:
            raise BackboneError(f"feed_forward_proj={hf_config.feed_forward_proj!r} is not supported by the native "
                                f"T5. Fix: use a checkpoint with one of {list(FFN_KINDS)}.")
        # transformers >= 5 forces tie_word_embeddings=True and keeps the checkpoint's choice (head scaled or
        # not) in scale_decoder_outputs; older versions only have tie_word_embeddings.
        tied = getattr(hf_config, "scale_decoder_outputs", hf_config.tie_word_embeddings)
        eos = hf_config.eos_token_id
        pad = 0 if hf_config.pad_token_id is None else hf_config.pad_token_id
        start = getattr(hf_config, "decoder_start_token_id", None)
        values = dict(
            vocab_size=hf_config.vocab_size, d_model=hf_config.d_model, d_kv=hf_config.d_kv, d_ff=hf_config.d_ff,
            num_layers=hf_config.num_layers, num_decoder_layers=hf_config.num_decoder_layers,
            num_heads=hf_config.num_heads, relative_attention_num_buckets=hf_config.relative_attention_num_buckets,
            relative_attention_max_distance=hf_config.relative_attention_max_distance,
            dropout=hf_config.dropout_rate, layer_norm_epsilon=hf_config.layer_norm_epsilon,
            feed_forward_proj=hf_config.feed_forward_proj, tie_word_embeddings=bool(tied), pad_token_id=pad,
            eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else (1 if eos is None else eos),
            decoder_start_token_id=pad if start is None else start)
        return cls(**{**values, **overrides})

    def to_hf(self) -> Any:
        """The equivalent ``transformers.T5Config``."""
        import transformers

        return transformers.T5Config(
            vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
            num_layers=self.num_layers, num_decoder_layers=self.num_decoder_layers, num_heads=self.num_heads,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance, dropout_rate=self.dropout,
            layer_norm_epsilon=self.layer_norm_epsilon, feed_forward_proj=self.feed_forward_proj,
            tie_word_embeddings=self.tie_word_embeddings, pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id, decoder_start_token_id=self.decoder_start_token_id)


def _require(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"T5Config.{name}={value!r} is invalid. Fix: set {name} to {what}.")


_V11 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
T5_PRESETS: dict[str, dict[str, Any]] = {
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "t5-base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "t5-large": dict(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16),
    # v1.1 / Flan-T5: gated-GELU FFN, untied head (decoder output not rescaled)
    "flan-t5-small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6, **_V11),
    "flan-t5-base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12, **_V11),
    "flan-t5-large": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16, **_V11),
}
