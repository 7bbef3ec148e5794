"""Native RoBERTa (Liu et al., 2019, "RoBERTa: A Robustly Optimized BERT Pretraining Approach").

The encoder is BERT's (post-LN layers, pooler, ``prefix_kv``; all reused from ``bert.py``). What differs:

* positions are offset past the padding index (fairseq's ``make_positions``): for ``input_ids``,
  ``pos_t = pad + sum_{s<=t} [id_s != pad]`` at real tokens and ``pos_t = pad`` at pad tokens; for
  ``inputs_embeds`` (pads cannot be seen), ``pos_t = pad + 1 + t``. Both exactly as ``transformers``.
  So a sequence may hold at most ``max_position_embeddings - pad_token_id - 1`` tokens (512 for roberta-base).
* one token type (``type_vocab_size=1`` in real checkpoints);
* the MLM head is ``decoder(LN(gelu(dense(x))))`` with the exact-erf GELU whatever ``hidden_act`` is, the
  decoder weight tied to the word embeddings and its bias stored by HF as ``lm_head.bias``;
* HF keys live under ``roberta.`` (encoder) and ``lm_head.`` (head), see ``ROBERTA_KEYS``.

XLM-R (model_type "xlm-roberta") has the same architecture and keys; ``RobertaConfig.model_type`` records
which of the two ``to_hf()`` exports to.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from promptdelta.backbones.bert import BertConfig, BertModel
from promptdelta.backbones.keymap import KeyTable, load_hf_state, load_into_hf
from promptdelta.errors import BackboneError, ConfigError

# model_type -> (transformers config class, base model class, masked-LM class), for to_hf()
_HF_CLASSES = {
    "roberta": ("RobertaConfig", "RobertaModel", "RobertaForMaskedLM"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", "XLMRobertaForMaskedLM"),
}


@dataclass
class RobertaConfig(BertConfig):
    """``BertConfig`` with roberta-base defaults; ``pad_token_id`` is required (positions start past it)."""

    vocab_size: int = 50265
    max_position_embeddings: int = 514       # 512 tokens + the pad slot + the unused slot 0
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    model_type: str = "roberta"              # or "xlm-roberta": same network, other HF classes on export

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ConfigError as e:  # BERT's checks name "BertConfig.<field>"; name this class instead
            raise ConfigError(str(e).replace("BertConfig.", "RobertaConfig.", 1)) from None
        pad = self.pad_token_id
        if pad is None or pad + 1 >= self.max_position_embeddings:
            raise ConfigError(f"RobertaConfig.pad_token_id={pad!r} is invalid: RoBERTa positions start at "
                              f"pad_token_id + 1 < max_position_embeddings={self.max_position_embeddings}. "
                              "Fix: set pad_token_id to the tokenizer's pad id (1 for RoBERTa).")
        if self.model_type not in _HF_CLASSES:
            raise ConfigError(f"RobertaConfig.model_type={self.model_type!r} is invalid. Fix: set model_type "
                              f"to one of {sorted(_HF_CLASSES)}.")

    @property
    def max_tokens(self) -> int:
        """Longest sequence the offset positions allow."""
        return self.max_position_embeddings - self.pad_token_id - 1

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> RobertaConfig:
        """A named preset (see ``ROBERTA_PRESETS``) with some fields replaced."""
        if name not in ROBERTA_PRESETS:
            raise ConfigError(f"unknown RoBERTa preset {name!r}. Fix: use one of {sorted(ROBERTA_PRESETS)}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown RobertaConfig field(s) {unknown}. Fix: use only {sorted(known)}.")
        return cls(**{**ROBERTA_PRESETS[name], **overrides})

    def to_hf(self) -> Any:
        """The equivalent ``transformers.RobertaConfig`` (or ``XLMRobertaConfig``)."""
        import transformers

        config_cls = getattr(transformers, _HF_CLASSES[self.model_type][0])
        bert = super().to_hf().to_dict()
        keep = {k: bert[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "intermediate_size", "max_position_embeddings", "type_vocab_size",
                                     "layer_norm_eps", "pad_token_id", "hidden_act", "hidden_dropout_prob",
                                     "attention_probs_dropout_prob")}
        return config_cls(**keep)


ROBERTA_PRESETS: dict[str, dict[str, Any]] = {
    "roberta-base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "roberta-large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
    "distilroberta-base": dict(hidden_size=768, num_layers=6, num_heads=12, intermediate_size=3072),
    "xlm-roberta-base": dict(vocab_size=250002, hidden_size=768, num_layers=12, num_heads=12,
                             intermediate_size=3072, model_type="xlm-roberta"),
}

ROBERTA_KEYS = KeyTable(
    family="roberta",
    prefixes=("roberta.",),  # RobertaForMaskedLM nests the encoder under "roberta."; its head is "lm_head."
    rules=(
        ("embeddings.word_embeddings", "embeddings.word_embeddings"),
        ("embeddings.position_embeddings", "embeddings.position_embeddings"),
        ("embeddings.token_type_embeddings", "embeddings.token_type_embeddings"),
        ("embeddings.LayerNorm", "embeddings.norm"),
        ("encoder.layer.{}.attention.self.query", "layers.{}.attn.q_proj"),
        ("encoder.layer.{}.attention.self.key", "layers.{}.attn.k_proj"),
        ("encoder.layer.{}.attention.self.value", "layers.{}.attn.v_proj"),
        ("encoder.layer.{}.attention.output.dense", "layers.{}.attn.o_proj"),
        ("encoder.layer.{}.attention.output.LayerNorm", "layers.{}.attn_norm"),
        ("encoder.layer.{}.attention.self", "layers.{}.attn"),   # no weights: a prefix delta's module name
        ("encoder.layer.{}.intermediate.dense", "layers.{}.mlp.fc1"),
        ("encoder.layer.{}.output.dense", "layers.{}.mlp.fc2"),
        ("encoder.layer.{}.output.LayerNorm", "layers.{}.mlp_norm"),
        ("encoder.layer.{}", "layers.{}"),   # the block itself (a ladder's targets), after everything inside it
        ("pooler.dense", "pooler.dense"),
        ("lm_head.dense", "lm_head.dense"),
        ("lm_head.layer_norm", "lm_head.norm"),
        ("lm_head.decoder", "lm_head.decoder"),
        ("lm_head.bias", "lm_head.decoder.bias"),  # HF ties lm_head.bias to lm_head.decoder.bias; files keep this
    ),
    ignore=(r"(^|\.)position_ids$", r"(^|\.)embeddings\.token_type_ids$"),  # buffers of older checkpoints
    tied={"lm_head.decoder.weight": "embeddings.word_embeddings.weight"},
)


def position_ids_from_input_ids(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """RoBERTa positions (B, T): ``pad + running count of non-pad tokens``, and ``pad`` at pad tokens."""
    real = input_ids.ne(pad_token_id).long()                # (B, T)
    return torch.cumsum(real, dim=1) * real + pad_token_id  # (B, T)


def position_ids_for_embeds(batch: int, length: int, pad_token_id: int, device: torch.device) -> torch.Tensor:
    """RoBERTa positions (B, T) for ``inputs_embeds``: ``pad + 1, ..., pad + T`` (pads cannot be told apart)."""
    return torch.arange(pad_token_id + 1, pad_token_id + 1 + length, device=device).expand(batch, length)


class RobertaLMHead(nn.Module):
    """MLM head: logits = decoder(LN(gelu(dense(x)))), exact GELU, decoder weight tied to the word embeddings."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))  # (B, T, H) -> (B, T, V)


