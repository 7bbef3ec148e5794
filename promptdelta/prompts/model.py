"""PromptForClassification: backbone + template + verbalizer.

It talks to the backbone only through ``inputs_embeds``, ``attention_mask``/``token_type_ids`` and the
returned hidden states / logits at the mask position, so soft templates and any delta work unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from promptdelta.errors import DataError
from promptdelta.prompts.template import Template
from promptdelta.prompts.verbalizer import Verbalizer


class PromptForClassification(nn.Module):
    """Classify by filling the template's mask: label logits = verbalizer(backbone(template(x))[mask])."""

    def __init__(self, backbone: nn.Module, template: Template, verbalizer: Verbalizer,
                 max_length: int = 256) -> None:
        super().__init__()
        self.backbone = backbone
        self.template = template
        self.verbalizer = verbalizer
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Examples -> batch dict (on CPU); checks labels against the verbalizer's classes."""
        self.verbalizer.check_labels(examples)
        return self.template.tokenize(list(examples), max_length=self.max_length)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Batch dict -> label logits (B, C)."""
        batch = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        embeds = self.backbone.input_embeddings()(batch["input_ids"])          # (B, T, H)
        embeds = self.template.process_embeds(embeds, batch)                   # (B, T', H)
        out = self.backbone(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                            token_type_ids=batch.get("token_type_ids"))
        rows = torch.arange(embeds.shape[0], device=embeds.device)
        mask_at = batch["mask_pos"][:, 0]                                       # (B,)
        hidden = out.last_hidden_state[rows, mask_at]                          # (B, H)
        logits = None if out.logits is None else out.logits[rows, mask_at]     # (B, V)
        return self.verbalizer.process(hidden, logits, self.backbone)          # (B, C)

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mean cross-entropy, label logits (B, C)). The batch must carry labels."""
        if "labels" not in batch:
            raise DataError("the batch has no labels, so no loss can be computed; give every example a "
                            "label (or use predict() for unlabelled data)")
        logits = self(batch)
        return F.cross_entropy(logits, batch["labels"].to(logits.device)), logits

    @torch.no_grad()
    def predict(self, examples: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """Predicted class ids (N,) as a LongTensor on CPU; runs in eval mode, then restores the mode."""
        was_training = self.training
        self.eval()
        try:
            preds = [self(self.collate(examples[i:i + batch_size])).argmax(-1).cpu()
                     for i in range(0, len(examples), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
