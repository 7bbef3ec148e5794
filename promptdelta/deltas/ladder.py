"""Ladder side tuning (Sung et al. 2022, "LST: Ladder Side-Tuning for Parameter and Memory Efficient
Transfer Learning").

The backbone runs without autograd; a narrow side network (width H / reduction) learns from its hidden
states through gated "ladder" connections, and its output is projected back to H and added to the backbone's
last hidden state, which the heads (pooler, LM head, the prompt model's verbalizer) then read:

    s_0 = down_0(h_0)                                   h_0: input of the first block, (B, T, H) -> (B, T, h)
    s_i = mu_i * down_i(h_i) + (1 - mu_i) * side_i(s_{i-1})     mu_i = sigmoid(alpha_i / T_gate), i = 1..L
    out = h_L + up(s_L)                                 up: (h -> H), zero-initialised

Because ``up`` starts at zero a fresh ladder leaves every output unchanged (the LST paper feeds the side
output to the head *instead* of h_L, which cannot leave outputs unchanged; adding a zero-initialised
projection keeps the delta contract). Since no gradient flows through the backbone, autograd stores
activations only for the side network and the head: that is where LST's memory saving comes from.

Initialisation by structural pruning (``init="pruned"``), with the largest squared weight norms kept:
* residual dims (h = H // r): score_j = sum over ladder blocks of the squared norms of the weight columns
  that read dim j (q, k, v, fc1) and the rows that write it (o, fc2); the same dims for every side block;
* heads (min(n_heads, h // head_dim_s)), and per kept head head_dim_s = head_dim // r dims: q/k dims by
  ||Wq row||^2 + ||Wk row||^2, v/o dims by ||Wv row||^2 + ||Wo column||^2, heads by the sum over their dims;
* FFN units (I // r): ||W1 row||^2 + ||W2 column||^2.
Side weights are the backbone weights sliced to the kept indices (LayerNorms too); ``down_i`` starts as the
selection of the kept residual dims, so the side network begins as a pruned copy of the backbone.

Works on the native BERT/RoBERTa/GPT-2 (T5 is refused) and on ``transformers`` BERT/RoBERTa models, whose
blocks are recognised through the family's key table. The side network keeps no KV cache, so cached
decoding (``past_key_values``) is refused. Deltas inside the backbone blocks (LoRA, prefix) get no gradient
while a ladder is attached. ``merge()`` is impossible (the side network is not a weight update).

``measure_training_memory`` (bottom) estimates one training step's memory; the delta benchmark reuses it.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from promptdelta.deltas.base import DeltaMethod, DeltaWrapper, ModuleSite, iter_sites, register_delta
from promptdelta.errors import ConfigError, DeltaError

logger = logging.getLogger(__name__)

ROLES = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "attn_norm", "mlp.fc1", "mlp.fc2", "mlp_norm")
_CANONICAL = re.compile(r"^layers\.(\d+)\.(" + "|".join(re.escape(r) for r in ROLES) + r")$")
_NATIVE = ("bert", "roberta", "gpt2")


@dataclass
class LadderConfig:
    """reduction: side width = H // reduction (also heads' dims and FFN units); targets: the transformer
    blocks that feed the ladder (None = all; the last block must be among them); gate_init: alpha_i at start
    (mu = sigmoid(alpha / gate_temperature), 0 -> 0.5); dropout: inside the side network; init: "pruned"
    (sliced backbone weights) or "random"; causal: side attention is causal (None = as the backbone)."""

    reduction: int = 8
    targets: list[str] | str | None = None
    gate_init: float = 0.0
    gate_temperature: float = 0.1
    dropout: float = 0.0
    init: str = "pruned"
    causal: bool | None = None

    def __post_init__(self) -> None:
        r = self.reduction
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError(f"ladder reduction={r!r} must be an integer >= 1; use e.g. reduction=8.")
        if isinstance(self.gate_temperature, bool) or not isinstance(self.gate_temperature, (int, float)) \
                or self.gate_temperature <= 0:
            raise ConfigError(f"ladder gate_temperature={self.gate_temperature!r} must be a positive number; "
                              f"use e.g. 0.1.")
        if isinstance(self.gate_init, bool) or not isinstance(self.gate_init, (int, float)):
            raise ConfigError(f"ladder gate_init={self.gate_init!r} must be a number; use e.g. 0.0.")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"ladder dropout={self.dropout!r} must be in [0, 1); use e.g. dropout=0.1.")
        if self.init not in ("pruned", "random"):
            raise ConfigError(f"ladder init={self.init!r} must be 'pruned' or 'random'.")
        if self.causal is not None and not isinstance(self.causal, bool):
            raise ConfigError(f"ladder causal={self.causal!r} must be True, False or None (as the backbone).")


# ------------------------------------------------------------------------------------------- backbone view
@dataclass
class _Block:
    """One backbone block feeding the ladder: its site and its modules by canonical role."""

    site: ModuleSite
    roles: dict[str, nn.Module]


@dataclass
class _Arch:
    blocks: list[_Block]
    num_heads: int
    pre_norm: bool          # GPT-2: x + f(LN(x)); BERT/RoBERTa: LN(x + f(x))
    causal: bool
    act: Callable[[torch.Tensor], torch.Tensor]


def _hf_table(model_type: str) -> Any:
    from promptdelta.backbones.bert import BERT_KEYS
    from promptdelta.backbones.roberta import ROBERTA_KEYS

    return {"bert": BERT_KEYS, "roberta": ROBERTA_KEYS, "xlm-roberta": ROBERTA_KEYS}.get(model_type)


def _family(model: nn.Module) -> tuple[str, Any]:
    """(family, HF key table or None for a native backbone); refuses what the ladder cannot run on."""
    family = getattr(model, "family", None)
    if getattr(model, "kind", None) == "seq2seq" or getattr(getattr(model, "config", None), "model_type", "") == "t5":
        raise DeltaError("the ladder side network supports encoder-only and decoder-only backbones, not "
                         "encoder-decoder (T5); use another delta (lora, adapter, prefix) for T5.")
    if isinstance(family, str) and hasattr(model, "input_embeddings"):
        if family not in _NATIVE:
            raise DeltaError(f"the ladder does not know the native family {family!r}; it supports {_NATIVE}.")
        return family, None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = _hf_table(model_type) if isinstance(model_type, str) else None
    if table is None:
        raise DeltaError(f"the ladder cannot find the transformer blocks of {type(model).__name__} "
                         f"(model_type {model_type!r}); convert it with promptdelta.load_backbone(model) first, "
                         f"or use a transformers BERT/RoBERTa.")
    return model_type, table


def _role_sites(model: nn.Module, table: Any) -> dict[int, dict[str, ModuleSite]]:
    """layer index -> role -> site, from canonical names (native) or the family's key table (HF)."""
    out: dict[int, dict[str, ModuleSite]] = {}
    for s in iter_sites(model):
        canonical = s.name if table is None else table.to_native(s.name)
        m = _CANONICAL.match(canonical or "")
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = s
    return out


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for comps in zip(*parts):
        if len(set(comps)) > 1:
            break
        prefix.append(comps[0])
    return ".".join(prefix)


