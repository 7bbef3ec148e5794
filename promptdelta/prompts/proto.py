"""ProtoVerbalizer: ProtoVerb (Cui et al. 2022, "Prototypical Verbalizer for Prompt-based Few-shot Tuning").

The mask hidden state h is projected, v = W h (no bias), and compared with one learned prototype p_c per
class by cosine similarity, S(v, p) = cos(v, p) / tau. Two contrastive losses train W and the prototypes:

    instance-prototype   L_proto = mean_i  -log( exp S(v_i, p_{y_i}) / sum_c exp S(v_i, p_c) )
                         (= cross-entropy of the prototype logits)
    instance-instance    L_ins   = mean over pairs (i, j) with y_i = y_j (i = j included) of
                         -log( exp S(v_i, v_j) / (exp S(v_i, v_j) + sum_{k: y_k != y_j} exp S(v_k, v_j)) )

The paper sums these over a balanced N-way K-shot batch and divides by N^2 K (L_proto) and N^2 K^2 (L_ins);
our means are N times those, the same losses up to a constant factor, and they work on any batch.

With a ManualVerbalizer (``manual=``) the two are combined as a product of experts:
``log_softmax(proto logits) + manual_weight * log_softmax(manual logits)``.

Training: ``PromptForClassification.loss`` adds ``verbalizer.extra_loss(hidden, labels)`` to its
cross-entropy on ``process``'s output. Alone, that cross-entropy is L_proto and extra_loss is L_ins; with a
manual verbalizer the cross-entropy trains the combination and extra_loss is L_ins + L_proto. With a frozen
backbone, ``fit(hidden, labels)`` trains the head and prototypes on cached mask hidden states (as
OpenPrompt's ``train_proto``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from promptdelta.errors import VerbalizerError
from promptdelta.prompts.registry import (build_verbalizer, check_options, need_backbone, register_verbalizer,
                                         verbalizer_spec)
from promptdelta.prompts.verbalizer import ManualVerbalizer, Verbalizer

logger = logging.getLogger(__name__)


class ProtoVerbalizer(Verbalizer):
    """Class prototypes in a projected space of the mask hidden state.

    Args:
        classes: class names.
        hidden_size: the backbone's hidden size (``backbone.config.hidden_size``).
        proto_dim: dimension of the projected space.
        temperature: tau in S(v, p) = cos(v, p) / tau (the paper uses plain cosine, tau = 1).
        manual: an optional ManualVerbalizer over the same classes, combined with the prototype scores.
        manual_weight: weight of the manual verbalizer's log-probs in the combination.
        seed: seeds the initialisation of the projection and prototypes.
    """

    def __init__(self, classes: Sequence[str], hidden_size: int, proto_dim: int = 128, temperature: float = 1.0,
                 manual: ManualVerbalizer | None = None, manual_weight: float = 1.0, seed: int = 0) -> None:
        if temperature <= 0 or proto_dim <= 0 or hidden_size <= 0:
            raise VerbalizerError(f"temperature ({temperature}), proto_dim ({proto_dim}) and hidden_size "
                                  f"({hidden_size}) must be positive; pass e.g. temperature=1.0, proto_dim=128")
        super().__init__(classes)
        if manual is not None and list(manual.classes) != self.classes:
            raise VerbalizerError(f"the manual verbalizer has classes {manual.classes} but the prototypes "
                                  f"{self.classes}; build both over the same classes, in the same order")
        gen = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(hidden_size, proto_dim, bias=False)
        self.prototypes = nn.Parameter(torch.empty(self.num_classes, proto_dim))        # (C, D)
        with torch.no_grad():
            bound = (6.0 / (hidden_size + proto_dim)) ** 0.5                            # xavier uniform
            self.head.weight.uniform_(-bound, bound, generator=gen)
            bound = (6.0 / (self.num_classes + proto_dim)) ** 0.5
            self.prototypes.uniform_(-bound, bound, generator=gen)
        self.temperature = float(temperature)
        self.manual = manual
        self.manual_weight = float(manual_weight)

    def embed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Unit projections v / |v|: (B, H) -> (B, D)."""
        return F.normalize(self.head(hidden.to(self.head.weight.dtype)), dim=-1)

    def proto_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """S(v, p_c) = cos(W h, p_c) / tau: (B, H) -> (B, C)."""
        return self.embed(hidden) @ F.normalize(self.prototypes, dim=-1).T / self.temperature

    def process(self, hidden: torch.Tensor, logits: torch.Tensor | None, backbone: Any) -> torch.Tensor:
        """hidden (B, H), logits (B, V) or None -> label logits (B, C)."""
        hidden, logits = self.single_mask(hidden, logits)
        scores = self.proto_logits(hidden)                                               # (B, C)
        if self.manual is None:
            return scores
        manual = self.manual.process(hidden, logits, backbone).to(scores.dtype)          # (B, C)
        return scores.log_softmax(-1) + self.manual_weight * manual.log_softmax(-1)

    def instance_prototype_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_proto: cross-entropy of the prototype logits."""
        hidden, _ = self.single_mask(hidden, None)
        return F.cross_entropy(self.proto_logits(hidden), labels.to(hidden.device))

    def instance_instance_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_ins over every same-class pair of the batch (0 when the batch has no negatives)."""
        hidden, _ = self.single_mask(hidden, None)
        v = self.embed(hidden)                                                           # (B, D)
        s = v @ v.T / self.temperature                                                   # (B, B)
        labels = labels.to(v.device)
        same = labels[:, None] == labels[None, :]                                        # (B, B)
        if same.all():                                                                   # no negatives
            return s.sum() * 0.0
        log_neg = s.masked_fill(same, float("-inf")).logsumexp(0)                        # (B,) per column j
        terms = torch.logaddexp(s, log_neg[None, :]) - s                                 # (B, B)
        return terms[same].mean()

    def extra_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Added by the model to its cross-entropy: L_ins, plus L_proto when a manual verbalizer is mixed
        in (the cross-entropy then trains the combination, not the prototypes alone)."""
        loss = self.instance_instance_loss(hidden, labels)
        if self.manual is not None:
            loss = loss + self.instance_prototype_loss(hidden, labels)
        return loss

    def fit(self, hidden: torch.Tensor, labels: torch.Tensor, epochs: int = 100, lr: float = 1e-2,
            batch_size: int | None = None, seed: int = 0) -> list[float]:
        """Train projection and prototypes on cached mask hidden states (N, H) with L_proto + L_ins.

        For a frozen backbone: collect the hidden states once, then fit. Returns the loss per epoch."""
        if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
            raise VerbalizerError(f"fit needs hidden (N, H) and labels (N,), got {tuple(hidden.shape)} and "
                                  f"{tuple(labels.shape)}; pass the mask hidden state of each example")
        hidden, labels = hidden.detach(), labels.detach().long()
        opt = torch.optim.Adam([self.head.weight, self.prototypes], lr=lr)
        gen = torch.Generator().manual_seed(seed)
        size = batch_size or len(hidden)
        history = []
        for _ in range(epochs):
            order, total = torch.randperm(len(hidden), generator=gen), 0.0
            for start in range(0, len(hidden), size):
                idx = order[start:start + size]
                loss = (self.instance_prototype_loss(hidden[idx], labels[idx])
                        + self.instance_instance_loss(hidden[idx], labels[idx]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.detach().item() * len(idx)
            history.append(total / len(hidden))
        return history


# --- registry: how the builder makes a ProtoVerbalizer, and the options a classifier folder rebuilds it from -----
def _build_proto(tokenizer: Any, classes: list[str] | None, options: dict[str, Any], backbone: Any) -> ProtoVerbalizer:
    """``manual``: an optional {"kind", "options"} verbalizer combined with the prototypes (product of experts)."""
    manual = options.pop("manual", None)
    if manual is not None:
        manual = build_verbalizer(manual["kind"], tokenizer, classes, manual.get("options"), backbone)
    hidden = need_backbone(backbone, "proto verbalizer").config.hidden_size
    return ProtoVerbalizer(classes, hidden_size=hidden, manual=manual,
                           **check_options("verbalizer", ProtoVerbalizer, options, taken=("manual",)))


def _export_proto(v: ProtoVerbalizer) -> dict[str, Any]:
    return {"proto_dim": v.head.out_features, "temperature": v.temperature, "manual_weight": v.manual_weight,
            "manual": None if v.manual is None else verbalizer_spec(v.manual)}


register_verbalizer("proto", ProtoVerbalizer, _build_proto, _export_proto)
