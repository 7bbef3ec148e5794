"""AutoPrompt: trigger tokens found by gradient-guided search (Shin et al. 2020, "AutoPrompt: Eliciting
Knowledge from Language Models with Automatically Generated Prompts").

A template holds trigger slots ``[T]`` (e.g. ``'{"placeholder":"text_a"} [T] [T] [T] {"mask"}.'``). Each
slot holds a vocabulary token; the search lowers the label loss L = -mean_i log p(y_i | x_i, triggers).
One iteration updates one slot j (round robin), HotFlip-style:

    g_j     = dL / d e_{t_j}                              (gradient w.r.t. the slot's input embedding, (H,))
    cand_j  = top-k_w  [ -(e_w - e_{t_j}) . g_j ]          (first-order estimate of the loss decrease)
    t_j    <- argmin_{w in cand_j + {t_j}} L(batch | t_j = w)   (exact re-scoring on a batch)

The result is an ordinary manual template (the ``[T]`` slots replaced by the chosen words), written to a
template file in OpenPrompt's format. Candidates are restricted to whole words that tokenise back to the
same single token, so the manual template reproduces exactly the prompt the search scored.
Works on every backbone ``PromptForClassification`` accepts (masked, causal, encoder-decoder; native or a
transformers model through ``load_backbone``), with any verbalizer.
"""

from __future__ import annotations

import logging
import random
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptdelta.errors import CheckpointError, ConfigError, TemplateError
from promptdelta.prompts.model import PromptForClassification
from promptdelta.prompts.soft import MixedTemplate
from promptdelta.prompts.verbalizer import Verbalizer
from promptdelta.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

TRIGGER = "[T]"


@dataclass
class AutoPromptResult:
    """The found template: ``template`` is a manual template text (triggers written as words)."""

    template: str
    trigger_tokens: list[str]
    trigger_ids: list[int]
    initial_loss: float
    final_loss: float
    history: list[float] = field(default_factory=list)      # re-scoring batch loss after each iteration

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the template as a one-line OpenPrompt template file (atomically)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it, or choose another path")
        return atomic_write_text(path, self.template + "\n")


_VOCAB_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()    # tokenizer -> (len, mask)


def trigger_vocabulary(tokenizer: Any) -> torch.Tensor:
    """(V,) bool: tokens usable as triggers: alphabetic whole words that tokenise back to themselves alone.

    Why: a sub-word piece (``##ing``) or a token that re-tokenises differently would make the written manual
    template differ from the prompt that was scored. Cached per tokenizer (a few seconds on a 30k vocabulary)."""
    try:
        cached = _VOCAB_CACHE.get(tokenizer)
    except TypeError:                                   # an object without weak references: no cache
        cached = None
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1].clone()
    keep = _whole_words(tokenizer)
    try:
        _VOCAB_CACHE[tokenizer] = (len(tokenizer), keep)
    except TypeError:
        pass
    return keep.clone()


def _whole_words(tokenizer: Any) -> torch.Tensor:
    vocab = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    words = [tokenizer.decode([i]).strip() for i in range(vocab)]
    ok = [i for i, w in enumerate(words) if i not in special and w.isalpha() and w.isascii()]
    enc = tokenizer([" " + words[i] for i in ok], add_special_tokens=False)["input_ids"]
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[[i for i, ids in zip(ok, enc) if ids == [i]]] = True
    return keep


