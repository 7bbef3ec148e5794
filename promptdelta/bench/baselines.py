"""Baselines a user would pick instead of a prompt method, on the same backbone and splits.

- ``finetune``: full fine-tuning with a classification head, logits = W pool(h) + b (Devlin et al. 2019).
- ``head``: the same head trained on a frozen backbone (the backbone runs without autograd).
- ``logreg``: scikit-learn logistic regression on frozen mean-pooled embeddings
  e = sum_t m_t h_t / sum_t m_t (m: attention mask), C chosen on dev.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from promptdelta.data.examples import InputExample
from promptdelta.utils.pooling import grouped_mean

logger = logging.getLogger(__name__)


def tokenize_pairs(tokenizer: Any, examples: Sequence[InputExample], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise ``text`` (and ``text_b`` for pair tasks) with the tokenizer's own special tokens."""
    texts = [ex.text for ex in examples]
    pairs = [ex.text_b for ex in examples]
    args = (texts, [p or "" for p in pairs]) if any(p is not None for p in pairs) else (texts,)
    enc = tokenizer(*args, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    if all(ex.label is not None for ex in examples):
        batch["labels"] = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    return batch


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens' states: (B, T, H), (B, T) -> (B, H)."""
    return grouped_mean(hidden, mask, None)


class HeadClassifier(nn.Module):
    """Backbone + dropout + linear head on the [CLS] state (``pooling="cls"``) or the mean of the tokens.

    ``freeze_backbone=True`` trains only the head (the backbone runs under ``torch.no_grad``).
    Offers ``collate``/``loss``/``forward``, so :class:`promptdelta.Trainer` trains it.
    """

    def __init__(self, backbone: nn.Module, tokenizer: Any, num_classes: int, max_length: int = 128,
                 pooling: str = "cls", dropout: float = 0.1, freeze_backbone: bool = False) -> None:
        super().__init__()
        self.backbone, self.tokenizer = backbone, tokenizer
        self.max_length, self.pooling, self.num_classes = max_length, pooling, num_classes
        self.frozen = freeze_backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.hidden_size, num_classes)
        for p in backbone.parameters():
            p.requires_grad_(not freeze_backbone)

    def collate(self, examples: Sequence[InputExample]) -> dict[str, torch.Tensor]:
        return tokenize_pairs(self.tokenizer, examples, self.max_length)

    def _features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.head.weight.device
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.frozen:
                self.backbone.eval()                                # no dropout in a frozen feature extractor
            hidden = self.backbone(**inputs).last_hidden_state     # (B, T, H)
        if self.pooling == "mean":
            return mean_pool(hidden, inputs["attention_mask"])     # (B, H)
        return hidden[:, 0]                                         # (B, H)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.dropout(self._features(batch)))      # (B, C)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch)
        return nn.functional.cross_entropy(logits, batch["labels"].to(logits.device)), logits


def build_head_model(kind: str, base: nn.Module, tokenizer: Any, num_classes: int, max_length: int,
                     options: dict[str, Any]) -> HeadClassifier:
    """A fresh ``finetune`` or ``head`` model on a copy of ``base``."""
    return HeadClassifier(copy.deepcopy(base), tokenizer, num_classes, max_length=max_length,
                          pooling=options.get("pooling", "cls"), dropout=float(options.get("dropout", 0.1)),
                          freeze_backbone=(kind == "head"))


def tokenize_windows(tokenizer: Any, examples: Sequence[InputExample], max_length: int) -> dict[str, torch.Tensor]:
    """Like ``tokenize_pairs``, but a single text longer than ``max_length`` is cut into consecutive windows of
    ``max_length`` tokens (special tokens included), one row each, instead of being truncated: R >= B rows, and
    ``row_group`` (R,) names each row's example. Pairs are truncated as before (a window of one text of a pair
    has no partner). A mean readout over a group's real tokens (``grouped_mean``) then reads the whole text."""
    if any(ex.text_b is not None for ex in examples):
        batch = tokenize_pairs(tokenizer, examples, max_length)
        batch["row_group"] = torch.arange(len(examples))
        return batch
    enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length, padding=True,
                    return_overflowing_tokens=True, stride=0, return_tensors="pt")   # the tokenizer's own windows
    batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    batch["row_group"] = enc["overflow_to_sample_mapping"].long()                   # (R,)
    if all(ex.label is not None for ex in examples):
        batch["labels"] = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    return batch


@torch.no_grad()
def embed(backbone: nn.Module, tokenizer: Any, examples: Sequence[InputExample], max_length: int,
          batch_size: int = 64, device: str = "cpu", windows: bool = False) -> np.ndarray:
    """Mean-pooled last-layer states of a frozen backbone, (N, H) float32. ``windows``: a single text longer
    than ``max_length`` is read whole, in windows (``tokenize_windows``), not truncated."""
    backbone.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        part = examples[i:i + batch_size]
        if windows:
            batch = tokenize_windows(tokenizer, part, max_length)
            group = batch.pop("row_group").to(device)
        else:
            batch, group = tokenize_pairs(tokenizer, part, max_length), None
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        hidden = backbone(**inputs).last_hidden_state               # (R, T, H)
        out.append(grouped_mean(hidden, inputs["attention_mask"], group).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, backbone.config.hidden_size), np.float32)


def run_logreg(base: nn.Module, tokenizer: Any, train: Sequence[InputExample], dev: Sequence[InputExample],
               test: Sequence[InputExample], max_length: int, options: dict[str, Any], seed: int,
               device: str = "cpu") -> dict[str, Any]:
    """Logistic regression on frozen embeddings; C from ``C_grid`` (default [C]) chosen on dev accuracy."""
    from sklearn.linear_model import LogisticRegression

    backbone = base.to(device)
    bs = int(options.get("batch_size", 64))
    t0 = time.perf_counter()
    x_train = embed(backbone, tokenizer, train, max_length, bs, device)
    x_dev = embed(backbone, tokenizer, dev, max_length, bs, device)
    y_train, y_dev = [ex.label for ex in train], [ex.label for ex in dev]
    best, best_score, best_c, grid_dev = None, -1.0, None, {}
    for c in options.get("C_grid") or [float(options.get("C", 1.0))]:
        clf = LogisticRegression(C=float(c), max_iter=int(options.get("max_iter", 1000)), random_state=seed)
        clf.fit(x_train, y_train)
        score = float((clf.predict(x_dev) == np.asarray(y_dev)).mean()) if len(dev) else 0.0
        grid_dev[f"{float(c):g}"] = score
        if score > best_score:
            best, best_score, best_c = clf, score, float(c)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    preds = best.predict(embed(backbone, tokenizer, test, max_length, bs, device)).tolist()
    eval_s = time.perf_counter() - t1
    return {"preds": preds, "dev_score": best_score, "chosen": {"C": best_c}, "grid_dev": grid_dev,
            "train_time_s": train_s,
            "steps": 0, "eval_time_s": eval_s,
            "trainable_params": int(best.coef_.size + best.intercept_.size),
            "total_params": int(best.coef_.size + best.intercept_.size
                                + sum(p.numel() for p in backbone.parameters()))}
