"""Shared pieces of the training tests: a token-id example and a backbone + linear-head classifier."""

from dataclasses import dataclass

import torch


@dataclass
class Ex:
    ids: tuple
    label: int


class Classifier(torch.nn.Module):
    """backbone -> first-token state -> linear head; works with native and transformers encoders (under FSDP
    the head sits in the root unit)."""

    def __init__(self, backbone: torch.nn.Module, hidden: int) -> None:
        super().__init__()
        self.backbone, self.head = backbone, torch.nn.Linear(hidden, 2)

    def collate(self, examples):
        return {"ids": torch.tensor([e.ids for e in examples]), "labels": torch.tensor([e.label for e in examples])}

    def forward(self, batch):
        h = self.backbone(input_ids=batch["ids"]).last_hidden_state      # (B, T, H)
        return self.head(h[:, 0])                                          # (B, 2)

    def loss(self, batch):
        logits = self(batch)
        return torch.nn.functional.cross_entropy(logits, batch["labels"]), logits