class AutoPrompt:
    """Gradient-guided search of the trigger tokens of a template.

    Args:
        backbone: the (frozen) backbone; it is not changed.
        tokenizer: its tokenizer.
        verbalizer: maps the mask output to class scores (e.g. a ManualVerbalizer).
        template: a template text with ``[T]`` trigger slots and a ``{"mask"}``.
        init_token: the word every slot starts from (one whole-word token).
        num_candidates: k, candidates per slot and iteration.
        max_length, readout: as for PromptForClassification.
    """

    def __init__(self, backbone: nn.Module, tokenizer: Any, verbalizer: Verbalizer, template: str,
                 init_token: str = "the", num_candidates: int = 10, max_length: int = 128,
                 readout: str = "mask") -> None:
        self.n_triggers = template.count(TRIGGER)
        if self.n_triggers == 0:
            raise TemplateError(f"the AutoPrompt template {template!r} has no {TRIGGER} trigger slot; write e.g. "
                                f"'{{\"placeholder\":\"text_a\"}} {TRIGGER} {TRIGGER} {{\"mask\"}}.'")
        if num_candidates < 1:
            raise ConfigError(f"num_candidates={num_candidates} must be >= 1; pass the number of candidates per slot")
        self.template_text = template
        self.tokenizer = tokenizer
        self.backbone = backbone
        self.allowed = trigger_vocabulary(tokenizer)                              # (V,) bool
        init = tokenizer(" " + init_token, add_special_tokens=False)["input_ids"]
        if len(init) != 1 or not self.allowed[init[0]]:
            raise ConfigError(f"init_token={init_token!r} is not one whole-word token of this tokenizer; "
                              f"pick a common word such as 'the'")
        self.init_id = init[0]
        self.k = num_candidates
        soft = template.replace(TRIGGER, '{"soft"}')
        self.mixed = MixedTemplate(soft, tokenizer=tokenizer, backbone=backbone)
        self.clf = PromptForClassification(backbone, self.mixed, verbalizer, max_length=max_length,
                                           readout=readout)

    def _embeddings(self) -> torch.Tensor:
        return self.backbone.input_embeddings().weight                            # (V, H)

    def _set(self, ids: Sequence[int]) -> None:
        with torch.no_grad():
            self.mixed.soft_embeds.copy_(self._embeddings()[list(ids)])           # (N, H)

    def _loss(self, batch: dict[str, torch.Tensor], ids: Sequence[int]) -> float:
        self._set(ids)
        with torch.no_grad():
            return float(self.clf.loss(batch)[0])

    def _candidates(self, batch: dict[str, torch.Tensor], ids: list[int], slot: int) -> list[int]:
        """Top-k words by the first-order loss decrease at ``slot``."""
        self._set(ids)
        loss = self.clf.loss(batch)[0]
        (grad,) = torch.autograd.grad(loss, self.mixed.soft_embeds)                # (N, H)
        emb = self._embeddings().detach()                                         # (V, H)
        gain = -(emb @ grad[slot])                                                # (V,) = -(e_w . g), e_cur const
        gain[~self.allowed.to(gain.device)] = -float("inf")
        gain[ids[slot]] = -float("inf")
        return gain.topk(self.k).indices.tolist()

    def search(self, examples: Sequence[Any], iters: int = 10, batch_size: int = 16,
               seed: int = 13) -> AutoPromptResult:
        """Run ``iters`` slot updates on labelled ``examples``; returns the best template found."""
        if not examples:
            raise ConfigError("AutoPrompt.search needs labelled training examples; pass a non-empty list")
        rng = random.Random(seed)
        was_training = self.clf.training
        self.clf.eval()                                                           # no dropout in the scores
        ids = [self.init_id] * self.n_triggers
        try:
            full = self.clf.collate(list(examples))
            initial = current = self._loss(full, ids)
            history = []
            for it in range(iters):
                slot = it % self.n_triggers
                grad_batch = self.clf.collate(rng.sample(list(examples), min(batch_size, len(examples))))
                cands = self._candidates(grad_batch, ids, slot)
                score_batch = self.clf.collate(rng.sample(list(examples), min(batch_size, len(examples))))
                best, best_loss = ids[slot], self._loss(score_batch, ids)
                for c in cands:
                    trial = ids[:slot] + [c] + ids[slot + 1:]
                    loss = self._loss(score_batch, trial)
                    if loss < best_loss:
                        best, best_loss = c, loss
                ids[slot] = best
                history.append(best_loss)
            current = self._loss(full, ids)
        finally:
            self.clf.train(was_training)
        words = [self.tokenizer.decode([i]).strip() for i in ids]
        return AutoPromptResult(self.render(words), words, ids, initial, current, history)

    def render(self, words: Sequence[str]) -> str:
        """The manual template text with the ``[T]`` slots filled by ``words`` in order."""
        parts = self.template_text.split(TRIGGER)
        return parts[0] + "".join(w + rest for w, rest in zip(words, parts[1:]))
