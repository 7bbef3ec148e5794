"""Native BERT (Devlin et al., 2019, "BERT: Pre-training of Deep Bidirectional Transformers").

Post-LN encoder layer:  x = LN(x + Attn(x));  x = LN(x + MLP(x)),  Attn through
``F.scaled_dot_product_attention``. In training, dropout (Srivastava et al., 2014) runs through promptdelta's
fused CPU op: the hidden dropouts are ``FastDropout`` modules and the attention-probability dropout runs inside
``kernels.attention_cpu.attention`` (torch's sdpa falls back to its math path with ``bernoulli_`` masks there);
``model.use_torch_dropout()`` switches both to torch's own dropout. ``prefix_kv`` prepends per-layer
keys/values (Li & Liang, 2021, prefix-tuning) that every query may attend to. HF weights load through ``BERT_KEYS`` (see keymap.py);
``to_hf()`` exports back to ``transformers``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from promptdelta.backbones.base import PACKED_ROWS, BackboneOutput, GradientCheckpointing, call_layer, check_prefix_kv
from promptdelta.backbones.bert_fast import Packing, _attention_bias, fused_qkv  # noqa: F401  (Packing: tests)
from promptdelta.backbones.keymap import KeyTable, load_hf_state, load_into_hf
from promptdelta.errors import BackboneError, ConfigError
from promptdelta.kernels.dropout import FastDropout

logger = logging.getLogger(__name__)

ACTIVATIONS = {
    "gelu": F.gelu,                                                   # exact erf form (original BERT)
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),        # tanh approximation (HF name)
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}

PrefixKV = Sequence[tuple[torch.Tensor, torch.Tensor] | None]


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_dropout_prob: float = 0.1
    has_pooler: bool = True      # BertModel checkpoints carry one; BertForMaskedLM ones do not
    has_lm_head: bool = False    # BertForMaskedLM / BertForPreTraining checkpoints carry the MLM head

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value,
                     "a positive int")
        _require(self.hidden_size % self.num_heads == 0, "num_heads", self.num_heads,
                 f"a divisor of hidden_size={self.hidden_size}")
        _require(self.layer_norm_eps > 0, "layer_norm_eps", self.layer_norm_eps, "a positive float")
        pad = self.pad_token_id
        _require(pad is None or (isinstance(pad, int) and 0 <= pad < self.vocab_size), "pad_token_id", pad,
                 f"None or an int in [0, vocab_size={self.vocab_size})")
        _require(self.hidden_act in ACTIVATIONS, "hidden_act", self.hidden_act, f"one of {sorted(ACTIVATIONS)}")
        for name in ("hidden_dropout_prob", "attention_dropout_prob"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and 0.0 <= value < 1.0, name, value, "a float in [0, 1)")
        for name in ("has_pooler", "has_lm_head"):
            _require(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> BertConfig:
        """A named preset (see ``BERT_PRESETS``) with some fields replaced."""
        if name not in BERT_PRESETS:
            raise ConfigError(f"unknown BERT preset {name!r}. Fix: use one of {sorted(BERT_PRESETS)}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown BertConfig field(s) {unknown}. Fix: use only {sorted(known)}.")
        return cls(**{**BERT_PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> BertConfig:
        """Convert a ``transformers.BertConfig``; ``overrides`` set fields HF does not carry (heads)."""
        if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
            raise BackboneError(f"position_embedding_type={hf_config.position_embedding_type!r} is not "
                                "supported by the native BERT. Fix: use a checkpoint with absolute positions.")
        if getattr(hf_config, "is_decoder", False) or getattr(hf_config, "add_cross_attention", False):
            raise BackboneError("decoder / cross-attention BERT configs are not supported by the native BERT. "
                                "Fix: use an encoder-only BERT checkpoint.")
        names = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                 "attention_dropout_prob": "attention_probs_dropout_prob"}
        fields = {f.name for f in dataclasses.fields(cls)} - {"has_pooler", "has_lm_head"}
        values = {f: getattr(hf_config, names.get(f, f)) for f in fields if hasattr(hf_config, names.get(f, f))}
        return cls(**{**values, **overrides})

    def to_hf(self) -> Any:
        """The equivalent ``transformers.BertConfig``."""
        import transformers

        return transformers.BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings, type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.layer_norm_eps, pad_token_id=self.pad_token_id, hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_dropout_prob)


def _require(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"BertConfig.{name}={value!r} is invalid. Fix: set {name} to {what}.")


BERT_PRESETS: dict[str, dict[str, Any]] = {
    # all-MiniLM-L6-v2 (the bundled default): a 6-layer distilled BERT, no MLM head.
    "minilm": dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536),
    "bert-tiny": dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512),
    "bert-mini": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
    "bert-base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
}

BERT_KEYS = KeyTable(
    family="bert",
    prefixes=("bert.",),  # BertForMaskedLM / BertForPreTraining nest the encoder under "bert."
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
        ("cls.predictions.transform.dense", "lm_head.dense"),
        ("cls.predictions.transform.LayerNorm", "lm_head.norm"),
        ("cls.predictions.decoder", "lm_head.decoder"),
        ("cls.predictions.bias", "lm_head.decoder.bias"),  # HF keeps the decoder bias under both names
    ),
    ignore=(r"(^|\.)position_ids$", r"^cls\.seq_relationship\."),  # a buffer; the NSP head we do not use
    tied={"lm_head.decoder.weight": "embeddings.word_embeddings.weight"},
)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = FastDropout(config.hidden_dropout_prob)

    def forward(self, inputs_embeds: torch.Tensor, token_type_ids: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        x = inputs_embeds + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))  # (B, T, H)


class BertAttention(nn.Module):
    """Multi-head self-attention. In training the probability dropout runs in ``kernels.attention_cpu.attention``
    (fused CPU dropout); ``torch_dropout = True`` (set by ``BertModel.use_torch_dropout``) keeps sdpa's own."""

    torch_dropout = False   # class default; an instance attribute overrides it

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_dropout_prob

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd) + bias) v with the probability dropout in training: q (n, nh, Tq, hd),
        k, v (n, nh, Tk, hd), bias additive (n, 1, 1, Tk) or None -> (n, nh, Tq, hd)."""
        p = self.dropout_p if self.training else 0.0
        if p > 0 and not self.torch_dropout and q.device.type == "cpu":  # torch's dropout is fast elsewhere
            from promptdelta.kernels.attention_cpu import attention  # lazy: the kernel builds on first use

            return attention(q, k, v, bias, self.head_dim ** -0.5, p, True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., H) -> [q | k | v] (..., 3H). One GEMM over the concatenated (3H, H) weight when q/k/v are
        plain linears or LoRA on one (see ``fused_qkv``); else the three modules, concatenated."""
        fused = fused_qkv(self, x)
        if fused is not None:
            return fused
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[q | k | v] (n, L, 3H) -> 3 x (n, nh, L, hd), views."""
        n, L, _ = qkv.shape
        return qkv.view(n, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None,
                rows: torch.Tensor | None = None, packed: Packing | None = None) -> torch.Tensor:
        """Self-attention over x (B, T, H); with ``rows`` (B, k) only those queries: (B, k, H). With ``packed``,
        x is (N, H), the real tokens only, and so is the output."""
        if packed is not None:
            return self._packed(x, bias, prefix, packed)
        B, T, H = x.shape
        if rows is None:
            q, k, v = self._split_heads(self.project_qkv(x))                 # 3 x (B, nh, T, hd)
            xq = x
        else:
            xq = _gather_rows(x, rows)                                        # (B, k, H)
            q, k, v = self._heads(self.q_proj(xq)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        k, v = _with_prefix(k, v, prefix)
        y = self._attend(q, k, v, bias)                                       # (B, nh, Tq, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, xq.shape[1], H))  # (B, Tq, H)

    def _packed(self, x: torch.Tensor, bias: torch.Tensor | None, prefix: tuple[torch.Tensor, torch.Tensor] | None,
                packed: Packing) -> torch.Tensor:
        """x (N, H) real tokens -> (N, H). Projections on the real tokens only; attention per group of
        consecutive rows of about the same length (``Packing.groups``), each padded only to its own longest
        row (a row's real tokens are contiguous in the packed order), or in the (B, T) layout when the batch
        has too many groups."""
        qkv = self.project_qkv(x)                                             # (N, 3H)
        if packed.groups is None:
            return self.o_proj(self._padded_attention(qkv, bias, prefix, packed))
        P = 0 if prefix is None else prefix[0].shape[2]
        outs = []
        for i, (g, part) in enumerate(zip(packed.groups, qkv.split(packed.sizes))):  # part (tokens, 3H)
            q, k, v = self._split_heads(g.grid(part))                          # 3 x (n, nh, L, hd)
            if prefix is not None:
                k, v = _with_prefix(k, v, (prefix[0][g.first:g.first + g.rows], prefix[1][g.first:g.first + g.rows]))
            y = self._attend(q, k, v, packed.group_bias(i, P, q.dtype))      # (n, nh, L, hd)
            y = y.transpose(1, 2).reshape(g.rows * g.length, x.shape[1])       # (n * L, H)
            outs.append(y if g.dest is None else y.index_select(0, g.dest))   # (tokens, H)
        return self.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))   # (N, H)

    def _padded_attention(self, qkv: torch.Tensor, bias: torch.Tensor | None,
                          prefix: tuple[torch.Tensor, torch.Tensor] | None, packed: Packing) -> torch.Tensor:
        """[q | k | v] (N, 3H) -> attention output (N, H), computed in the padded (B, T) layout."""
        q, k, v = self._split_heads(packed.unpack(qkv).view(packed.batch, packed.length, -1))  # 3 x (B, nh, T, hd)
        k, v = _with_prefix(k, v, prefix)
        y = self._attend(q, k, v, bias)                                       # (B, nh, T, hd)
        return packed.pack(y.transpose(1, 2).reshape(packed.batch, packed.length, -1))        # (N, H)


def _with_prefix(k: torch.Tensor, v: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend prefix keys/values (n, nh, P, hd) to k, v (n, nh, T, hd) -> (n, nh, P + T, hd)."""
    if prefix is None:
        return k, v
    return torch.cat([prefix[0].to(k.dtype), k], dim=2), torch.cat([prefix[1].to(v.dtype), v], dim=2)


class BertMLP(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, T, I) -> (B, T, H)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attn = BertAttention(config)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = BertMLP(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = FastDropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                rows: torch.Tensor | None = None, packed: Packing | None = None) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); with ``rows`` (B, k) only those positions come out: (B, k, H). With
        ``packed`` (padding in the batch) x is (N, H), the real tokens only, and so is the output."""
        if packed is not None and rows is None:  # x (N, H): the real tokens, packed by the model
            x = self.attn_norm(x + self.dropout(self.attn(x, bias, prefix, packed=packed)))
            return self.mlp_norm(x + self.dropout(self.mlp(x)))            # (N, H)
        a = self.attn(x, bias, prefix, rows)                               # (B, Tq, H)
        if rows is not None:  # the residual and everything after it are per-token: keep the kept rows only
            x = _gather_rows(x, rows)                                      # (B, k, H)
        x = self.attn_norm(x + self.dropout(a))                            # (B, Tq, H), post-LN
        return self.mlp_norm(x + self.dropout(self.mlp(x)))               # (B, Tq, H)


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))  # (B, H), from the first ([CLS]) token


class BertLMHead(nn.Module):
    """MLM head: logits = decoder(LN(act(dense(x)))), decoder weight tied to the word embeddings."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))  # (B, T, V)