class RobertaModel(BertModel):
    """Native RoBERTa encoder: BERT's layers with offset positions, an optional pooler and MLM head."""

    family = "roberta"
    kind = "mlm"

    def __init__(self, config: RobertaConfig):
        if not isinstance(config, RobertaConfig):
            raise ConfigError(f"RobertaModel needs a RobertaConfig, got {type(config).__name__}. Fix: build it "
                              "with RobertaConfig(...) or RobertaConfig.from_hf(hf_config).")
        super().__init__(dataclasses.replace(config, has_lm_head=False))  # BERT's head uses hidden_act; ours not
        self.config = config
        positions = self.embeddings.position_embeddings
        positions.padding_idx = config.pad_token_id  # as HF: the pad slot gets no gradient
        with torch.no_grad():
            positions.weight[config.pad_token_id].zero_()
        if config.has_lm_head:
            self.lm_head = RobertaLMHead(config)
            self.lm_head.apply(self._init_weights)
            self.lm_head.decoder.weight = self.embeddings.word_embeddings.weight

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
               token_type_ids: torch.Tensor | None, position_ids: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):  # BERT's _embed raises the right error
            return super()._embed(input_ids, inputs_embeds, token_type_ids, position_ids)
        B, T = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if T > self.config.max_tokens:
            raise BackboneError(f"sequence length {T} exceeds the {self.config.max_tokens} tokens RoBERTa's offset "
                                f"positions allow (max_position_embeddings={self.config.max_position_embeddings}"
                                f" - pad_token_id - 1). Fix: truncate the inputs to {self.config.max_tokens}.")
        _check_ids("position_ids", position_ids, self.config.max_position_embeddings, "pass positions in [0, "
                   f"{self.config.max_position_embeddings}) or leave position_ids=None")
        _check_ids("token_type_ids", token_type_ids, self.config.type_vocab_size, "pass all zeros or leave "
                   "token_type_ids=None (RoBERTa tokenizers give no segment ids)")
        if position_ids is None and input_ids is not None:
            position_ids = position_ids_from_input_ids(input_ids, self.config.pad_token_id)  # (B, T)
        elif position_ids is None:
            position_ids = position_ids_for_embeds(B, T, self.config.pad_token_id, inputs_embeds.device)  # (B, T)
        return super()._embed(input_ids, inputs_embeds, token_type_ids, position_ids)

    def to_hf(self) -> nn.Module:
        """Export to ``transformers`` (RobertaForMaskedLM with an MLM head, else RobertaModel), same weights."""
        import transformers
        from transformers.models.roberta.modeling_roberta import RobertaPooler as HFRobertaPooler

        _, base_name, mlm_name = _HF_CLASSES[self.config.model_type]
        hf_config = self.config.to_hf()
        if self.has_lm_head:
            hf = getattr(transformers, mlm_name)(hf_config)
            if self.pooler is not None:  # RobertaForMaskedLM drops the pooler; keep ours
                hf.roberta.pooler = HFRobertaPooler(hf_config)
        else:
            hf = getattr(transformers, base_name)(hf_config, add_pooling_layer=self.pooler is not None)
        load_into_hf(hf, self.state_dict(), ROBERTA_KEYS)
        return hf.to(self.embeddings.word_embeddings.weight.dtype).train(self.training)