def _find_blocks(model: nn.Module, table: Any) -> list[_Block]:
    """Every complete transformer block (all ROLES), in layer order; a block is the deepest module holding
    all of its layer's roles."""
    by_name = {s.name: s for s in iter_sites(model)}
    blocks = []
    for i, roles in sorted(_role_sites(model, table).items()):
        if len(roles) != len(ROLES):
            continue
        name = _common_prefix([s.name for s in roles.values()])
        if name in by_name:
            blocks.append(_Block(by_name[name], {r: s.module for r, s in roles.items()}))
    return blocks


_ACTS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _arch(model: nn.Module, blocks: list[_Block], causal: bool | None) -> _Arch:
    family, table = _family(model)
    cfg = model.config
    heads = getattr(cfg, "num_heads", None) or getattr(cfg, "num_attention_heads", None)
    act_name = getattr(cfg, "hidden_act", None) or getattr(cfg, "activation", None)
    if act_name not in _ACTS:
        logger.warning("ladder: activation %r unknown, the side network uses gelu", act_name)
    if causal is None:
        causal = getattr(model, "kind", None) == "clm" or bool(getattr(cfg, "is_decoder", False))
    return _Arch(blocks, int(heads), pre_norm=family == "gpt2", causal=causal, act=_ACTS.get(act_name, F.gelu))


