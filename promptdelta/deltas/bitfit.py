"""BitFit: train only the bias terms (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning
for Transformer-based Masked Language-models").

    y = W0 x + b        W0 frozen, b trainable (starting from the pretrained b0)

The biases are the delta: nothing is wrapped, ``merge()`` is a no-op, the checkpoint holds only the biases,
and ``detach()`` writes the pretrained values b0 (copied at attach) back. Choose groups with targets, e.g.
``["q_proj", "k_proj", "v_proj", "o_proj"]`` (attention), ``["fc1", "fc2"]`` (FFN) or
``"re:.*norm"`` (LayerNorm); the default (None) takes every bias of the model.

Models without biases (T5): ``add_biases`` gives bias-free ``nn.Linear`` targets a zero-initialised bias
(so outputs start unchanged), held by a small wrapper ``AddedBias`` (y = W0 x + b, b trainable) so the base
module and the model fingerprint stay as they were; ``detach()`` removes the wrappers and with them the added
biases. ``add_biases=None`` (auto) adds them only when a backbone whose transformer blocks are recognised
(native, or a ``transformers`` model: see ``sites.canonical_aliases``) has no bias at all (T5, Llama) and logs
so; True adds them to every bias-free linear target; False never does.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from promptdelta.deltas.base import (DeltaMethod, DeltaWrapper, ModuleSite, canonical_aliases, register_delta,
                                     unwrap_sites, wrap_site)
from promptdelta.errors import ConfigError, DeltaError

logger = logging.getLogger(__name__)


@dataclass
class BitFitConfig:
    """targets: modules whose ``bias`` is trained (None = every module with a bias);
    add_biases: give bias-free linear targets a zero bias (None = only for bias-free backbones whose blocks
    are recognised: T5, Llama, native or transformers)."""

    targets: list[str] | str | None = None
    add_biases: bool | None = None

    def __post_init__(self) -> None:
        if self.add_biases not in (None, True, False):
            raise ConfigError(f"BitFit add_biases={self.add_biases!r} must be None (auto), True or False.")


def _bias(module: nn.Module) -> nn.Parameter | None:
    b = module._parameters.get("bias")
    return b if isinstance(b, nn.Parameter) else None


class AddedBias(DeltaWrapper):
    """A bias-free linear layer ``base`` plus a trainable bias: y = base(x) + b, b zero-initialised."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        w = base.weight   # the bias first: once ``base`` is set, ``self.bias`` would read base's (None)
        self.bias = nn.Parameter(torch.zeros(base.out_features, device=w.device, dtype=w.dtype))   # (out,)
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: (..., in)
        return self.base(x) + self.bias                    # (..., out)


def _bias_free_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and module._parameters.get("bias") is None


class BitFit(DeltaMethod):
    """Registered as "bitfit": makes the target modules' own ``bias`` parameters the trainable delta."""

    config_cls = BitFitConfig
    trains_base_parameters = True

    def __init__(self, config: BitFitConfig, name: str) -> None:
        super().__init__(config, name)
        self.biases: list[tuple[str, nn.Parameter, torch.Tensor]] = []   # (key, bias, pretrained copy)
        self.added: list[tuple[ModuleSite, AddedBias]] = []                # wrappers holding added biases

    def select(self, model: nn.Module, sites: list[ModuleSite]) -> list[ModuleSite]:
        seen: set[int] = set()
        keep = []
        for s in sites:
            b = _bias(s.module)
            if b is not None and id(b) not in seen:   # tied biases (e.g. an MLM decoder) count once
                seen.add(id(b))
                keep.append(s)
        add = self._sites_to_add(model, sites)
        if add:
            logger.info("BitFit: %s has no bias in %d linear layers; adding zero-initialised biases there "
                        "(detach removes them)", type(model).__name__, len(add))
        if not keep and not add:
            names = [s.name for s in sites][:5]
            raise DeltaError(f"BitFit targets {self.config.targets!r} match modules without a bias ({names}); "
                             f"target modules that have one (e.g. 'query', 'q_proj', 're:.*norm'), pass "
                             f"add_biases=True to give bias-free linear layers zero-initialised biases, or use "
                             f"another delta method for bias-free models.")
        skipped = len(sites) - len(keep) - len(add)
        if skipped and self.config.targets is not None:
            logger.info("BitFit: %d matched modules have no (new) bias and are skipped", skipped)
        return [s for s in sites if any(s is t for t in keep + add)]

    def _sites_to_add(self, model: nn.Module, sites: list[ModuleSite]) -> list[ModuleSite]:
        """Bias-free linear targets that get an added bias (each module once), or [] when not adding."""
        if not self._adds_biases(model):
            return []
        add, seen = [], set()
        for s in sites:
            if _bias_free_linear(s.module) and id(s.module) not in seen:
                seen.add(id(s.module))
                add.append(s)
        wrapped = [s.name for s in add if isinstance(s.parent, DeltaWrapper)]
        if wrapped:
            raise DeltaError(f"BitFit would add biases to {wrapped[:3]}, which another delta already wraps; "
                             f"detach that delta first or leave these modules out of the BitFit targets.")
        return add

    def _adds_biases(self, model: nn.Module) -> bool:
        if self.config.add_biases is not None:
            return self.config.add_biases
        known = bool(canonical_aliases(model))   # a native backbone, or transformer blocks found in it
        return known and not any(_bias(m) is not None for m in model.modules())

    def apply(self, sites: list[ModuleSite]) -> None:
        self.biases, self.added = [], []
        for s in sites:
            b = _bias(s.module)
            if b is None:   # a bias-free linear layer: wrap it with a zero bias
                wrapper = wrap_site(s, AddedBias(s.module), self.name)
                self.added.append((s, wrapper))
                b = wrapper.bias
            self.biases.append((f"{s.name}.bias", b, b.detach().clone()))

    def remove(self) -> None:
        with torch.no_grad():
            for _, b, b0 in self.biases:
                b.copy_(b0)
        unwrap_sites(self.added)
        self.biases, self.added = [], []

    def named_delta_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(k, b) for k, b, _ in self.biases]

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Swap the pretrained biases in for the duration, then the trained ones back."""
        with torch.no_grad():
            trained = [b.detach().clone() for _, b, _ in self.biases]
            for _, b, b0 in self.biases:
                b.copy_(b0)
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, b, _), t in zip(self.biases, trained):
                    b.copy_(t)

    def original_values(self) -> dict[int, torch.Tensor]:
        return {id(b): b0 for _, b, b0 in self.biases}


register_delta("bitfit", BitFit)