def _check_ids(name: str, ids: torch.Tensor | None, size: int, fix: str) -> None:
    if ids is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise BackboneError(f"{name} holds values in [{int(ids.min())}, {int(ids.max())}] but only [0, {size - 1}] "
                            f"are valid for this model. Fix: {fix}.")


def roberta_from_hf(hf_config: Any, hf_state: Mapping[str, torch.Tensor]) -> RobertaModel:
    """Build a native RobertaModel from an HF config and state dict (pooler / MLM head as the weights say)."""
    keys = [ROBERTA_KEYS.strip_prefix(k) for k in hf_state]
    config = RobertaConfig.from_hf(hf_config, has_pooler=any(k.startswith("pooler.") for k in keys),
                                   has_lm_head=any(k.startswith("lm_head.") for k in keys))
    return load_hf_state(RobertaModel(config), hf_state, ROBERTA_KEYS)


# --------------------------------------------------------------------------------------------- registration
from promptdelta.backbones.bert import _bert_block_spec  # noqa: E402  (the same block as BERT)
from promptdelta.backbones.registry import STANDARD_TARGETS, Family, register_family, single_stack  # noqa: E402

register_family(Family(
    name="roberta", model_types=("roberta", "xlm-roberta"), from_hf=roberta_from_hf,
    key_table=lambda config: ROBERTA_KEYS, block_spec=_bert_block_spec, config_from_hf=RobertaConfig.from_hf,
    attention_stacks=lambda m: single_stack(m, m.config.num_heads, m.config.head_dim),
    layer_stacks=lambda m: [m.layers], default_targets=STANDARD_TARGETS))