# ------------------------------------------------------------------------------------------- side network
def side_attention_bias(attention_mask: torch.Tensor | None, T: int, causal: bool,
                        dtype: torch.dtype) -> torch.Tensor | None:
    """Additive SDPA mask: (B, 1, 1, T) for padding, (B, 1, T, T) with causality; None = no padding."""
    if attention_mask is None:
        return None
    keep = attention_mask.bool()[:, None, None, :]                                  # (B, 1, 1, T)
    if causal:
        keep = keep & torch.ones(T, T, dtype=torch.bool, device=keep.device).tril()  # (B, 1, T, T)
    zeros = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return zeros.masked_fill(~keep, torch.finfo(dtype).min)


class SideBlock(nn.Module):
    """A narrow transformer block: width h, n heads of qk_dim / v_dim, f FFN units; pre- or post-LN."""

    def __init__(self, h: int, heads: int, head_dim: int, f: int, pre_norm: bool, act: Callable,
                 eps: float, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.pre_norm, self.act = heads, head_dim, pre_norm, act
        inner = heads * head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(h, inner) for _ in range(3))
        self.o_proj = nn.Linear(inner, h)
        self.fc1, self.fc2 = nn.Linear(h, f), nn.Linear(f, h)
        self.attn_norm, self.mlp_norm = nn.LayerNorm(h, eps=eps), nn.LayerNorm(h, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def _attn(self, x: torch.Tensor, bias: torch.Tensor | None, causal: bool) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))                  # (B, n, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal and bias is None and T > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))                        # (B, T, h)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, causal: bool) -> torch.Tensor:
        mlp = lambda z: self.fc2(self.act(self.fc1(z)))  # noqa: E731
        if self.pre_norm:
            x = x + self.dropout(self._attn(self.attn_norm(x), bias, causal))
            return x + self.dropout(mlp(self.mlp_norm(x)))                             # (B, T, h)
        x = self.attn_norm(x + self.dropout(self._attn(x, bias, causal)))
        return self.mlp_norm(x + self.dropout(mlp(x)))                                 # (B, T, h)


