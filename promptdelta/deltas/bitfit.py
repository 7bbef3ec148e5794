"""BitFit: train only the bias terms (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning
for Transformer-based Masked Language-models").

    y = W0 x + b        W0 frozen, b trainable (starting from the pretrained b0)

The biases are the delta: nothing is wrapped, ``merge()`` is a no-op, the checkpoint holds only the biases,
and ``detach()`` writes the pretrained values b0 (copied at attach) back. Choose groups with targets, e.g.
``["q_proj", "k_proj", "v_proj", "o_proj"]`` (attention), ``["fc1", "fc2"]`` (FFN) or
``"re:.*norm"`` (LayerNorm); the default (None) takes every bias of the model.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from promptdelta.deltas.base import DeltaMethod, ModuleSite, register_delta
from promptdelta.errors import DeltaError

logger = logging.getLogger(__name__)


@dataclass
class BitFitConfig:
    """targets: modules whose ``bias`` is trained (None = every module with a bias)."""

    targets: list[str] | str | None = None


def _bias(module: nn.Module) -> nn.Parameter | None:
    b = module._parameters.get("bias")
    return b if isinstance(b, nn.Parameter) else None


class BitFit(DeltaMethod):
    """Registered as "bitfit": makes the target modules' own ``bias`` parameters the trainable delta."""

    config_cls = BitFitConfig
    trains_base_parameters = True

    def __init__(self, config: BitFitConfig, name: str) -> None:
        super().__init__(config, name)
        self.biases: list[tuple[str, nn.Parameter, torch.Tensor]] = []   # (key, bias, pretrained copy)

    def select(self, model: nn.Module, sites: list[ModuleSite]) -> list[ModuleSite]:
        seen: set[int] = set()
        keep = []
        for s in sites:
            b = _bias(s.module)
            if b is not None and id(b) not in seen:   # tied biases (e.g. an MLM decoder) count once
                seen.add(id(b))
                keep.append(s)
        if not keep:
            names = [s.name for s in sites][:5]
            raise DeltaError(f"BitFit targets {self.config.targets!r} match modules without a bias ({names}); "
                             f"target modules that have one (e.g. 'query', 'q_proj', 're:.*norm'), or use "
                             f"another delta method for bias-free models.")
        skipped = len(sites) - len(keep)
        if skipped and self.config.targets is not None:
            logger.info("BitFit: %d matched modules have no (new) bias and are skipped", skipped)
        return keep

    def apply(self, sites: list[ModuleSite]) -> None:
        self.biases = [(f"{s.name}.bias", b, b.detach().clone()) for s in sites for b in [_bias(s.module)]]

    def remove(self) -> None:
        with torch.no_grad():
            for _, b, b0 in self.biases:
                b.copy_(b0)
        self.biases = []

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
