"""SimilarityVerbalizer: a class score is the cosine similarity between the readout of the wrapped text and
the readout of that class's label words or description, temperature-scaled (made for embedding backbones,
which have no MLM head; the zero-shot use of a sentence encoder, as in Yin et al. 2019 / SetFit's zero-shot):

    s_c(x) = cos(h(x), e_c) / tau        h(x): the model's readout (B, H); e_c: class vector (C, H)

``e_c`` starts as the mean-pooled backbone states of the class's description (default: its label words
joined, else the class name), so the verbalizer classifies zero-shot; ``e_c`` is an nn.Parameter, so
training moves it (``trainable=False`` freezes it). ``refresh(clf)`` recomputes ``e_c`` through the
classifier's own template and readout (the description wrapped in the same template, ``wrap=True``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from promptdelta.errors import VerbalizerError
from promptdelta.prompts.registry import check_options, need_backbone, register_verbalizer
from promptdelta.prompts.verbalizer import Verbalizer


def describe(classes: Sequence[str], label_words: Sequence[Sequence[str]] | None = None,
             descriptions: Sequence[str] | None = None) -> list[str]:
    """One text per class: its description, else its label words joined by ", ", else its name."""
    if descriptions is not None:
        if len(descriptions) != len(classes):
            raise VerbalizerError(f"{len(descriptions)} descriptions for {len(classes)} classes; give one per class")
        return [str(d) for d in descriptions]
    if label_words is not None:
        if len(label_words) != len(classes):
            raise VerbalizerError(f"{len(label_words)} label-word lists for {len(classes)} classes; give one "
                                  f"list per class, in the order of the classes")
        return [", ".join([w] if isinstance(w, str) else w) for w in label_words]
    return [str(c) for c in classes]


@torch.no_grad()
def mean_embeddings(backbone: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 64) -> torch.Tensor:
    """Mean-pooled last-layer states of ``texts``: (N, H)."""
    device = next(backbone.parameters()).device
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    was = backbone.training
    backbone.eval()
    out = backbone(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
    backbone.train(was)
    keep = enc["attention_mask"].to(device)[..., None].to(out.last_hidden_state.dtype)       # (N, T, 1)
    return (out.last_hidden_state * keep).sum(1) / keep.sum(1).clamp(min=1)                   # (N, H)


class SimilarityVerbalizer(Verbalizer):
    """Cosine similarity to one vector per class, divided by a temperature.

    Args:
        classes: class names.
        class_embeds: (C, H) initial class vectors (see ``mean_embeddings``).
        descriptions: the text each vector came from (kept so a folder records it, and for ``refresh``).
        temperature: tau; 0.05 makes cosine differences of ~0.1 a confident softmax.
        trainable: whether training updates the class vectors.
    """

    def __init__(self, classes: Sequence[str], class_embeds: torch.Tensor, descriptions: Sequence[str],
                 temperature: float = 0.05, trainable: bool = True, wrap: bool = False) -> None:
        super().__init__(classes)
        if temperature <= 0:
            raise VerbalizerError(f"temperature must be positive, got {temperature}; pass e.g. 0.05")
        if class_embeds.dim() != 2 or class_embeds.shape[0] != self.num_classes:
            raise VerbalizerError(f"class_embeds has shape {tuple(class_embeds.shape)}, expected "
                                  f"({self.num_classes}, hidden); give one vector per class")
        self.class_embeds = nn.Parameter(class_embeds.detach().clone().float(), requires_grad=trainable)  # (C, H)
        self.descriptions = list(descriptions)
        self.temperature, self.trainable, self.wrap = float(temperature), bool(trainable), bool(wrap)

    def process(self, hidden: torch.Tensor, logits: torch.Tensor | None, backbone: Any) -> torch.Tensor:
        """hidden (B, H) -> label logits (B, C) = cos(h, e_c) / tau."""
        hidden, _ = self.single_mask(hidden, logits)
        h = F.normalize(hidden.to(self.class_embeds.dtype), dim=-1)                 # (B, H)
        return h @ F.normalize(self.class_embeds, dim=-1).T / self.temperature      # (B, C)

    @torch.no_grad()
    def refresh(self, clf: nn.Module) -> None:
        """Recompute the class vectors as ``clf``'s readout of each description wrapped in ``clf``'s template
        (so text and classes are read the same way, e.g. at the mask of "x. It was [MASK].")."""
        from promptdelta.data.examples import InputExample

        was = clf.training
        clf.eval()
        batch = clf.template.tokenize([InputExample(d) for d in self.descriptions], max_length=clf.max_length)
        _, hidden = clf._label_logits(batch)                                         # (C, H)
        clf.train(was)
        if hidden is None:
            raise VerbalizerError("this classifier scores label sequences, not a readout; use the similarity "
                                  "verbalizer on an encoder or with readout='mean'")
        self.class_embeds.copy_(hidden.to(self.class_embeds.dtype))


# --- registry -------------------------------------------------------------------------------------------------
def _build_similarity(tokenizer: Any, classes: list[str] | None, options: dict[str, Any],
                      backbone: Any) -> SimilarityVerbalizer:
    """``label_words`` or ``descriptions`` give each class's text; ``wrap`` is applied by ``refresh_wrapped``."""
    if classes is None:
        raise VerbalizerError("the similarity verbalizer needs the class names; pass classes=[...]")
    texts = describe(classes, options.pop("label_words", None), options.pop("descriptions", None))
    backbone = need_backbone(backbone, "similarity verbalizer")
    embeds = mean_embeddings(backbone, tokenizer, texts)
    kw = check_options("verbalizer", SimilarityVerbalizer, options, taken=("label_words", "descriptions"))
    return SimilarityVerbalizer(classes, embeds, texts, **kw)


def _export_similarity(v: SimilarityVerbalizer) -> dict[str, Any]:
    return {"descriptions": v.descriptions, "temperature": v.temperature, "trainable": v.trainable, "wrap": v.wrap}


def refresh_wrapped(clf: nn.Module) -> nn.Module:
    """``clf`` with its similarity verbalizer's class vectors read through its template, when ``wrap`` is set."""
    v = getattr(clf, "verbalizer", None)
    if isinstance(v, SimilarityVerbalizer) and v.wrap:
        v.refresh(clf)
    return clf


register_verbalizer("similarity", SimilarityVerbalizer, _build_similarity, _export_similarity,
                    config_keys=("label_words",))
