"""KnowledgeableVerbalizer: KPT (Hu et al. 2022, "Knowledgeable Prompt-tuning").

Each class gets a large label-word set (from a knowledge file, or expanded offline from the backbone's own
embedding neighbours), which the PLM itself refines before use:

    frequency refinement   drop words whose prior p~(v) = E_x[p(v | x)] over an unlabelled support set is
                           below a threshold (rare words are badly estimated by the PLM)
    relevance refinement   q^v = (p(v | x_1), ..., p(v | x_N)) over the support set; the class vector q^y is
                           that of the class's anchor word (its first word, the class name in KPT files);
                           r(v, y) = cos(q^v, q^y) * mean_{y' != y} 1 / cos(q^v, q^{y'})
                           (own-class similarity over the harmonic mean of the other classes'), words with
                           r < threshold (default 1) are dropped
    contextual calibration divide p(v | x) by the prior p~(v) (``set_calibration``; see calibration.py)
    learnable weights      label logit of class y = sum_v softmax_v(w_y / T) * log p(v | x)  (w = 0: the mean)

The word probabilities are those of ManualVerbalizer's pipeline (normalised over all label words).
Words shared by several classes are removed from all of them (as KPT does); words split into more than
``max_token_split`` sub-tokens are dropped. Refine before building the optimizer: refinement replaces the
weight parameter.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptdelta.errors import CheckpointError, MissingFileError, VerbalizerError
from promptdelta.prompts.registry import check_options, label_words_option, register_verbalizer
from promptdelta.prompts.verbalizer import LabelWords, ManualVerbalizer, normalise_label_words, tokenize_word
from promptdelta.utils.io import atomic_save_safetensors, atomic_write_json

logger = logging.getLogger(__name__)

CONFIG_NAME = "verbalizer.json"
WEIGHTS_NAME = "verbalizer.safetensors"


class KnowledgeableVerbalizer(ManualVerbalizer):
    """Many label words per class with refinement, calibration and learnable per-word weights.

    Args:
        tokenizer, classes, label_words, multi_token_handler, prefix: as ManualVerbalizer (default
            handler "mean", as KPT).
        max_token_split: drop words split into more sub-tokens than this (None keeps all).
        remove_shared: drop words that appear in more than one class.
        temperature: T in softmax(w / T) of the per-word weights.
    """

    def __init__(self, tokenizer: Any, classes: Sequence[str] | None = None, label_words: LabelWords = (),
                 multi_token_handler: str = "mean", prefix: str = " ", max_token_split: int | None = None,
                 remove_shared: bool = True, temperature: float = 1.0) -> None:
        classes, words = normalise_label_words(classes, label_words)
        words = [list(dict.fromkeys(w.strip() for w in ws)) for ws in words]           # dedupe, keep order
        if remove_shared:
            words = _drop_shared(words)
        words, ids = _tokenize_filtered(tokenizer, words, prefix, max_token_split)
        _check_not_empty(classes, words, "after removing shared and over-split words",
                         "add words, pass remove_shared=False or raise max_token_split")
        super().__init__(tokenizer, classes, words, multi_token_handler, prefix, token_ids=ids)
        self.max_token_split = max_token_split
        self.remove_shared = remove_shared
        self.temperature = float(temperature)
        self.label_word_weights = nn.Parameter(torch.zeros(self.word_mask.shape))      # (C, W)

    # ----------------------------------------------------------------------------------------- scoring
    def aggregate_words(self, log_probs: torch.Tensor) -> torch.Tensor:
        """(B, C, W) -> (B, C): sum_v softmax_v(w / T) log p(v | x), padded slots weigh 0."""
        w = (self.label_word_weights / self.temperature).masked_fill(~self.word_mask, float("-inf"))
        w = w.softmax(-1).to(log_probs.dtype)                                           # (C, W)
        return (log_probs.masked_fill(~self.word_mask, 0.0) * w).sum(-1)                # (B, C)

    # -------------------------------------------------------------------------------------- refinement
    def keep_words(self, keep: torch.Tensor, reason: str = "refinement") -> list[list[str]]:
        """Keep the words where ``keep`` (C, W) is True; returns the removed words of each class.

        Weights and calibration of kept words are kept. An emptied class raises VerbalizerError."""
        keep = keep.to(self.word_mask.device).bool() & self.word_mask
        words = [[w for j, w in enumerate(ws) if keep[c, j]] for c, ws in enumerate(self.label_words)]
        _check_not_empty(self.classes, words, f"after {reason}",
                         "lower the refinement threshold or add label words to that class")
        removed = [[w for j, w in enumerate(ws) if not keep[c, j]] for c, ws in enumerate(self.label_words)]
        ids = [[t for j, t in enumerate(ts) if keep[c, j]] for c, ts in enumerate(self.word_token_ids)]
        weights = _select(self.label_word_weights.detach(), keep, fill=0.0)
        calibration = None if self.calibration is None else _select(self.calibration, keep, fill=0.0)
        self._set_words(words, ids)
        self.label_word_weights = nn.Parameter(weights)
        self.calibration = calibration
        logger.info("%s removed %d label words: %s", reason, sum(map(len, removed)),
                    {c: r[:10] for c, r in zip(self.classes, removed) if r})
        return removed

    def refine_by_frequency(self, prior: torch.Tensor, threshold: float | None = None,
                            drop_frac: float | None = None) -> list[list[str]]:
        """Drop words with a low prior p~(v) (``prior``: (C, W) log-probs from ``contextual_prior``).

        Give exactly one of ``threshold`` (drop p~(v) < threshold) or ``drop_frac`` (drop that fraction
        of all words, lowest prior first). Returns the removed words of each class."""
        if (threshold is None) == (drop_frac is None):
            raise VerbalizerError("refine_by_frequency needs exactly one of threshold=... (a probability) "
                                  "or drop_frac=... (a fraction in [0, 1))")
        prior = self._check_word_tensor(prior, "prior")
        p = prior.exp().masked_fill(~self.word_mask, float("inf"))                     # (C, W)
        if threshold is not None:
            keep = p >= threshold
        else:
            if not 0.0 <= drop_frac < 1.0:
                raise VerbalizerError(f"drop_frac={drop_frac} must be in [0, 1); pass e.g. drop_frac=0.5")
            n_drop = int(drop_frac * int(self.word_mask.sum()))
            order = p.flatten().argsort()[:n_drop]
            keep = torch.ones_like(self.word_mask).flatten().index_fill(0, order, False).view_as(p)
        return self.keep_words(keep, "frequency refinement")

    def relevance_scores(self, word_log_probs: torch.Tensor) -> torch.Tensor:
        """r(v, y) (C, W) from support-set word log-probs (N, C, W); see the module docstring."""
        q = self._check_word_tensor(word_log_probs, "word_log_probs").exp()             # (N, C, W)
        q = q.masked_fill(~self.word_mask, 0.0).flatten(1).T.contiguous()                # (C*W, N)
        anchors = q.view(*self.word_mask.shape, -1)[:, 0]                               # (C, N)
        cos = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(anchors, dim=-1).T
        cos = cos.clamp(min=1e-12).view(*self.word_mask.shape, -1)                      # (C, W, C)
        own = torch.eye(self.num_classes, dtype=torch.bool, device=cos.device)[:, None, :]  # (C, 1, C)
        own_cos = cos.masked_fill(~own, 0.0).sum(-1)                                    # (C, W)
        inv_others = (1.0 / cos).masked_fill(own, 0.0).sum(-1) / max(self.num_classes - 1, 1)
        return own_cos * inv_others                                                     # (C, W)

    def refine_by_relevance(self, word_log_probs: torch.Tensor, threshold: float = 1.0) -> list[list[str]]:
        """Drop words whose relevance r(v, y) to their class is below ``threshold`` (anchors are kept)."""
        if self.num_classes < 2:
            raise VerbalizerError("relevance refinement compares classes and needs at least 2; skip it")
        keep = self.relevance_scores(word_log_probs) >= threshold
        keep[:, 0] = True                                                                # the anchor word
        return self.keep_words(keep, "relevance refinement")

    def _check_word_tensor(self, t: torch.Tensor, name: str) -> torch.Tensor:
        if tuple(t.shape[-2:]) != tuple(self.word_mask.shape):
            raise VerbalizerError(f"{name} has shape {tuple(t.shape)} but the verbalizer has (classes, words) "
                                  f"= {tuple(self.word_mask.shape)}; recompute it with this verbalizer after "
                                  f"the last refinement")
        return t.detach().to(self.word_mask.device).float()

    @classmethod
    def from_neighbours(cls, tokenizer: Any, backbone: Any, classes: Sequence[str],
                        seeds: Sequence[Sequence[str]], k: int = 20, min_similarity: float = 0.0,
                        **kwargs: Any) -> KnowledgeableVerbalizer:
        """Without a knowledge file: each class's seed words expanded by ``expand_label_words``."""
        words = expand_label_words(tokenizer, backbone, seeds, k, min_similarity, kwargs.get("prefix", " "))
        return cls(tokenizer, classes, words, **kwargs)

    # ---------------------------------------------------------------------------------- save and load
    def save(self, path: str | Path) -> Path:
        """Write ``verbalizer.json`` (classes, refined words, settings) and ``verbalizer.safetensors``
        (per-word weights, calibration) into the folder ``path``, atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"label_word_weights": self.label_word_weights}
        if self.calibration is not None:
            tensors["calibration"] = self.calibration
        atomic_save_safetensors(path / WEIGHTS_NAME, tensors)
        atomic_write_json(path / CONFIG_NAME, {
            "type": "knowledgeable", "classes": self.classes, "label_words": self.label_words,
            "multi_token_handler": self.multi_token_handler, "prefix": self.prefix,
            "max_token_split": self.max_token_split, "temperature": self.temperature})
        return path

    @classmethod
    def load(cls, path: str | Path, tokenizer: Any) -> KnowledgeableVerbalizer:
        """Rebuild a verbalizer written by ``save`` (same refined words, weights and calibration)."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise MissingFileError(f"{str(path)!r} holds no {CONFIG_NAME} + {WEIGHTS_NAME}; pass the folder "
                                   f"written by KnowledgeableVerbalizer.save")
        cfg = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        v = cls(tokenizer, cfg["classes"], cfg["label_words"], cfg["multi_token_handler"], cfg["prefix"],
                cfg["max_token_split"], remove_shared=False, temperature=cfg["temperature"])
        tensors = load_file(str(path / WEIGHTS_NAME))
        if tensors["label_word_weights"].shape != v.label_word_weights.shape:
            raise CheckpointError(f"{str(path)!r}: weights {tuple(tensors['label_word_weights'].shape)} do "
                                  f"not fit the words {tuple(v.label_word_weights.shape)}; load it with the "
                                  f"tokenizer it was saved with")
        with torch.no_grad():
            v.label_word_weights.copy_(tensors["label_word_weights"])
        v.set_calibration(tensors.get("calibration"))
        return v


