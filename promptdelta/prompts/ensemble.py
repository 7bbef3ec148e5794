"""Ensembles over several templates (PET, Schick & Schuetze 2021): one prompt model per template (pattern),
combined by a weighted average of their class probabilities, the weights from each model's dev accuracy:

    P(c | x) = sum_k w_k P_k(c | x) / sum_k w_k,      w_k = dev accuracy of model k (PET's "weighted")

so no single template decides, and a template that reads the task badly counts less. Dev only; never test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from promptdelta.errors import ConfigError


class TemplateEnsemble(nn.Module):
    """Weighted average of several prompt models' class probabilities (same classes, same order)."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not models:
            raise ConfigError("a template ensemble needs at least one prompt model; pass models=[clf1, clf2, ...]")
        classes = [list(m.verbalizer.classes) for m in models]
        if any(c != classes[0] for c in classes):
            raise ConfigError(f"the ensemble's models have different classes {classes}; build each over the "
                              f"same classes, in the same order")
        weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
        if len(weights) != len(models) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"weights {weights} for {len(models)} models: give one non-negative weight per "
                              f"model, not all zero")
        self.models = nn.ModuleList(models)
        self.register_buffer("weights", torch.tensor(weights) / sum(weights))    # (K,), sums to 1
        self.classes = classes[0]

    @torch.no_grad()
    def predict_proba(self, examples: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        """(N, C): sum_k w_k softmax(logits_k)."""
        examples, out = list(examples), []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            probs = torch.stack([m.eval()(m.collate(chunk)).float().softmax(-1).cpu() for m in self.models])  # (K, B, C)
            out.append((self.weights[:, None, None] * probs).sum(0))                                           # (B, C)
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    def predict(self, examples: Sequence[Any], batch_size: int = 64) -> list[int]:
        return self.predict_proba(examples, batch_size).argmax(-1).tolist()

    @classmethod
    def from_dev(cls, models: Sequence[nn.Module], dev: Sequence[Any], batch_size: int = 64) -> "TemplateEnsemble":
        """Weights = each model's dev accuracy (PET); all-zero accuracies fall back to equal weights."""
        if not len(dev):
            raise ConfigError("from_dev weighs the templates by dev accuracy, and dev is empty; give dev examples "
                              "or pass weights= yourself")
        labels = torch.tensor([ex.label for ex in dev])
        accs = [float((torch.tensor(cls([m]).predict(dev, batch_size)) == labels).float().mean()) for m in models]
        return cls(models, accs if sum(accs) > 0 else None)
