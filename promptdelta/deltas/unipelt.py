"""UniPELT: LoRA, adapter and prefix tuning as one method, each behind a learned gate (Mao et al. 2022,
"UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning").

    LoRA    (q, v projections)   y = W x + g_L(x) (alpha/r) B A x,        g_L(x) = sigmoid(w_L . x + c_L)
    adapter (after the FFN out)  y = h + g_A(h) A(h),  h = W x + b,       g_A(h) = sigmoid(w_A . h + c_A)
    prefix  (every attention)    values of the prefix scaled by g_P = sigmoid(a_l), one gate per layer

The gates let the model weigh (or switch off) each submodule per input. Departure from the paper: its
prefix gate is computed from the layer input, g_P(x); here the prefix reaches attention through the native
backbones' ``prefix_kv`` (as the "prefix" delta does), which sees no hidden state, so g_P is a learned
scalar per layer that scales the prefix's values (a closed prefix gate still takes a little attention mass,
since its keys stay). On a transformers model the gated prefix goes in through the model's own cache
(prefix_hf.py; models without one refuse it by name); with ``num_tokens=0`` there is no prefix (LoRA + adapter). LoRA's B and the adapter's up-projection start at zero, so a fresh UniPELT
without prefix leaves the outputs unchanged. The gated parts depend on the input, so UniPELT cannot merge.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import torch
from torch import nn

from promptdelta.deltas.adapter import Bottleneck
from promptdelta.deltas.base import (DeltaWrapper, ModuleSite, canonical_namer, match_targets, register_delta,
                                     unwrap_sites, wrap_site)
from promptdelta.deltas.prefix import POSITIONS, PrefixDict, PrefixList, PrefixTuning
from promptdelta.errors import ConfigError, DeltaError


@dataclass
class UniPELTConfig:
    """lora_targets / adapter_targets: linear layers (native names); r, alpha: LoRA's; bottleneck: the
    adapter's; num_tokens: prefix length (0 = no prefix); reparam, reparam_hidden, init_std, positions: as for
    "prefix" (``save()`` records how the model numbers the tokens after the prefix); order: the wrapped layers
    sorted by "canonical" names (the same on a transformers model and its native backbone) or by the model's own
    "module" names (how folders saved before 2026-12-07 list them)."""

    lora_targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    adapter_targets: list[str] | str = field(default_factory=lambda: ["mlp.fc2"])
    r: int = 8
    alpha: float = 16
    bottleneck: int = 48
    num_tokens: int = 10
    reparam: bool = False
    reparam_hidden: int = 512
    init_std: float = 1.0
    positions: str | None = None
    order: str = "canonical"
    # a delta.json without `order` was saved before 2026-12-07, when the layers were sorted by the model's names
    SAVED_WITHOUT: ClassVar[dict[str, str]] = {"order": "module"}

    def __post_init__(self) -> None:
        for key in ("r", "bottleneck", "reparam_hidden"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"unipelt {key}={v!r} must be an integer >= 1")
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or self.num_tokens < 0:
            raise ConfigError(f"unipelt num_tokens={self.num_tokens!r} must be an integer >= 0 (0: no prefix)")
        if self.positions not in (None, *POSITIONS):
            raise ConfigError(f"unipelt positions={self.positions!r} is not one of {POSITIONS}; leave it None for the "
                              f"model's own numbering.")
        if self.order not in ORDERS:
            raise ConfigError(f"unipelt order={self.order!r} is not one of {ORDERS}; leave the default 'canonical'.")


ORDERS = ("canonical", "module")   # how the wrapped layers are listed; see UniPELTConfig.order


class GatedWrapper(DeltaWrapper):
    """A linear layer with a gated LoRA on its input and/or a gated adapter on its output."""

    def __init__(self, base: nn.Linear, lora: bool, adapter: bool, r: int, alpha: float, bottleneck: int) -> None:
        super().__init__()
        self.base = base
        w = base.weight
        out_f, in_f = w.shape
        kw = dict(device=w.device, dtype=w.dtype)
        self.scaling = alpha / r
        if lora:
            self.lora_A = nn.Parameter(torch.empty(r, in_f, **kw))            # (r, in)
            self.lora_B = nn.Parameter(torch.zeros(out_f, r, **kw))           # (out, r)
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_gate = nn.Linear(in_f, 1, **kw)                         # g_L(x): (in,) -> 1
        if adapter:
            self.adapter = Bottleneck(out_f, out_f, bottleneck, device=w.device, dtype=w.dtype)
            self.adapter_gate = nn.Linear(out_f, 1, **kw)                     # g_A(h): (out,) -> 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: (..., in)
        y = self.base(x)                                  # (..., out)
        if not self.enabled:
            return y
        if hasattr(self, "lora_A"):
            g = torch.sigmoid(self.lora_gate(x))                                       # (..., 1)
            y = y + g * ((x @ self.lora_A.T) @ self.lora_B.T) * self.scaling           # (..., out)
        if hasattr(self, "adapter"):
            y = y + torch.sigmoid(self.adapter_gate(y)) * self.adapter(y)              # (..., out)
        return y


class UniPELT(PrefixTuning):
    """Registered as "unipelt": gated LoRA + gated adapter (wrapped linear layers) + gated prefix."""

    config_cls = UniPELTConfig
    wraps_modules = True

    def __init__(self, config: UniPELTConfig, name: str) -> None:
        super().__init__(config, name)
        self.wrapped: list[tuple[ModuleSite, GatedWrapper]] = []
        self._layers: list[tuple[ModuleSite, bool, bool]] = []

    def select(self, model: nn.Module, sites: list[ModuleSite]) -> list[ModuleSite]:
        c = self.config
        lora = {s.name for s in match_targets(model, c.lora_targets)}
        adapter = {s.name for s in match_targets(model, c.adapter_targets)}
        by_name = {s.name: s for s in sites}
        bad = [n for n in sorted(lora | adapter) if not isinstance(by_name[n].module, nn.Linear)]
        if bad:
            raise DeltaError(f"unipelt wraps nn.Linear layers, but its targets also match {bad[:4]}; name linear "
                             f"layers (lora_targets e.g. ['q_proj', 'v_proj'], adapter_targets e.g. ['mlp.fc2'])")
        # canonical names: a transformers Llama sorts mlp.down_proj before self_attn.q_proj, its native backbone
        # attn.q_proj before mlp.fc2; the saved target list must come out the same on both sides
        key = canonical_namer(model) if c.order == "canonical" else (lambda n: n)
        self._layers = [(by_name[n], n in lora, n in adapter) for n in sorted(lora | adapter, key=key)]
        self.model = model
        prefix_sites = super().select(model, sites) if c.num_tokens > 0 else []
        return [s for s, _, _ in self._layers] + prefix_sites

    def apply(self, sites: list[ModuleSite]) -> None:
        c = self.config
        prefix_sites = sites[len(self._layers):]
        for s, lora, adapter in self._layers:
            w = GatedWrapper(s.module, lora, adapter, c.r, c.alpha, c.bottleneck)
            self.wrapped.append((s, wrap_site(s, w, self.name)))
        if c.num_tokens > 0:
            super().apply(prefix_sites)
            ref = next(self.model.parameters())
            self.holder.gates = nn.ParameterDict({part: nn.Parameter(torch.zeros(s.part.layers, device=ref.device,
                                                                                   dtype=ref.dtype))
                                                  for part, s in self.sets.items()})   # a_l: (L,) per part

    def remove(self) -> None:
        unwrap_sites(self.wrapped)
        self.wrapped = []
        super().remove()

    def named_delta_parameters(self) -> list[tuple[str, nn.Parameter]]:
        out = [(f"{s.name}.{k}", p) for s, w in self.wrapped for k, p in w.named_parameters()
               if not k.startswith("base.")]
        if self.config.num_tokens > 0 and "gates" in self.holder._modules:
            out += super().named_delta_parameters()
            out += [(f"prefix.{part}.gate", p) for part, p in self.holder.gates.items()]
        return out

    def prefix_kv(self) -> PrefixList | PrefixDict:
        """The prefixes with each layer's values scaled by its gate sigmoid(a_l)."""
        plain = super().prefix_kv()
        gated = {part: [(k, v * torch.sigmoid(self.holder.gates[part][i]))
                        for i, (k, v) in enumerate(pairs)]
                 for part, pairs in (plain.items() if isinstance(plain, dict) else [("layers", plain)])}
        out: PrefixList | PrefixDict = (PrefixList(gated["layers"]) if isinstance(plain, PrefixList)
                                        else PrefixDict(gated))
        out.owners = plain.owners
        return out

    def merge(self) -> None:
        raise DeltaError(f"unipelt {self.name!r} cannot be merged: its gates depend on the input; keep it attached "
                         f"for inference")

    def export_state(self) -> tuple[UniPELTConfig, dict[str, torch.Tensor]]:
        """The prefix in plain form (reparam folded, config reparam=False) with the token numbering recorded
        (config positions), everything else as trained."""
        tensors = {k: p.detach() for k, p in self.named_delta_parameters()}
        if self.config.num_tokens == 0:
            return self.config, tensors
        config, plain = super().export_state()   # reparam=False, and the model's token numbering in `positions`
        tensors = {k: v for k, v in tensors.items() if not k.startswith("prefix.") or k.endswith(".gate")}
        return config, {**tensors, **plain}

    @contextmanager
    def disabled(self) -> Iterator[None]:
        for _, w in self.wrapped:
            w.enabled = False
        try:
            with super().disabled():
                yield
        finally:
            for _, w in self.wrapped:
                w.enabled = True


register_delta("unipelt", UniPELT)