# ------------------------------------------------------------------------------ neighbour expansion
def expand_label_words(tokenizer: Any, backbone: Any, seeds: Sequence[Sequence[str]], k: int = 20,
                       min_similarity: float = 0.0, prefix: str = " ") -> list[list[str]]:
    """Seed words + up to ``k`` new whole words per class, nearest by cosine over input embeddings.

    The class direction is the mean unit embedding of its seeds' tokens. A candidate token goes to the
    class it is closest to (so classes do not share words), must be similar by at least
    ``min_similarity``, and must be a whole word: alphabetic, and ``prefix + word`` tokenises back to
    exactly that one token (no "##" pieces, no BPE fragments, no special tokens)."""
    emb = torch.nn.functional.normalize(backbone.input_embeddings().weight.detach().float(), dim=-1)  # (V, H)
    seed_ids = [[i for w in ws for i in tokenize_word(tokenizer, w, prefix, warn=False)] for ws in seeds]
    centres = torch.nn.functional.normalize(torch.stack([emb[ids].mean(0) for ids in seed_ids]), dim=-1)
    sims = centres @ emb.T                                                              # (C, V)
    best = sims.argmax(0)                                                               # (V,)
    taken = {w.strip().lower() for ws in seeds for w in ws}
    special = set(getattr(tokenizer, "all_special_ids", []))
    out = []
    for c, ws in enumerate(seeds):
        found: list[str] = []
        for tid in sims[c].argsort(descending=True).tolist():
            if len(found) >= k or sims[c, tid] < min_similarity:
                break
            if best[tid] != c or tid in special:
                continue
            word = _whole_word(tokenizer, tid, prefix)
            if word is not None and word.lower() not in taken:
                taken.add(word.lower())
                found.append(word)
        out.append(list(ws) + found)
    return out