_TOKEN_WISE = (nn.Linear, nn.LayerNorm, nn.Dropout, FastDropout, nn.Identity)


def _packable(layer: BertLayer) -> bool:
    """Whether the layer and every module inside it treat tokens independently, so they may see packed (N, H)
    rows: plain linears/norms/dropout, and wrappers whose class says ``token_wise = True`` (LoRA); no hooks.
    Anything else (a routed multi-adapter linear that needs the batch rows, a hook that reads shapes, on the
    layer too: the ladder's) gets (B, T, H)."""
    if layer._forward_hooks or layer._forward_pre_hooks:
        return False
    todo = list(layer.children())
    while todo:
        m = todo.pop()
        if m._forward_hooks or m._forward_pre_hooks:
            return False
        if type(m) in (BertAttention, BertMLP) or getattr(type(m), "token_wise", False):
            todo.extend(m.children())  # a token-wise wrapper may wrap a routed linear (route_rows): look inside
        elif type(m) not in _TOKEN_WISE:
            return False
    return True


def _gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, T, H) at the positions rows (B, k) -> (B, k, H)."""
    return x.gather(1, rows[:, :, None].expand(-1, -1, x.shape[-1]))


class BertModel(GradientCheckpointing, nn.Module):
    """Native BERT encoder with an optional pooler and an optional tied MLM head."""

    family = "bert"
    kind = "mlm"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))
        self.pooler = BertPooler(config) if config.has_pooler else None
        self.lm_head = BertLMHead(config) if config.has_lm_head else None
        self.apply(self._init_weights)
        if self.lm_head is not None:
            self.lm_head.decoder.weight = self.embeddings.word_embeddings.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)  # BERT's truncated-normal-like init
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])

    def input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def use_torch_dropout(self, flag: bool = True) -> BertModel:
        """Run torch's own dropout (``nn.Dropout`` modules, sdpa's probability dropout) instead of the fused
        CPU op (``FastDropout``, ``attention_cpu.attention``), or back with ``flag=False``: e.g. to draw the
        same masks as transformers under one torch seed. Same state_dict and ``p`` either way; a dropout module
        of another class that a user set is left alone (a plain ``nn.Dropout`` set by hand already runs torch's
        hidden dropout without this call)."""
        new, old = (nn.Dropout, FastDropout) if flag else (FastDropout, nn.Dropout)
        for owner in [self.embeddings, *self.layers]:
            if type(owner.dropout) is old:
                owner.dropout = new(owner.dropout.p, owner.dropout.inplace).train(owner.dropout.training)
        for layer in self.layers:
            layer.attn.torch_dropout = flag
        return self

    @property
    def has_lm_head(self) -> bool:
        return self.lm_head is not None

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, prefix_kv: PrefixKV | None = None,
                output_hidden_states: bool = False, keep_positions: torch.Tensor | None = None) -> BackboneOutput:
        """keep_positions (B, k): compute the last layer's queries, attention output, MLP and norms only at
        these token positions (its keys/values still cover every token): exact, and the outputs
        (last_hidden_state, the last hidden state, logits) hold those k rows: (B, k, H) / (B, k, V); no pooler
        output then. For readouts that read a few positions ([MASK], [CLS]), it saves most of the last layer."""
        x = self._embed(input_ids, inputs_embeds, token_type_ids, position_ids)  # (B, T, H)
        B, T, _ = x.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
            raise BackboneError(f"attention_mask has shape {tuple(attention_mask.shape)} but the input is "
                                f"{(B, T)}. Fix: pass a (batch, seq_len) mask with 1 = keep, 0 = pad.")
        _check_keep_positions(keep_positions, B, T)
        keep_positions = None if keep_positions is None else keep_positions.to(torch.long)  # gather wants int64
        prefixes = self._check_prefix(prefix_kv, B)
        hidden, biases, ckpt, last = [x], {}, self._checkpoint_layers(), len(self.layers) - 1
        packed = Packing.of(attention_mask)
        # no padding: no bias (attention skips the (n, nh, T, T) add; sdpa may take its unmasked kernel)
        key_mask = None if attention_mask is None or bool(attention_mask.bool().all()) else attention_mask
        for i, (layer, prefix) in enumerate(zip(self.layers, prefixes)):
            P = 0 if prefix is None else prefix[0].shape[2]
            if P not in biases:
                biases[P] = _attention_bias(key_mask, P, x.dtype)
            rows = keep_positions if i == last else None
            pack = packed if packed is not None and rows is None and _packable(layer) else None
            if pack is not None:  # x stays packed (N, H) from layer to layer while the layers allow it
                token = PACKED_ROWS.set(pack.row)
                try:
                    x = call_layer(layer, x if x.dim() == 2 else pack.pack(x), biases[P], prefix, None, pack,
                                   checkpoint=ckpt)                            # (N, H)
                finally:
                    PACKED_ROWS.reset(token)
            else:
                if x.dim() == 2:
                    x = packed.unpack(x).view(B, T, -1)                         # (B, T, H), zeros at padding
                x = call_layer(layer, x, biases[P], prefix, rows, checkpoint=ckpt)  # (B, T, H); (B, k, H)
                if packed is not None and rows is None:  # same padded outputs on either path
                    x = x.masked_fill(packed.pad[:, :, None], 0.0)
            hidden.append(x)
        if x.dim() == 2:
            x = packed.unpack(x).view(B, T, -1)                                 # (B, T, H), zeros at padding
        hidden[-1] = x
        if output_hidden_states:
            hidden = [packed.unpack(h).view(B, T, -1) if h.dim() == 2 else h for h in hidden]
        if packed is not None and keep_positions is not None:  # padded rows are zeros, as in the full forward
            x = hidden[-1] = x * attention_mask.gather(1, keep_positions)[:, :, None].to(x.dtype)  # (B, k, H)
        return BackboneOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            logits=self.lm_head(x) if self.lm_head is not None else None,
            pooler_output=self.pooler(x) if self.pooler is not None and keep_positions is None else None)

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
               token_type_ids: torch.Tensor | None, position_ids: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            got = "both" if input_ids is not None else "neither"
            raise BackboneError(f"got {got} of input_ids and inputs_embeds. Fix: pass exactly one of them.")
        if input_ids is not None:
            if input_ids.numel() and int(input_ids.max()) >= self.config.vocab_size:
                raise BackboneError(f"input_ids holds id {int(input_ids.max())} but the vocabulary has "
                                    f"{self.config.vocab_size} tokens. Fix: use the tokenizer of this checkpoint.")
            inputs_embeds = self.embeddings.word_embeddings(input_ids)  # (B, T, H)
        B, T, _ = inputs_embeds.shape
        if T > self.config.max_position_embeddings:
            raise BackboneError(f"sequence length {T} exceeds max_position_embeddings="
                                f"{self.config.max_position_embeddings}. Fix: truncate the inputs.")
        device = inputs_embeds.device
        if position_ids is None:
            position_ids = torch.arange(T, device=device).expand(B, T)  # (B, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros(B, T, dtype=torch.long, device=device)  # (B, T)
        return self.embeddings(inputs_embeds, token_type_ids, position_ids)

    def _check_prefix(self, prefix_kv: PrefixKV | None, batch: int) -> list:
        """Validate prefix_kv; a batch dimension of 1 is broadcast to the batch."""
        return check_prefix_kv(prefix_kv, len(self.layers), self.config.num_heads, self.config.head_dim, batch)

    def to_hf(self) -> nn.Module:
        """Export to ``transformers`` (BertForMaskedLM with an MLM head, else BertModel), same weights."""
        import transformers
        from transformers.models.bert.modeling_bert import BertPooler as HFBertPooler

        hf_config = self.config.to_hf()
        if self.has_lm_head:
            hf = transformers.BertForMaskedLM(hf_config)
            if self.pooler is not None:  # BertForMaskedLM drops the pooler; keep ours
                hf.bert.pooler = HFBertPooler(hf_config)
        else:
            hf = transformers.BertModel(hf_config, add_pooling_layer=self.pooler is not None)
        load_into_hf(hf, self.state_dict(), BERT_KEYS)
        return hf.to(self.embeddings.word_embeddings.weight.dtype).train(self.training)


def _check_keep_positions(keep: torch.Tensor | None, batch: int, length: int) -> None:
    if keep is None:
        return
    if not isinstance(keep, torch.Tensor) or keep.dim() != 2 or keep.shape[0] != batch or keep.shape[1] < 1 \
            or keep.dtype not in (torch.int64, torch.int32):
        what = f"shape {tuple(keep.shape)}, {keep.dtype}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise BackboneError(f"keep_positions is {what}. Fix: pass a LongTensor of shape (batch={batch}, k >= 1) "
                            "holding token positions, or None.")
    if int(keep.min()) < 0 or int(keep.max()) >= length:
        raise BackboneError(f"keep_positions holds positions in [{int(keep.min())}, {int(keep.max())}] but the "
                            f"input has {length} tokens. Fix: pass positions in [0, {length}).")


def bert_from_hf(hf_config: Any, hf_state: Mapping[str, torch.Tensor]) -> BertModel:
    """Build a native BertModel from an HF config and state dict (pooler / MLM head as the weights say)."""
    keys = [BERT_KEYS.strip_prefix(k) for k in hf_state]
    config = BertConfig.from_hf(hf_config, has_pooler=any(k.startswith("pooler.") for k in keys),
                                has_lm_head=any(k.startswith("cls.predictions.") for k in keys))
    return load_hf_state(BertModel(config), hf_state, BERT_KEYS)


# --------------------------------------------------------------------------------------------- registration
def _bert_block_spec(config: BertConfig) -> "BlockSpec":
    return BlockSpec(pre_norm=False, norm="layernorm", activation=config.hidden_act, gated=False,
                     positions="absolute", eps=config.layer_norm_eps)


from promptdelta.backbones.registry import STANDARD_TARGETS, BlockSpec, Family, register_family, single_stack  # noqa: E402

register_family(Family(
    name="bert", model_types=("bert",), from_hf=bert_from_hf, key_table=lambda config: BERT_KEYS,
    block_spec=_bert_block_spec, config_from_hf=BertConfig.from_hf,
    attention_stacks=lambda m: single_stack(m, m.config.num_heads, m.config.head_dim),
    layer_stacks=lambda m: [m.layers], default_targets=STANDARD_TARGETS))
