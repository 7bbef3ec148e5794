"""Ladder side tuning (Sung et al. 2022, "LST: Ladder Side-Tuning for Parameter and Memory Efficient
Transfer Learning").

The backbone runs without autograd; a narrow side network (width H / reduction, ``side.py``) learns from its
hidden states through gated "ladder" connections, and its output is projected back to H and added to the
backbone's last hidden state, which the heads (pooler, LM head, the prompt model's verbalizer) then read:

    s_0 = down_0(h_0)                                   h_0: input of the first block, (B, T, H) -> (B, T, h)
    s_i = mu_i * down_i(h_i) + (1 - mu_i) * side_i(s_{i-1})     mu_i = sigmoid(alpha_i / T_gate), i = 1..L
    out = h_L + up(s_L)                                 up: (h -> H), zero-initialised

Because ``up`` starts at zero a fresh ladder leaves every output unchanged (the LST paper feeds the side
output to the head *instead* of h_L, which cannot leave outputs unchanged; adding a zero-initialised
projection keeps the delta contract). Since no gradient flows through the backbone, autograd stores
activations only for the side network and the head: that is where LST's memory saving comes from.

T5 (encoder-decoder, as in the paper's main experiments) gets a ladder on each stack: a side encoder over
the encoder states (ending in a copy of the encoder's final norm, no ``up``) and a side decoder over the
decoder states whose blocks also cross-attend to the side encoder's output; ``up`` of the side decoder is
added to the last decoder block's output. Side attention of T5 is unscaled and adds the backbone's relative
position bias of the heads each side block kept.

Initialisation by structural pruning (``init="pruned"``), with the largest squared weight norms kept:
* residual dims (h = H // r): score_j = sum over ladder blocks of the squared norms of the weight columns
  that read dim j (q, k, v, fc1, gate) and the rows that write it (o, fc2); the same dims for every side block;
* heads (min(n_heads, h // head_dim_s)), and per kept head head_dim_s = head_dim // r dims: q/k dims by
  ||Wq row||^2 + ||Wk row||^2, v/o dims by ||Wv row||^2 + ||Wo column||^2, heads by the sum over their dims;
* FFN units (I // r): ||W1 row||^2 + ||W2 column||^2 (+ ||W_gate row||^2).
Side weights are the backbone weights sliced to the kept indices (norms too); ``down_i`` starts as the
selection of the kept residual dims, so the side network begins as a pruned copy of the backbone.

Works on the native BERT/RoBERTa/GPT-2/T5 and on ``transformers`` BERT/RoBERTa models, whose blocks are
recognised through their canonical names (``sites.canonical_aliases``), fused layers included (GPT-2's
Conv1D ``c_attn``, Phi-3's ``qkv_proj`` / ``gate_up_proj``: the pruning init reads (out, in) slices of them,
``_split_fused``), and transformers T5 (``T5ForConditionalGeneration``: side encoder and decoder;
``T5EncoderModel``: one bidirectional stack), whose relative position bias comes from the first block's
attention (transformers' ``compute_bias``) and whose block modules are the parents of the key table's
``block.i.layer`` lists (``_find_blocks``, ``_hf_extras``). The side network keeps no KV cache, so cached decoding
(``past_key_values``) is refused, and T5 needs its encoder to run in the same call (no ``encoder_outputs``).
Deltas inside the backbone blocks (LoRA, prefix) get no gradient while a ladder is attached. ``merge()`` is
impossible (the side network is not a weight update).

``measure_training_memory`` (bottom) measures one training step's memory; the delta benchmark reuses it.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from promptdelta.backbones.registry import BlockSpec, Family, LadderExtras, family_of, hf_family
from promptdelta.deltas.base import (DeltaMethod, DeltaWrapper, ModuleSite, canonical_aliases, iter_sites,
                                     register_delta, unwrap_sites, wrap_site)
from promptdelta.deltas.structure import infer_block_spec, is_linear
from promptdelta.deltas.side import (SideBlock, SideNetwork, SideSeq2Seq, SideSpec, hidden_dims, prune_into,
                                     random_init, select_dims, side_attention_bias, side_norm)
from promptdelta.errors import ConfigError, DeltaError

logger = logging.getLogger(__name__)

ROLES = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "attn_norm", "mlp.fc1", "mlp.fc2", "mlp_norm")
CROSS_ROLES = ("cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.o_proj", "cross_attn_norm")
_STACK = r"^(?:(encoder|decoder)\.)?layers\.(\d+)"
_ROLE = re.compile(_STACK + r"\.(" + "|".join(re.escape(r) for r in ROLES + CROSS_ROLES + ("mlp.gate",)) + r")$")
_BLOCK = re.compile(_STACK + "$")
_ACTS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "swish": F.silu}

__all__ = ["Ladder", "LadderConfig", "LadderWrapper", "SideNetwork", "SideSeq2Seq", "SideBlock",
           "side_attention_bias", "MemoryReport", "measure_training_memory"]


@dataclass
class LadderConfig:
    """reduction: side width = H // reduction (also heads' dims and FFN units); targets: the transformer
    blocks that feed the ladder (None = all; the last block, T5: the last decoder block and some encoder block,
    must be among them); gate_init: alpha_i at start (mu = sigmoid(alpha / gate_temperature), 0 -> 0.5);
    dropout: inside the side network; init: "pruned" (sliced backbone weights) or "random"; causal: side
    attention is causal (None = as the backbone; T5's stacks are fixed: bidirectional encoder, causal decoder)."""

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
    """The chosen blocks per stack ("" for encoder-only / decoder-only, "encoder" / "decoder" for T5), how a
    side block copies them, whether each stack is causal, and T5's position bias per stack (T -> (1, n, T, T))."""

    stacks: dict[str, list[_Block]]
    num_heads: int
    spec: SideSpec
    causal: dict[str, bool]
    position_bias: dict[str, Callable[[int], torch.Tensor]] = field(default_factory=dict)
    final_norm: nn.Module | None = None     # T5: the encoder's final norm, copied after the side encoder

    @property
    def blocks(self) -> list[_Block]:
        return [b for blocks in self.stacks.values() for b in blocks]


def _family(model: nn.Module) -> tuple[Family | None, BlockSpec]:
    """The model's family record (None for a transformers model of no registered family) and block spec
    (backbones/registry.py; else read from the model, ``structure.infer_block_spec``); refuses what the
    ladder cannot run on (a transformers encoder-decoder or relative-position model needs the native
    model's position bias: T5)."""
    family = family_of(model)
    if family is not None:
        return family, family.block_spec(model.config)
    family = hf_family(model)
    spec = family.hf_block_spec(model.config) if family is not None and family.config_from_hf else None
    one_stack = family is None or family.stack_names == ("",)
    if spec is None and one_stack:
        family, spec = None, infer_block_spec(model)
    if spec is None or (one_stack and spec.positions == "relative"):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise DeltaError(f"the ladder cannot read the block layout of {type(model).__name__} (model_type "
                         f"{model_type!r}); convert it with promptdelta.load_backbone(model) first, or register a "
                         f"family for it (docs/guide/families.md).")
    return family, spec


def _find_blocks(model: nn.Module) -> dict[str, list[_Block]]:
    """Every complete transformer block per stack (a module standing for ``[stack.]layers.{i}`` that holds all
    ROLES, and CROSS_ROLES in a T5 decoder), in layer order, read through the canonical names."""
    aliases = canonical_aliases(model)
    roles: dict[tuple[str, int], dict[str, nn.Module]] = {}
    sites: dict[tuple[str, int], ModuleSite] = {}
    by_name = {s.name: s for s in iter_sites(model)}
    for s in by_name.values():
        for canonical in aliases.get(s.name, ()):
            m, b = _ROLE.match(canonical), _BLOCK.match(canonical)
            if m:
                roles.setdefault((m.group(1) or "", int(m.group(2))), {})[m.group(3)] = s.module
            elif b:   # a ModuleList never runs (transformers T5's ``block.i.layer``): hook the block holding it
                sites[(b.group(1) or "", int(b.group(2)))] = by_name.get(s.name.rpartition(".")[0], s) \
                    if isinstance(s.module, nn.ModuleList) else s
    stacks: dict[str, list[_Block]] = {}
    for (stack, i), r in sorted(roles.items(), key=lambda kv: (kv[0][0] != "encoder", kv[0])):
        need = ROLES + (CROSS_ROLES if stack == "decoder" else ())
        if all(k in r for k in need) and (stack, i) in sites:
            stacks.setdefault(stack, []).append(_Block(sites[stack, i], r))
    return stacks


def _arch(model: nn.Module, stacks: dict[str, list[_Block]], causal: bool | None) -> _Arch:
    family, block = _family(model)
    cfg = model.config
    heads = int(getattr(cfg, "num_heads", None) or getattr(cfg, "num_attention_heads"))
    if block.activation not in _ACTS:
        logger.warning("ladder: activation %r unknown, the side network uses gelu", block.activation)
    spec = SideSpec(pre_norm=block.pre_norm, act=_ACTS.get(block.activation, F.gelu), rms=block.norm == "rmsnorm",
                    gated=block.gated, attn_scale=block.attn_scale, eps=block.eps, bias=block.bias)
    if family is not None and family.stack_names != ("",):   # encoder-decoder: the stacks fix causality (bidirectional, then causal)
        if causal is not None:
            raise DeltaError(f"ladder causal={causal!r} does not apply to {type(model).__name__}: its side encoder "
                             f"is bidirectional and its side decoder causal, as the backbone's stacks; leave "
                             f"causal=None.")
        extras = family.ladder_extras(model) if family_of(model) is not None else _hf_extras(model, stacks)
        causal_of = {"encoder": False, "decoder": True}
        if set(stacks) == {"encoder"}:   # an encoder alone (T5EncoderModel): one bidirectional stack, + up(s_L)
            return _Arch({"": stacks["encoder"]}, heads, spec, {"": False},
                         {"": extras.position_bias["encoder"]})
        return _Arch(stacks, heads, spec, causal_of, dict(extras.position_bias), extras.encoder_final_norm)
    if causal is None:
        causal = getattr(model, "kind", None) == "clm" or bool(getattr(cfg, "is_decoder", False)) or _generates(model)
    return _Arch(stacks, heads, spec, {"": causal})


def _hf_extras(model: nn.Module, stacks: dict[str, list[_Block]]) -> LadderExtras:
    """A live transformers relative-position model's ladder extras, read from its modules: per stack the bias
    of its first block's attention (transformers' ``compute_bias(T, T)`` -> (1, n, T, T), shared by every
    block) and the module named ``encoder.final_norm`` by the family's key table."""
    natives = {a: name for name, names in canonical_aliases(model).items() for a in names}
    bias = {}
    for stack in stacks:
        attn = [model.get_submodule(natives[f"{stack}.layers.{i}.attn"]) if f"{stack}.layers.{i}.attn" in natives
                else None for i in range(len(stacks[stack]))]
        own = [a for a in attn[1:] if getattr(a, "has_relative_attention_bias", False)]
        if not callable(getattr(attn[0], "compute_bias", None)) or own:
            raise DeltaError(f"the ladder cannot read the relative position bias of {type(model).__name__} "
                             f"({'one per layer' if own else 'no compute_bias on its first attention'}); convert "
                             f"it with promptdelta.load_backbone(model) first, or use the 'adapter' or 'lora' delta.")
        bias[stack] = (lambda a: lambda T: a.compute_bias(T, T, device=a.relative_attention_bias.weight.device))(attn[0])
    norm = model.get_submodule(natives["encoder.final_norm"]) if "encoder.final_norm" in natives else None
    if "decoder" in stacks and norm is None:
        raise DeltaError(f"the ladder found no encoder final norm in {type(model).__name__} (the side decoder reads "
                         f"the side encoder through a copy of it); convert it with promptdelta.load_backbone(model).")
    return LadderExtras(bias, norm)


def _generates(model: nn.Module) -> bool:
    """A decoder-only transformers model (it generates and has no encoder): causal attention."""
    can = getattr(model, "can_generate", None)
    return callable(can) and bool(can()) and not getattr(model.config, "is_encoder_decoder", False)


class _View:
    """One projection's weight (out, in) and bias, sliced out of a fused or Conv1D layer: all that the pruning
    init reads (``side.prune_into``); the backbone's modules stay as they are."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias


def _split_fused(b: _Block, cfg: Any, heads: int) -> dict[str, Any]:
    """``b.roles`` with every projection as (out, in) weights: Conv1D transposed (GPT-2), a fused q/k/v layer cut
    into q (heads * hd rows), k and v (kv_heads * hd rows each; GPT-2: thirds, Phi-3: grouped-query), a fused
    k/v layer into halves, a fused gate/up layer (Phi-3: ``gate, up = chunk(2)``) into gate then fc1."""
    roles: dict[str, Any] = dict(b.roles)
    for role, m in b.roles.items():
        if not role.endswith("norm") and not isinstance(m, nn.Linear):
            if not is_linear(m):
                raise DeltaError(f"the ladder prunes its side network from linear layers, but {role} of block "
                                 f"{b.site.name!r} is a {type(m).__name__}; use the 'adapter' or 'lora' delta.")
            roles[role] = _View(m.weight.t(), m.bias)     # Conv1D weight (in, out) -> (out, in)

    def cut(names: list[str], sizes: list[int]) -> None:
        m = roles[names[0]]
        if sum(sizes) != m.weight.shape[0]:
            raise DeltaError(f"the ladder cannot split the fused layer {names} of block {b.site.name!r}: "
                             f"{m.weight.shape[0]} output rows, expected {sizes}; use the 'adapter' or 'lora' delta.")
        ws = m.weight.split(sizes, 0)
        bs = m.bias.split(sizes, 0) if m.bias is not None else [None] * len(sizes)
        for n, w, bias in zip(names, ws, bs):
            roles[n] = _View(w, bias)

    for g in ("attn", "cross_attn"):
        if f"{g}.q_proj" not in roles:
            continue
        q, k, v = (b.roles[f"{g}.{p}_proj"] for p in "qkv")
        H = roles[f"{g}.o_proj"].weight.shape[0]
        hd = getattr(cfg, "head_dim", None) or H // heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        if q is k:
            cut([f"{g}.q_proj", f"{g}.k_proj", f"{g}.v_proj"], [heads * hd, kv * hd, kv * hd])
        elif k is v:
            cut([f"{g}.k_proj", f"{g}.v_proj"], [roles[f"{g}.k_proj"].weight.shape[0] // 2] * 2)
    if b.roles.get("mlp.gate") is b.roles["mlp.fc1"]:
        cut(["mlp.gate", "mlp.fc1"], [roles["mlp.fc1"].weight.shape[0] // 2] * 2)
    return roles


def _choose(stacks: dict[str, list[_Block]], sites: list[ModuleSite]) -> dict[str, list[_Block]]:
    """Keep the blocks named by the targets; the last block (T5: of the decoder) and, for T5, some encoder
    block must be among them."""
    every = [b.site.name for blocks in stacks.values() for b in blocks]
    chosen = {s.name for s in sites}
    unknown = sorted(chosen - set(every))
    if unknown:
        raise DeltaError(f"ladder targets must name transformer blocks, but {unknown[:5]} are not blocks; "
                         f"choose among {every} (or leave targets=None for all).")
    if every[-1] not in chosen:
        raise DeltaError(f"ladder targets must include the last block {every[-1]!r}, whose output the side "
                         f"network corrects; add it to targets.")
    kept = {k: [b for b in blocks if b.site.name in chosen] for k, blocks in stacks.items()}
    if "encoder" in kept and not kept["encoder"]:
        raise DeltaError(f"ladder targets on T5 must include encoder blocks too (the side decoder attends to the "
                         f"side encoder); add some of {[b.site.name for b in stacks['encoder']]}.")
    return kept


def build_side_network(arch: _Arch, config: LadderConfig) -> nn.Module:
    """The side network for ``arch`` (pruned from its blocks, or random), on the backbone's device/dtype:
    a ``SideNetwork``, or for T5 a ``SideSeq2Seq`` of a side encoder and a side decoder."""
    r0 = arch.blocks[0].roles
    H, I = r0["attn.q_proj"].weight.shape[1], r0["mlp.fc1"].weight.shape[0]
    red = config.reduction
    h, f = max(1, H // red), max(1, I // red)
    hd_s = max(1, r0["attn.q_proj"].weight.shape[0] // arch.num_heads // red)
    n_s = min(arch.num_heads, max(1, h // hd_s))
    hid = hidden_dims([b.roles for b in arch.blocks], h)
    sides = {}
    for stack, blocks in arch.stacks.items():
        side_blocks = [SideBlock(h, n_s, hd_s, f, arch.spec, config.dropout, cross=stack == "decoder")
                       for _ in blocks]
        for blk, b in zip(side_blocks, blocks):
            prune_into(blk, b.roles, hid, arch.num_heads) if config.init == "pruned" else random_init(blk)
        final_norm = None
        if stack == "encoder":   # a pruned copy of the encoder's final norm (RMSNorm: weight only)
            final_norm = side_norm(h, arch.spec)
            with torch.no_grad():
                final_norm.weight.copy_(arch.final_norm.weight.detach().float()[hid])
        sides[stack] = SideNetwork(H, h, side_blocks, arch.causal[stack], config.gate_init, config.gate_temperature,
                                   final_norm)
        select_dims(sides[stack], hid)
    side = sides[""] if "" in sides else SideSeq2Seq(sides["encoder"], sides["decoder"])
    w = r0["attn.q_proj"].weight
    return side.to(device=w.device, dtype=w.dtype)


# ------------------------------------------------------------------------------------------- runtime
def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _replace_first(out: Any, x: torch.Tensor) -> Any:
    return x if isinstance(out, torch.Tensor) else (x, *out[1:])


class _Run:
    """Per-forward state shared by the hooks and the wrapper: grad mode to restore, masks and recorded states
    per stack."""

    def __init__(self) -> None:
        self.active, self.prev_grad = False, None
        self.masks: dict[str, torch.Tensor | None] = {}
        self.hidden: dict[str, list[torch.Tensor]] = {}

    def begin(self, masks: dict[str, torch.Tensor | None]) -> None:
        self.active, self.masks, self.hidden = True, masks, {}
        self.prev_grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)               # the backbone builds no autograd graph

    def restore_grad(self) -> None:
        if self.prev_grad is not None:
            torch.set_grad_enabled(self.prev_grad)
            self.prev_grad = None

    def end(self) -> None:
        self.restore_grad()
        self.active, self.masks, self.hidden = False, {}, {}


class LadderWrapper(DeltaWrapper):
    """Wraps the last ladder block: its output gets ``+ up(s_L)`` from the side network (``side``)."""

    def __init__(self, base: nn.Module, side: nn.Module, run: _Run, n_blocks: dict[str, int],
                 position_bias: dict[str, Callable[[int], torch.Tensor]]) -> None:
        super().__init__()
        self.base, self.side = base, side
        self.run, self.n_blocks, self.position_bias = run, n_blocks, position_bias

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        if not self.enabled:
            return out
        run = self.run
        got = {k: len(run.hidden.get(k, ())) for k in self.n_blocks}
        if not run.active or any(got[k] != n + 1 for k, n in self.n_blocks.items()):
            run.end()
            raise DeltaError("the ladder's last block ran outside a forward of the model it was attached to "
                             f"(states recorded {got}, expected {self.n_blocks} + 1 per stack); call the model "
                             "passed to attach() (e.g. model(input_ids=...)), not one of its inner modules.")
        pos = {k: fn(run.hidden[k][0].shape[1]) for k, fn in self.position_bias.items()}   # still without grad
        run.restore_grad()                          # side network and heads train; the backbone did not
        x = _first(out)                             # (B, T, H)
        if isinstance(self.side, SideSeq2Seq):
            y = self.side(run.hidden, run.masks, pos)
        else:
            y = self.side(run.hidden[""], run.masks[""])
        return _replace_first(out, x + y.to(x.dtype))


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
        _family(model)
        stacks = _find_blocks(model)
        if not stacks:
            raise DeltaError(f"the ladder found no transformer block in {type(model).__name__}; it needs blocks "
                             f"with {ROLES} (native names, or a transformers model of a registered family).")
        if self.config.targets is not None:
            stacks = _choose(stacks, sites)
        self.arch = _arch(model, stacks, self.config.causal)
        for b in self.arch.blocks:   # pruning reads separate (out, in) weights: unfuse views of GPT-2 / Phi-3 layers
            b.roles = _split_fused(b, model.config, self.arch.num_heads)
        self.model = model
        return [b.site for b in self.arch.blocks]

    def apply(self, sites: list[ModuleSite]) -> None:
        arch, run = self.arch, self.run
        side = build_side_network(arch, self.config)
        last = sites[-1]
        n_blocks = {k: len(v) for k, v in arch.stacks.items()}
        self.wrapper = wrap_site(last, LadderWrapper(last.module, side, run, n_blocks, arch.position_bias), self.name)
        self.site = last
        self.hooks = [self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True),
                      self.model.register_forward_hook(lambda *a: run.end(), always_call=True)]
        for stack, blocks in arch.stacks.items():
            first = blocks[0].site.module
            self.hooks.append(first.register_forward_pre_hook(self._first_pre(stack), with_kwargs=True))
            self.hooks += [b.site.module.register_forward_hook(self._record(stack)) for b in blocks]

    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.wrapper is None or not self.wrapper.enabled:
            return
        if kwargs.get("past_key_values") is not None:
            raise DeltaError("the ladder side network keeps no KV cache, so cached decoding cannot run; call the "
                             "model without past_key_values (e.g. generate with use_cache=False).")
        if kwargs.get("encoder_outputs") is not None:
            raise DeltaError("the ladder's side encoder reads the encoder's states, so the encoder must run in "
                             "the same call; call the model with input_ids / inputs_embeds, not encoder_outputs.")
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.run.begin({"": mask, "encoder": mask, "decoder": kwargs.get("decoder_attention_mask")})

    def _first_pre(self, stack: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.run.active:
                self.run.hidden[stack] = [args[0] if args else kwargs["hidden_states"]]   # h_0 (B, T, H)
        return hook

    def _record(self, stack: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if self.run.active:
                self.run.hidden.setdefault(stack, []).append(_first(out))             # h_i (B, T, H)
        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        if self.site is not None:
            unwrap_sites([(self.site, self.wrapper)])
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