def _whole_word(tokenizer: Any, tid: int, prefix: str) -> str | None:
    """The word token ``tid`` stands for when it is a whole alphabetic word, else None."""
    word = tokenizer.decode([tid]).strip()
    if not word.isalpha():
        return None
    return word if list(tokenizer(prefix + word, add_special_tokens=False)["input_ids"]) == [tid] else None


# ------------------------------------------------------------------------------------------ helpers
def _drop_shared(words: list[list[str]]) -> list[list[str]]:
    """Remove words (case-insensitive) that occur in more than one class."""
    seen: dict[str, int] = {}
    for ws in words:
        for w in {w.lower() for w in ws}:
            seen[w] = seen.get(w, 0) + 1
    shared = {w for w, n in seen.items() if n > 1}
    if shared:
        logger.info("removed %d label words shared by several classes: %s", len(shared), sorted(shared)[:20])
    return [[w for w in ws if w.lower() not in shared] for ws in words]


def _tokenize_filtered(tokenizer: Any, words: list[list[str]], prefix: str, max_token_split: int | None
                       ) -> tuple[list[list[str]], list[list[list[int]]]]:
    """Token ids of every word; drops words over max_token_split; one summary warning for split words."""
    kept_words, kept_ids, split, dropped = [], [], [], []
    for ws in words:
        kw, ki = [], []
        for w in ws:
            ids = tokenize_word(tokenizer, w, prefix, warn=False)
            if max_token_split is not None and len(ids) > max_token_split:
                dropped.append(w)
                continue
            if len(ids) > 1:
                split.append(w)
            kw.append(w)
            ki.append(ids)
        kept_words.append(kw)
        kept_ids.append(ki)
    if split:
        logger.warning("%d label words are split into several tokens (e.g. %s); they are reduced by "
                       "multi_token_handler", len(split), split[:5])
    if dropped:
        logger.info("dropped %d label words split into more than %d tokens: %s", len(dropped),
                    max_token_split, dropped[:10])
    return kept_words, kept_ids


