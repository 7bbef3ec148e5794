"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation") and deep
prompt tuning (Liu et al. 2022, "P-Tuning v2").

Every attention layer gets P learned key/value vectors that all queries attend to:

    Attn(q, K, V) = softmax(q [K_p; K]^T) [V_p; V]       K_p, V_p: (n_heads, P, head_dim) per layer

They reach the model through the native backbones' ``prefix_kv`` argument (a forward pre-hook fills it in),
or, on a live transformers model, through its own key/value cache (``prefix_hf.py``: decoder-only models,
the decoder of encoder-decoders, BERT-like encoders), so no base module is wrapped. The prefix parameters live in a child ``prefix_<name>`` of the backbone (a
``PrefixHolder``), so optimisers over ``model.parameters()``, ``model.to()`` and ``model.train()`` see them.
T5 has three kinds of attention and gets three prefix sets: ``encoder`` and ``decoder`` self-attention and
decoder ``cross`` attention.

Reparameterisation (Li & Liang, Sec. 4.3): during training each set is produced by an MLP from a small
embedding, [K_p; V_p] = W_2 tanh(W_1 E + b_1) + b_2 with E: (P, hidden), which trains more stably than the
raw prefixes. It is folded into plain prefixes for saving and inference: ``save()`` evaluates the MLP once and
writes only the resulting keys/values (with ``reparam=False`` in the config, so ``load_delta`` gives plain
prefixes and the same outputs; the attached delta keeps its MLP for more training); without autograd the
MLP's output is computed once and reused until its parameters change; ``merge()`` folds it for good (the
MLP is dropped, ``config.reparam`` becomes False, outputs are identical and ``unmerge()`` has nothing to undo).

Learning rate: about 1e-3 (AdamW) with the reparameterisation. In the core benchmark suite (all-MiniLM-L6-v2,
16-shot, 30 steps) 1e-3 was chosen on dev splits from 1e-4 to 5e-3; at 5e-3, 19 of 20 runs ended up
predicting (nearly) one class, although a fresh prefix moves the mask state by little (cosine 0.995 to the
base model's on SST-2 prompts).

A fresh prefix cannot leave the outputs unchanged (attending to extra keys always moves the softmax);
``handle.disabled()`` gives the base model's outputs. ``generate()`` of the backbones does not go through
``forward``: pass ``prefix_kv=prefix_kv(handle)`` to it. A ``prefix_kv`` the caller passes is kept, and the
learned prefixes are appended after it per layer (several prefix deltas stack in attach order).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from promptdelta.backbones.registry import AttentionStack, family_of
from promptdelta.deltas.base import (DeltaHandle, DeltaMethod, DeltaWrapper, ModuleSite, canonical_aliases, deltas_of,
                                     register_delta)
from promptdelta.deltas.prefix_hf import encoder_only, hf_stacks
from promptdelta.deltas.prefix_hf import inject as inject_hf
from promptdelta.errors import ConfigError, DeltaError

logger = logging.getLogger(__name__)

KV = tuple[torch.Tensor, torch.Tensor]   # (k, v), each (1, n_heads, P, head_dim)


@dataclass
class PrefixConfig:
    """num_tokens: P, prefix length per layer; reparam: produce the prefixes with an MLP while training;
    reparam_hidden: the MLP's hidden size; init_std: std of the plain prefixes / the MLP's input embedding;
    positions: how the tokens after the prefix are numbered, "from_zero" (0, 1, ...: native backbones and
    transformers encoders) or "after_prefix" (P, P + 1, ...: a transformers decoder's cache, as PEFT); None =
    the model's own. ``save()`` records the model's, so a prefix never loads where its tokens sit elsewhere."""

    num_tokens: int = 10
    reparam: bool = True
    reparam_hidden: int = 512
    init_std: float = 1.0
    positions: str | None = None

    def __post_init__(self) -> None:
        for key in ("num_tokens", "reparam_hidden"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"prefix {key}={value!r} must be an integer >= 1; use e.g. {key}=10.")
        if not isinstance(self.reparam, bool):
            raise ConfigError(f"prefix reparam={self.reparam!r} must be True or False.")
        if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float)) or \
                not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ConfigError(f"prefix init_std={self.init_std!r} must be a positive number; use e.g. 1.0.")
        if self.positions not in (None, *POSITIONS):
            raise ConfigError(f"prefix positions={self.positions!r} is not one of {POSITIONS}; leave it None for the "
                              f"model's own numbering.")