class SideNetwork(nn.Module):
    """The ladder: down-projections of L + 1 backbone states, L side blocks, L gates, one up-projection."""

    def __init__(self, H: int, h: int, blocks: list[SideBlock], causal: bool, gate_init: float,
                 gate_temperature: float) -> None:
        super().__init__()
        self.causal, self.temperature = causal, gate_temperature
        self.down = nn.ModuleList(nn.Linear(H, h) for _ in range(len(blocks) + 1))
        self.blocks = nn.ModuleList(blocks)
        self.gates = nn.Parameter(torch.full((len(blocks),), float(gate_init)))  # alpha_i
        self.up = nn.Linear(h, H)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def states(self, hidden: Sequence[torch.Tensor], attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Side output s_L (B, T, h) from the backbone states h_0..h_L, each (B, T, H)."""
        dtype = self.up.weight.dtype
        bias = side_attention_bias(attention_mask, hidden[0].shape[1], self.causal, dtype)
        s = self.down[0](hidden[0].to(dtype))                                          # (B, T, h)
        for i, block in enumerate(self.blocks):
            mu = torch.sigmoid(self.gates[i] / self.temperature)
            s = mu * self.down[i + 1](hidden[i + 1].to(dtype)) + (1 - mu) * block(s, bias, self.causal)
        return s

    def forward(self, hidden: Sequence[torch.Tensor], attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.up(self.states(hidden, attention_mask))                             # (B, T, H)


# ------------------------------------------------------------------------------------------- pruning
def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in increasing index order."""
    return torch.topk(scores, k).indices.sort().values


def _w(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().float()


def _bias(module: nn.Module, n: int) -> torch.Tensor:
    b = getattr(module, "bias", None)
    return torch.zeros(n) if b is None else b.detach().float()


def _hidden_dims(arch: _Arch, h: int) -> torch.Tensor:
    score = 0
    for b in arch.blocks:
        r = b.roles
        reads = sum(_w(r[k]).square().sum(0) for k in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc1"))
        writes = sum(_w(r[k]).square().sum(1) for k in ("attn.o_proj", "mlp.fc2"))
        score = score + reads + writes                                                 # (H,)
    return _top(score, h)


def _head_rows(roles: dict[str, nn.Module], heads: int, keep_heads: int, hd_s: int) -> tuple[torch.Tensor, ...]:
    """Rows of q/k and of v (= columns of o) to keep: hd_s dims in each of the keep_heads best heads."""
    hd = _w(roles["attn.q_proj"]).shape[0] // heads
    qk = (_w(roles["attn.q_proj"]).square().sum(1) + _w(roles["attn.k_proj"]).square().sum(1)).view(heads, hd)
    vo = (_w(roles["attn.v_proj"]).square().sum(1) + _w(roles["attn.o_proj"]).square().sum(0)).view(heads, hd)
    kept = _top(qk.sum(1) + vo.sum(1), keep_heads)                                     # (keep_heads,)
    pick = lambda s: torch.cat([hh * hd + _top(s[hh], hd_s) for hh in kept.tolist()])  # noqa: E731
    return pick(qk), pick(vo)


def _copy_linear(dst: nn.Linear, w: torch.Tensor, b: torch.Tensor) -> None:
    with torch.no_grad():
        dst.weight.copy_(w)
        dst.bias.copy_(b)


def _prune_into(side: SideBlock, roles: dict[str, nn.Module], hid: torch.Tensor, heads: int,
                ffn: int) -> None:
    """Fill ``side`` with ``roles``' weights sliced to the kept dims/heads/units (see module doc)."""
    qk, vo = _head_rows(roles, heads, side.heads, side.head_dim)
    fc1, fc2 = _w(roles["mlp.fc1"]), _w(roles["mlp.fc2"])
    units = _top(fc1.square().sum(1) + fc2.square().sum(0), ffn)
    for name, rows in (("q_proj", qk), ("k_proj", qk), ("v_proj", vo)):
        src = roles[f"attn.{name}"]
        _copy_linear(getattr(side, name), _w(src)[rows][:, hid], _bias(src, _w(src).shape[0])[rows])
    o = roles["attn.o_proj"]
    _copy_linear(side.o_proj, _w(o)[hid][:, vo], _bias(o, _w(o).shape[0])[hid])
    _copy_linear(side.fc1, fc1[units][:, hid], _bias(roles["mlp.fc1"], fc1.shape[0])[units])
    _copy_linear(side.fc2, fc2[hid][:, units], _bias(roles["mlp.fc2"], fc2.shape[0])[hid])
    for name in ("attn_norm", "mlp_norm"):
        norm = roles[name]
        _copy_linear(getattr(side, name), _w(norm)[hid], _bias(norm, _w(norm).shape[0])[hid])


def build_side_network(arch: _Arch, config: LadderConfig) -> SideNetwork:
    """A side network for ``arch`` (pruned from its blocks, or random), on the backbone's device/dtype."""
    r0 = arch.blocks[0].roles
    H, I = _w(r0["attn.q_proj"]).shape[1], _w(r0["mlp.fc1"]).shape[0]
    red = config.reduction
    h, f = max(1, H // red), max(1, I // red)
    hd_s = max(1, _w(r0["attn.q_proj"]).shape[0] // arch.num_heads // red)
    n_s = min(arch.num_heads, max(1, h // hd_s))
    eps = getattr(r0["attn_norm"], "eps", 1e-5)
    blocks = [SideBlock(h, n_s, hd_s, f, arch.pre_norm, arch.act, eps, config.dropout) for _ in arch.blocks]
    if config.init == "random":
        for blk in blocks:
            for lin in (blk.q_proj, blk.k_proj, blk.v_proj, blk.o_proj, blk.fc1, blk.fc2):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
    side = SideNetwork(H, h, blocks, arch.causal, config.gate_init, config.gate_temperature)
    hid = _hidden_dims(arch, h)
    with torch.no_grad():
        for down in side.down:                       # selection of the kept residual dims
            down.weight.zero_()
            down.weight[torch.arange(h), hid] = 1.0
            down.bias.zero_()
    if config.init == "pruned":
        for blk, b in zip(blocks, arch.blocks):
            _prune_into(blk, b.roles, hid, arch.num_heads, f)
    w = r0["attn.q_proj"].weight
    return side.to(device=w.device, dtype=w.dtype)


# ------------------------------------------------------------------------------------------- runtime
def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _replace_first(out: Any, x: torch.Tensor) -> Any:
    return x if isinstance(out, torch.Tensor) else (x, *out[1:])


class _Run:
    """Per-forward state shared by the hooks and the wrapper: grad mode to restore, mask, recorded states."""

    def __init__(self) -> None:
        self.active, self.prev_grad, self.mask = False, None, None
        self.hidden: list[torch.Tensor] = []

    def begin(self, mask: torch.Tensor | None) -> None:
        self.active, self.mask, self.hidden = True, mask, []
        self.prev_grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)               # the backbone builds no autograd graph

    def restore_grad(self) -> None:
        if self.prev_grad is not None:
            torch.set_grad_enabled(self.prev_grad)
            self.prev_grad = None

    def end(self) -> None:
        self.restore_grad()
        self.active, self.mask, self.hidden = False, None, []


class LadderWrapper(DeltaWrapper):
    """Wraps the last ladder block: its output gets ``+ up(s_L)`` from the side network (``side``)."""

    def __init__(self, base: nn.Module, side: SideNetwork, run: _Run, n_blocks: int) -> None:
        super().__init__()
        self.base, self.side = base, side
        self.run, self.n_blocks = run, n_blocks
        self.enabled = True

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks (``attn``, ``mlp``...) are read from the wrapped block."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        if not self.enabled:
            return out
        run = self.run
        if not run.active or len(run.hidden) != self.n_blocks + 1:
            run.end()
            raise DeltaError("the ladder's last block ran outside a forward of the model it was attached to "
                             f"(got {len(run.hidden)} of {self.n_blocks + 1} states); call the model passed to "
                             "attach() (e.g. model(input_ids=...)), not one of its inner modules.")
        run.restore_grad()                          # side network and heads train; the backbone did not
        x = _first(out)                             # (B, T, H)
        return _replace_first(out, x + self.side(run.hidden, run.mask).to(x.dtype))


class Ladder(DeltaMethod):
    """Registered as "ladder": a side network fed by the chosen blocks; see the module docstring."""

    config_cls = LadderConfig
    wraps_modules = True

    def __init__(self, config: LadderConfig, name: str) -> None:
        super().__init__(config, name)
        self.run = _Run()
        self.wrapper: LadderWrapper | None = None
        self.site: ModuleSite | None = None
        self.hooks: list[Any] = []
        self.arch: _Arch | None = None
        self.model: nn.Module | None = None

    def select(self, model: nn.Module, sites: list[ModuleSite]) -> list[ModuleSite]:
        _, table = _family(model)
        blocks = _find_blocks(model, table)
        if not blocks:
            raise DeltaError(f"the ladder found no transformer block in {type(model).__name__}; it needs blocks "
                             f"with {ROLES} (native names or a transformers BERT/RoBERTa).")
        if self.config.targets is not None:
            chosen = {s.name for s in sites}
            unknown = sorted(chosen - {b.site.name for b in blocks})
            if unknown:
                raise DeltaError(f"ladder targets must name transformer blocks, but {unknown[:5]} are not blocks; "
                                 f"choose among {[b.site.name for b in blocks]} (or leave targets=None for all).")
            if blocks[-1].site.name not in chosen:
                raise DeltaError(f"ladder targets must include the last block {blocks[-1].site.name!r}, whose "
                                 f"output the side network corrects; add it to targets.")
            blocks = [b for b in blocks if b.site.name in chosen]
        self.arch = _arch(model, blocks, self.config.causal)
        self.model = model
        return [b.site for b in blocks]

    def apply(self, sites: list[ModuleSite]) -> None:
        arch, run = self.arch, self.run
        side = build_side_network(arch, self.config)
        last = sites[-1]
        self.wrapper = LadderWrapper(last.module, side, run, len(sites))
        self.wrapper.delta_name = self.name
        self.wrapper.train(last.module.training)
        setattr(last.parent, last.attr, self.wrapper)
        self.site = last
        self.hooks = [self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True),
                      self.model.register_forward_hook(lambda *a: run.end(), always_call=True),
                      sites[0].module.register_forward_pre_hook(self._first_pre, with_kwargs=True)]
        self.hooks += [s.module.register_forward_hook(self._record) for s in sites]

    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.wrapper is None or not self.wrapper.enabled:
            return
        if kwargs.get("past_key_values") is not None:
            raise DeltaError("the ladder side network keeps no KV cache, so cached decoding cannot run; call the "
                             "model without past_key_values (e.g. generate with use_cache=False).")
        self.run.begin(kwargs.get("attention_mask", args[1] if len(args) > 1 else None))

    def _first_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.run.active:
            self.run.hidden = [args[0] if args else kwargs["hidden_states"]]           # h_0 (B, T, H)

    def _record(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self.run.active:
            self.run.hidden.append(_first(out))                                         # h_i (B, T, H)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        if self.site is not None:
            setattr(self.site.parent, self.site.attr, self.site.module)
        self.hooks, self.wrapper, self.site, self.model = [], None, None, None

    def named_delta_parameters(self) -> list[tuple[str, nn.Parameter]]:
        if self.wrapper is None:
            return []
        return [(f"ladder.{k}", p) for k, p in self.wrapper.side.named_parameters()]

    def merge(self) -> None:
        raise DeltaError("a ladder side network cannot be merged into the backbone: it is a separate network, "
                         "not a weight update. Keep it attached for inference (save() / load_delta() to reuse it).")

    def unmerge(self) -> None:
        self.merged = False

    @contextmanager
    def disabled(self) -> Iterator[None]:
        self.wrapper.enabled = False
        try:
            yield
        finally:
            self.wrapper.enabled = True


register_delta("ladder", Ladder)


# ------------------------------------------------------------------------------------------- memory
@dataclass
class MemoryReport:
    """Bytes held during one training step. ``total`` adds them all: the worst case at the start of the
    backward pass, when parameters, optimizer state, saved activations and the first gradients coexist."""

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int                     # tensors autograd saved for backward (parameters excluded)
    device_peak: int | None = None       # CUDA only: torch.cuda.max_memory_allocated during the step

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations

    def as_dict(self) -> dict[str, int | None]:
        return {**asdict(self), "total": self.total}


def _storage_bytes(tensors: Iterator[torch.Tensor], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def measure_training_memory(model: nn.Module, loss_fn: Callable[[], torch.Tensor],
                            optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Run one real training step (``loss_fn()``, backward, ``optimizer.step()``; default AdamW over the
    parameters with requires_grad) and count the bytes it holds (see ``MemoryReport``).

    Activations are counted through ``torch.autograd.graph.saved_tensors_hooks`` (unique storages, parameter
    storages excluded), so the estimate is device independent; on CUDA ``device_peak`` adds the allocator's peak.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise DeltaError("measure_training_memory: the model has no parameter with requires_grad=True; attach a "
                         "delta or unfreeze parameters first.")
    opt = optimizer or torch.optim.AdamW(trainable, lr=1e-4)
    opt.zero_grad(set_to_none=True)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: set[int] = set(param_ptrs)
    activations = 0
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal activations
        activations += _storage_bytes(iter([t]), saved)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    grads = _storage_bytes((p.grad for p in model.parameters() if p.grad is not None), set())
    opt.step()
    state = (t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    report = MemoryReport(parameters=_storage_bytes(model.parameters(), set()), gradients=grads,
                          optimizer_state=_storage_bytes(state, set()), activations=activations,
                          device_peak=torch.cuda.max_memory_allocated() if cuda else None)
    opt.zero_grad(set_to_none=True)
    return report