def _check_not_empty(classes: Sequence[str], words: list[list[str]], when: str, fix: str) -> None:
    empty = [c for c, ws in zip(classes, words) if not ws]
    if empty:
        raise VerbalizerError(f"class(es) {', '.join(map(repr, empty))} have no label words left {when}; {fix}")


def _select(t: torch.Tensor, keep: torch.Tensor, fill: float) -> torch.Tensor:
    """Compact the kept entries of each row of ``t`` (C, W) to the left -> (C, W')."""
    n = int(keep.sum(-1).max())
    out = torch.full((t.shape[0], n), fill, dtype=t.dtype, device=t.device)
    for c in range(t.shape[0]):
        row = t[c][keep[c]]
        out[c, :row.numel()] = row
    return out


def refine_with_support(clf: Any, support: Sequence[Any], threshold: float | None = None,
                        drop_frac: float | None = None, relevance_threshold: float | None = 1.0,
                        calibrate: bool = True, batch_size: int = 32) -> KnowledgeableVerbalizer:
    """KPT's pipeline on ``clf.verbalizer`` with an unlabelled support set: frequency refinement (when
    ``threshold`` or ``drop_frac`` is given), relevance refinement (unless ``relevance_threshold`` is
    None), then contextual calibration. Word probabilities are re-estimated after each removal."""
    from promptdelta.prompts.calibration import prior_from_log_probs, word_log_probs

    v = clf.verbalizer
    if not isinstance(v, KnowledgeableVerbalizer):
        raise VerbalizerError(f"refine_with_support needs a KnowledgeableVerbalizer, got {type(v).__name__}; "
                              f"build the model with one")
    v.set_calibration(None)
    if threshold is not None or drop_frac is not None:
        v.refine_by_frequency(prior_from_log_probs(word_log_probs(clf, support, batch_size)), threshold,
                              drop_frac)
    if relevance_threshold is not None:
        v.refine_by_relevance(word_log_probs(clf, support, batch_size), relevance_threshold)
    if calibrate:
        v.set_calibration(prior_from_log_probs(word_log_probs(clf, support, batch_size)))
    return v


# --- registry: how the builder makes a KnowledgeableVerbalizer, and the options a classifier folder rebuilds it from
def _build_kpt(tokenizer: Any, classes: list[str] | None, options: dict[str, Any],
               backbone: Any) -> KnowledgeableVerbalizer:
    words = label_words_option(options, tokenizer, classes)
    return KnowledgeableVerbalizer(tokenizer, classes=classes, label_words=words,
                                   **check_options("verbalizer", KnowledgeableVerbalizer, options))


def _export_kpt(v: KnowledgeableVerbalizer) -> dict[str, Any]:
    # the refined words, already without shared ones: removing shared words again could only drop more
    return {"label_words": v.label_words, "multi_token_handler": v.multi_token_handler, "prefix": v.prefix,
            "max_token_split": v.max_token_split, "remove_shared": False, "temperature": v.temperature}


register_verbalizer("kpt", KnowledgeableVerbalizer, _build_kpt, _export_kpt, config_keys=("label_words",))