POSITIONS = ("from_zero", "after_prefix")   # token numbering after the prefix; see PrefixConfig.positions
_WORDS = {"from_zero": "0, 1, ...", "after_prefix": "P, P + 1, ... (after the prefix)"}
_KINDS = {"from_zero": "a native backbone from load_backbone, or a transformers encoder",
          "after_prefix": "a transformers decoder, whose cache holds the prefix"}
_Part = AttentionStack   # one prefix_kv entry: name ("layers" or a dict key), layers, heads, head_dim


class PrefixSet(nn.Module):
    """The prefixes of one part: plain ``keys``/``values`` (L, nh, P, hd), or the MLP that produces them."""

    _folded: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None   # (parameter stamp, (keys, values))

    def __init__(self, part: _Part, hidden: int, config: PrefixConfig, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.part, self.P = part, config.num_tokens
        shape = (part.layers, part.heads, self.P, part.head_dim)
        kw = dict(device=device, dtype=dtype)
        if config.reparam:
            self.embedding = nn.Parameter(torch.randn(self.P, hidden, **kw) * config.init_std)   # (P, H)
            out = 2 * part.layers * part.heads * part.head_dim
            self.mlp = nn.Sequential(nn.Linear(hidden, config.reparam_hidden, **kw), nn.Tanh(),
                                     nn.Linear(config.reparam_hidden, out, **kw))
        else:
            self.keys = nn.Parameter(torch.randn(shape, **kw) * config.init_std)     # (L, nh, P, hd)
            self.values = nn.Parameter(torch.randn(shape, **kw) * config.init_std)   # (L, nh, P, hd)

    @property
    def reparam(self) -> bool:
        return hasattr(self, "mlp")

    def key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each (L, nh, P, hd). Without autograd (inference) the MLP's output is kept and
        reused until one of its parameters changes (in place, ``.to()``, ``load_state_dict``)."""
        if not self.reparam:
            return self.keys, self.values
        if torch.is_grad_enabled():
            return self._from_mlp()
        stamp = tuple((p.data_ptr(), p.dtype, p._version) for p in self.parameters())
        if self._folded is None or self._folded[0] != stamp:
            self._folded = (stamp, self._from_mlp())
        return self._folded[1]

    def _from_mlp(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.part
        kv = self.mlp(self.embedding)                                         # (P, 2 * L * nh * hd)
        kv = kv.view(self.P, 2, p.layers, p.heads, p.head_dim).permute(1, 2, 3, 0, 4)   # (2, L, nh, P, hd)
        return kv[0], kv[1]

    @torch.no_grad()
    def plain(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain prefixes (keys, values) this set gives now, contiguous copies (L, nh, P, hd)."""
        k, v = self.key_values()
        return k.contiguous().clone(), v.contiguous().clone()

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by the plain prefixes it produces now (identical values)."""
        if not self.reparam:
            return
        k, v = self.plain()
        del self.mlp, self.embedding
        self._folded = None
        self.keys, self.values = nn.Parameter(k), nn.Parameter(v)

    def layer_pairs(self) -> list[KV]:
        k, v = self.key_values()
        return [(k[i][None], v[i][None]) for i in range(self.part.layers)]   # each (1, nh, P, hd)


class PrefixHolder(DeltaWrapper):
    """Holds a prefix delta's ``PrefixSet``s inside the backbone (as the child ``prefix_<name>``), so that
    ``model.parameters()`` (optimisers, the Trainer), ``model.to()`` and ``model.train()`` see them. Its
    ``base`` is an empty ``nn.Identity``: as a DeltaWrapper it is left out of canonical names and the
    model fingerprint. It is never called; the forward pre-hook reads the prefixes from it."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Identity()
        self.sets = nn.ModuleDict()


class _Owned:
    """Mixin marking a prefix_kv structure with the names of the prefix deltas already in it."""

    owners: frozenset[str] = frozenset()


class PrefixList(list, _Owned):
    """A one-stack ``prefix_kv`` (one (k, v) per layer) that knows which deltas it holds."""


class PrefixDict(dict, _Owned):
    """A multi-stack ``prefix_kv`` (T5: encoder, decoder, cross) that knows which deltas it holds."""


def _native(model: nn.Module) -> bool:
    """A native backbone of a registered family with a prefix_kv argument (else: a transformers model)."""
    return family_of(model) is not None and "prefix_kv" in inspect.signature(model.forward).parameters


def _parts(model: nn.Module) -> list[_Part]:
    """The model's attention stacks, one prefix set each: from its family record (backbones/registry.py) on
    a native backbone, from its config on a transformers model (prefix_hf.py; raises where it cannot)."""
    if _native(model):
        return family_of(model).attention_stacks(model)
    return hf_stacks(model, canonical_aliases(model))


def _numbering(model: nn.Module) -> str:
    """How ``model`` numbers the tokens after a prefix: native backbones and transformers encoders keep
    0..T-1; a transformers decoder's cache makes them P..P+T-1 (prefix_hf.py)."""
    return "from_zero" if _native(model) or encoder_only(model) else "after_prefix"


def _attention_sites(model: nn.Module, sites: list[ModuleSite]) -> list[ModuleSite]:
    """The attention modules that receive a prefix, in prefix_kv order (for the handle's record)."""
    wanted = [name for part in _parts(model) for name in part.modules]
    by_name = {s.name: s for s in sites}
    return [by_name[w] for w in wanted if w in by_name]


class PrefixTuning(DeltaMethod):
    """Registered as "prefix": learned per-layer key/value prefixes, fed in through ``prefix_kv``."""

    config_cls = PrefixConfig

    def __init__(self, config: PrefixConfig, name: str) -> None:
        super().__init__(config, name)
        self.holder = PrefixHolder()
        self._attr = "prefix_" + re.sub(r"\W", "_", name)   # the holder's attribute on the model
        self.enabled = True
        self._hook: Any = None
        self._arg_index = -1   # position of prefix_kv among forward's positional parameters

    def select(self, model: nn.Module, sites: list[ModuleSite]) -> list[ModuleSite]:
        _parts(model)   # refuses a model it cannot feed
        for other in deltas_of(model).values():
            if isinstance(other._method, PrefixTuning):
                logger.info("prefix %r joins prefix delta %r: their prefixes are concatenated", self.name, other.name)
        if hasattr(model, self._attr):
            raise DeltaError(f"{type(model).__name__} already has an attribute {self._attr!r}; attach the prefix "
                             f"under another name=... .")
        own, wanted = _numbering(model), getattr(self.config, "positions", None)   # subclasses' configs lack it
        if wanted is not None and wanted != own:   # a checkpoint from the other kind of model: other maths
            raise DeltaError(f"this prefix was trained with the tokens after it numbered {_WORDS[wanted]}, but "
                             f"{type(model).__name__} numbers them {_WORDS[own]}, so it would give other outputs; "
                             f"load it onto the kind of model it was trained on ({_KINDS[wanted]}), or train it "
                             f"again on this one.")
        self.model = model
        return _attention_sites(model, sites)

    def apply(self, sites: list[ModuleSite]) -> None:
        model = self.model
        ref = next(model.parameters())
        for part in _parts(model):
            self.sets[part.name] = PrefixSet(part, model.config.hidden_size, self.config, ref.device, ref.dtype)
        self.holder.delta_name = self.name
        self.holder.train(model.training)
        model.add_module(self._attr, self.holder)
        if not _native(model):   # a transformers model: through its own KV cache
            self._hook = model.register_forward_pre_hook(self._inject_cache, with_kwargs=True)
            return
        names = list(inspect.signature(model.forward).parameters)
        self._arg_index = names.index("prefix_kv")
        self._hook = model.register_forward_pre_hook(self._inject, with_kwargs=True)

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        if getattr(self.model, self._attr, None) is self.holder:
            delattr(self.model, self._attr)
        self._hook, self.holder = None, PrefixHolder()

    @property
    def sets(self) -> nn.ModuleDict:
        return self.holder.sets

    def named_delta_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"prefix.{part}.{k}", p) for part, s in self.sets.items() for k, p in s.named_parameters()]

    # ------------------------------------------------------------------------------------- prefix_kv
    def prefix_kv(self) -> PrefixList | PrefixDict:
        """This delta's prefix_kv in the backbone's format, batch dimension 1 (broadcast by the backbone)."""
        if "layers" in self.sets:
            out: PrefixList | PrefixDict = PrefixList(self.sets["layers"].layer_pairs())
        else:
            out = PrefixDict({part: s.layer_pairs() for part, s in self.sets.items()})
        out.owners = frozenset({self.name})
        return out

    def _inject(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook: put this delta's prefixes into ``prefix_kv`` (combined with a given one)."""
        if not self.enabled:
            return args, kwargs
        positional = len(args) > self._arg_index
        given = args[self._arg_index] if positional else kwargs.get("prefix_kv")
        if isinstance(given, _Owned) and self.name in given.owners:   # already in (e.g. generate's own calls)
            return args, kwargs
        new = self.prefix_kv() if given is None else _combine(self.prefix_kv(), given)
        if positional:
            args = args[:self._arg_index] + (new,) + args[self._arg_index + 1:]
        else:
            kwargs = {**kwargs, "prefix_kv": new}
        return args, kwargs

    def _inject_cache(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook on a transformers model: the prefixes go in as its KV cache (prefix_hf.py)."""
        if not self.enabled:
            return args, kwargs
        others = [h._method for h in deltas_of(module).values()
                  if isinstance(h._method, PrefixTuning) and h._method is not self]
        if others:
            raise DeltaError(f"prefix delta {self.name!r} shares {type(module).__name__} with prefix delta "
                             f"{others[0].name!r}; on a transformers model only one prefix can fill the cache. "
                             f"Detach one, or load the model with promptdelta.load_backbone(model).")
        return inject_hf(module, list(self.prefix_kv()), args, kwargs)   # prefix_kv: UniPELT's gates too

    # ------------------------------------------------------------------------------------- merge etc.
    def merge(self) -> None:
        """Fold each MLP into plain prefixes (idempotent; outputs unchanged; config.reparam becomes False)."""
        for s in self.sets.values():
            s.fold()
        if self.config.reparam:
            logger.info("prefix %r: folded the reparameterisation MLP into plain prefixes", self.name)
            self.config = dataclasses.replace(self.config, reparam=False)
        self.merged = True

    def unmerge(self) -> None:
        self.merged = False   # folding changes no output, so there is nothing to undo

    def export_state(self) -> tuple[PrefixConfig, dict[str, torch.Tensor]]:
        """Plain prefixes only (the MLP folded, without changing this delta): ``prefix.<part>.keys|values``,
        and the config with ``reparam=False``, so ``load_delta`` re-attaches plain prefixes."""
        tensors = {}
        for part, s in self.sets.items():
            tensors[f"prefix.{part}.keys"], tensors[f"prefix.{part}.values"] = s.plain()
        record = {"positions": _numbering(self.model)} if hasattr(self.config, "positions") else {}
        return dataclasses.replace(self.config, reparam=False, **record), tensors

    @contextmanager
    def disabled(self) -> Iterator[None]:
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


def _cat_pairs(ours: list, given: list) -> list:
    if len(ours) != len(given):
        raise DeltaError(f"the prefix_kv passed in has {len(given)} layer entries but the model has {len(ours)}; "
                         f"pass one (k, v) pair (or None) per layer.")
    out = []
    for a, b in zip(ours, given):
        if a is None or b is None:
            out.append(a if b is None else b)
            continue
        B = max(a[0].shape[0], b[0].shape[0])
        cat = [torch.cat([y.to(x.dtype).expand(B, -1, -1, -1), x.expand(B, -1, -1, -1)], dim=2)
               for x, y in zip(a, b)]   # (B, nh, P_given + P_ours, hd)
        out.append((cat[0], cat[1]))
    return out


def _combine(ours: PrefixList | PrefixDict, given: Any) -> PrefixList | PrefixDict:
    """Append this delta's prefixes after a given prefix_kv, per layer (and per part for T5)."""
    owners = ours.owners | getattr(given, "owners", frozenset())
    if isinstance(ours, PrefixDict):
        if not isinstance(given, dict):
            raise DeltaError(f"this model's prefix_kv must be a dict with keys among {list(ours)}, got "
                             f"{type(given).__name__}; pass a dict of per-layer (k, v) lists.")
        out: PrefixList | PrefixDict = PrefixDict({p: ours[p] if given.get(p) is None else _cat_pairs(ours[p], given[p])
                                                   for p in ours})
        out.update({p: v for p, v in given.items() if p not in ours})   # unknown parts: the backbone reports them
    else:
        out = PrefixList(_cat_pairs(list(ours), list(given)))
    out.owners = owners
    return out


def prefix_kv(handle: DeltaHandle) -> PrefixList | PrefixDict:
    """The prefix_kv of an attached prefix delta, to pass to ``generate(..., prefix_kv=...)`` (which does not
    run the forward hook). Passing it to ``forward`` as well is safe: the hook sees it is already there."""
    if not isinstance(handle._method, PrefixTuning):
        raise DeltaError(f"delta {handle.name!r} is a {handle.method!r} delta, not 'prefix'; pass the handle "
                         f"returned by attach(model, 'prefix').")
    handle._check_attached()
    return handle._method.prefix_kv()


register_delta("prefix", PrefixTuning)
