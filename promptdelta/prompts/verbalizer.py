"""Verbalizers: map the mask position's output to one score per class.

ManualVerbalizer (PET, Schick & Schuetze 2021) scores hand-picked label words. Its pipeline is spelt out
as named steps, after OpenPrompt's ``ManualVerbalizer.process_logits``:

    project   (B, V) or (B, H) -> (B, C, W, S)  scores of every sub-token of every label word
    reduce    (B, C, W, S) -> (B, C, W)         one score per word (multi_token_handler: first/mean/max)
    normalise (B, C, W) -> (B, C, W)            log-softmax over all label words of all classes
    calibrate (B, C, W) -> (B, C, W)            subtract a prior log p(word) when one is set
    aggregate (B, C, W) -> (B, C)               mean over the words of each class

Templates with several masks: the model hands a verbalizer hidden (B, M, H) and logits (B, M, V). A
one-mask verbalizer accepts M == 1 (squeezed) and raises VerbalizerError for M > 1. MultiMaskVerbalizer
holds one verbalizer (one label-word set) per mask and sums their class scores (PTR, Han et al. 2021):

    score(c) = sum_m weight_m * score_m(c)        with ManualVerbalizers: sum_m log p_m(word_m(c) | x)

i.e. the masks are treated as independent given the input and their word probabilities multiply.

SoftVerbalizer (WARP, Hambardzumyan et al. 2021) is a learnable head ``W h + b`` on the mask hidden
state, with row c of W initialised from the mean input embedding of class c's label-word tokens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptdelta.errors import VerbalizerError
from promptdelta.prompts.dsl import read_prompt_file
from promptdelta.prompts.registry import (build_verbalizer, check_options, label_words_option, need_backbone,
                                         register_verbalizer, verbalizer_spec)

logger = logging.getLogger(__name__)

LabelWords = Sequence[str | Sequence[str]] | Mapping[str, str | Sequence[str]]
HANDLERS = ("first", "mean", "max")
FILE_FORMATS = ('write one class per line with comma-separated words (.txt), or {"class": ["word", ...]} '
                '(.json)')


class Verbalizer(nn.Module):
    """Base verbalizer: ``classes``, ``num_classes``, ``process`` and a label check."""

    def __init__(self, classes: Sequence[str]) -> None:
        super().__init__()
        self.classes = [str(c) for c in classes]

    num_masks = 1            # masks in the template this verbalizer scores (MultiMaskVerbalizer: several)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def check_num_masks(self, n_masks: int) -> None:
        """Raise VerbalizerError when the template's mask count differs from this verbalizer's."""
        if n_masks != self.num_masks:
            raise VerbalizerError(
                f"the template has {n_masks} mask(s) but {type(self).__name__} scores {self.num_masks}; use a "
                f"template with {self.num_masks} mask(s), or MultiMaskVerbalizer with one label-word set per "
                f"mask (MultiMaskVerbalizer.from_label_words(tokenizer, classes, [words_mask1, ...]))")

    def single_mask(self, hidden: torch.Tensor | None, logits: torch.Tensor | None
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Accept (B, H)/(B, V), or (B, 1, H)/(B, 1, V) squeezed; (B, M>1, ...) -> VerbalizerError."""
        ref = logits if logits is not None else hidden
        if ref is not None and ref.dim() == 3:
            self.check_num_masks(ref.shape[1])
            hidden = None if hidden is None else hidden[:, 0]
            logits = None if logits is None else logits[:, 0]
        return hidden, logits

    def process(self, hidden: torch.Tensor, logits: torch.Tensor | None, backbone: Any) -> torch.Tensor:
        """hidden (B, H), logits (B, V) or None -> label logits (B, C)."""
        raise NotImplementedError

    def check_labels(self, examples: Sequence[Any], classes: Sequence[str] | None = None) -> None:
        """Raise VerbalizerError when the data's classes or labels do not fit this verbalizer."""
        classes = classes if classes is not None else getattr(examples, "classes", None)
        if classes and len(classes) != self.num_classes:
            raise VerbalizerError(f"the data has {len(classes)} classes ({', '.join(map(str, classes))}) but "
                                  f"the verbalizer has {self.num_classes} ({', '.join(self.classes)}); give "
                                  f"label words for exactly the data's classes, in the same order")
        for ex in examples:
            label = getattr(ex, "label", None)
            in_range = isinstance(label, numbers.Integral) and 0 <= label < self.num_classes
            if label is not None and not in_range:
                raise VerbalizerError(f"example {getattr(ex, 'guid', '')!r} has label {label!r} but the "
                                      f"verbalizer has {self.num_classes} classes (labels 0.."
                                      f"{self.num_classes - 1}); fix the labels or give label words for "
                                      f"every class")


class ManualVerbalizer(Verbalizer):
    """Score hand-picked label words at the mask (several words per class allowed).

    Args:
        tokenizer: the backbone's HF tokenizer.
        classes: class names; taken from ``label_words`` keys when it is a dict and classes is None.
        label_words: one str or list of str per class, or a dict class -> words.
        multi_token_handler: how a word split into sub-tokens is scored: "first", "mean" or "max".
        prefix: put before each word when tokenising (BPE tokenizers mark a word start by a space).
    """

    def __init__(self, tokenizer: Any, classes: Sequence[str] | None = None, label_words: LabelWords = (),
                 multi_token_handler: str = "first", prefix: str = " ",
                 token_ids: Sequence[Sequence[Sequence[int]]] | None = None) -> None:
        """``token_ids``: precomputed ids per class, word and sub-token (skips tokenisation and its
        warnings; subclasses that filter words pass them)."""
        if multi_token_handler not in HANDLERS:
            raise VerbalizerError(f"multi_token_handler={multi_token_handler!r} is unknown; use one of "
                                  f"{', '.join(HANDLERS)}")
        classes, words = normalise_label_words(classes, label_words)
        super().__init__(classes)
        self.multi_token_handler = multi_token_handler
        self.prefix = prefix
        self.calibration: torch.Tensor | None = None                        # (C, W) log p(word)
        self._logged_embedding_path = False
        self._word_mode = False
        if token_ids is None:
            token_ids = [[tokenize_word(tokenizer, w, prefix) for w in ws] for ws in words]
            check_label_word_ids(self.classes, words, token_ids, getattr(tokenizer, "unk_token_id", None))
        self._set_words(words, [[list(t) for t in ws] for ws in token_ids])

    def _set_words(self, words: list[list[str]], ids: list[list[list[int]]]) -> None:
        """(Re)build the padded id buffers from the words of each class and their token ids."""
        self.label_words = words
        self.word_token_ids = ids
        token_ids, token_mask = _pack(ids)
        device = self.token_ids.device if hasattr(self, "token_ids") else None
        self.register_buffer("token_ids", token_ids.to(device), persistent=False)       # (C, W, S)
        self.register_buffer("token_mask", token_mask.to(device), persistent=False)     # (C, W, S) bool
        self.register_buffer("word_mask", token_mask[..., 0].to(device), persistent=False)  # (C, W) bool

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: Any = None, classes: Sequence[str] | None = None,
                  choice: int = 0, **kwargs: Any) -> ManualVerbalizer:
        """Load label words from an OpenPrompt file: .json {class: [words]} (or a list of such dicts), or
        text with one class per line, comma-separated words, blank lines between alternatives.
        Text files carry no class names: without ``classes`` the first word of each line names it.
        Every VerbalizerError raised while loading names the file."""
        path = Path(path)
        text = read_prompt_file(path, "verbalizer", VerbalizerError, FILE_FORMATS)
        if path.suffix in (".json", ".jsonl"):
            label_words = _pick(_load_json_options(text, path), choice, path)
            classes = list(label_words) if classes is None else classes
        else:
            label_words = _pick(_load_text_options(text, path), choice, path)
            classes = [ws[0] for ws in label_words] if classes is None else classes
        try:
            return cls(tokenizer, classes=classes, label_words=label_words, **kwargs)
        except VerbalizerError as err:
            raise VerbalizerError(f"{str(path)!r} (choice={choice}): {err}") from None

    def set_calibration(self, log_probs: torch.Tensor | None) -> None:
        """Set a prior log p(word) (C, W), e.g. the verbalizer's output on a content-free input."""
        self.calibration = None if log_probs is None else log_probs.detach()

    @contextlib.contextmanager
    def word_log_prob_mode(self) -> Iterator[None]:
        """While active, calibrate() is the identity and aggregate() returns the uncalibrated word
        log-probs flattened to (B, C*W): the model's forward then yields them (for priors, refinement)."""
        self._word_mode = True
        try:
            yield
        finally:
            self._word_mode = False

    def process(self, hidden: torch.Tensor, logits: torch.Tensor | None, backbone: Any) -> torch.Tensor:
        """hidden (B, H), logits (B, V) or None -> label logits (B, C) (mean log-prob of the words).

        (B, 1, H)/(B, 1, V) from a one-mask template are accepted; more masks raise VerbalizerError."""
        hidden, logits = self.single_mask(hidden, logits)
        scores = self.project(hidden, logits, backbone)        # (B, C, W, S)
        word_scores = self.reduce(scores)                      # (B, C, W)
        log_probs = self.normalise(word_scores)                # (B, C, W)
        log_probs = self.calibrate(log_probs)                  # (B, C, W)
        return self.aggregate(log_probs)                       # (B, C)

    def project(self, hidden: torch.Tensor, logits: torch.Tensor | None, backbone: Any) -> torch.Tensor:
        """Scores of every label-word token: from the MLM logits, else hidden @ E^T (tied embeddings)."""
        if logits is not None:
            return logits[:, self.token_ids]                                  # (B, C, W, S)
        if not self._logged_embedding_path:
            logger.info("backbone has no MLM head: label words are scored through the input embeddings "
                        "(hidden @ E^T)")
            self._logged_embedding_path = True
        emb = backbone.input_embeddings().weight[self.token_ids]              # (C, W, S, H)
        return torch.einsum("bh,cwsh->bcws", hidden, emb.to(hidden.dtype))    # (B, C, W, S)

    def reduce(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, C, W, S) -> (B, C, W) per multi_token_handler, ignoring padded sub-token slots."""
        if self.multi_token_handler == "first":
            return scores[..., 0]
        mask = self.token_mask.expand_as(scores)
        if self.multi_token_handler == "max":
            return scores.masked_fill(~mask, float("-inf")).amax(-1)
        return (scores * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    def normalise(self, word_scores: torch.Tensor) -> torch.Tensor:
        """Log-softmax over every label word of every class; padded word slots get -inf."""
        b, c, w = word_scores.shape
        masked = word_scores.masked_fill(~self.word_mask, float("-inf"))
        return masked.reshape(b, c * w).log_softmax(-1).reshape(b, c, w)

    def calibrate(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Divide by the prior p(word) when set (Zhao et al. 2021, contextual calibration), renormalise."""
        if self.calibration is None or self._word_mode:
            return log_probs
        b, c, w = log_probs.shape
        shifted = (log_probs - self.calibration.to(log_probs)).masked_fill(~self.word_mask, float("-inf"))
        return shifted.reshape(b, c * w).log_softmax(-1).reshape(b, c, w)

    def aggregate(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Mean over the words of each class: (B, C, W) -> (B, C) (in word_log_prob_mode: (B, C*W))."""
        if self._word_mode:
            return log_probs.flatten(1)
        return self.aggregate_words(log_probs)

    def aggregate_words(self, log_probs: torch.Tensor) -> torch.Tensor:
        """(B, C, W) -> (B, C): the plain mean of each class's word log-probs (subclasses weight them)."""
        kept = log_probs.masked_fill(~self.word_mask, 0.0)
        return kept.sum(-1) / self.word_mask.sum(-1)


class SoftVerbalizer(Verbalizer):
    """WARP head: label logits = W h + b, W[c] = mean input embedding of class c's label-word tokens."""

    def __init__(self, tokenizer: Any, classes: Sequence[str] | None, label_words: LabelWords,
                 backbone: Any, prefix: str = " ") -> None:
        classes, words = normalise_label_words(classes, label_words)
        super().__init__(classes)
        self.label_words = words
        emb = backbone.input_embeddings().weight.detach()                    # (V, H)
        self.head = nn.Linear(emb.shape[1], len(classes), device=emb.device, dtype=emb.dtype)
        word_ids = [[tokenize_word(tokenizer, w, prefix, warn=False) for w in ws] for ws in words]
        check_label_word_ids(self.classes, words, word_ids, getattr(tokenizer, "unk_token_id", None))
        with torch.no_grad():
            for c, ws in enumerate(word_ids):
                ids = [i for t in ws for i in t]
                self.head.weight[c] = emb[ids].mean(0)
            self.head.bias.zero_()

    def process(self, hidden: torch.Tensor, logits: torch.Tensor | None, backbone: Any) -> torch.Tensor:
        hidden, _ = self.single_mask(hidden, logits)
        return self.head(hidden.to(self.head.weight.dtype))                   # (B, C)


class MultiMaskVerbalizer(Verbalizer):
    """One verbalizer per mask of the template; class scores are summed over masks (PTR, Han et al. 2021).

    ``score(c) = sum_m weights[m] * verbalizers[m].process(hidden[:, m], logits[:, m])[c]``; with
    ManualVerbalizers of one word per class that is ``log prod_m p(word_m(c) | mask m)``.
    """

    def __init__(self, verbalizers: Sequence[Verbalizer], weights: Sequence[float] | None = None) -> None:
        if len(verbalizers) < 2:
            raise VerbalizerError(f"MultiMaskVerbalizer needs one verbalizer per mask (at least 2), got "
                                  f"{len(verbalizers)}; for one mask use the verbalizer itself")
        classes = verbalizers[0].classes
        for m, v in enumerate(verbalizers):
            if v.classes != classes:
                raise VerbalizerError(f"verbalizer for mask {m} has classes {v.classes} but mask 0 has "
                                      f"{classes}; give every mask the same classes in the same order")
        weights = [1.0] * len(verbalizers) if weights is None else [float(w) for w in weights]
        if len(weights) != len(verbalizers):
            raise VerbalizerError(f"{len(weights)} weights for {len(verbalizers)} masks; give one per mask")
        super().__init__(classes)
        self.verbalizers = nn.ModuleList(verbalizers)
        self.weights = weights
        self.num_masks = len(verbalizers)

    @classmethod
    def from_label_words(cls, tokenizer: Any, classes: Sequence[str] | None,
                         label_words_per_mask: Sequence[LabelWords], weights: Sequence[float] | None = None,
                         **kwargs: Any) -> MultiMaskVerbalizer:
        """One ManualVerbalizer per mask from ``label_words_per_mask[m]`` (kwargs go to each)."""
        return cls([ManualVerbalizer(tokenizer, classes, lw, **kwargs) for lw in label_words_per_mask], weights)

    def process(self, hidden: torch.Tensor | None, logits: torch.Tensor | None, backbone: Any) -> torch.Tensor:
        """hidden (B, M, H), logits (B, M, V) or None -> summed label logits (B, C)."""
        ref = logits if logits is not None else hidden
        self.check_num_masks(ref.shape[1] if ref is not None and ref.dim() == 3 else 1)
        total = 0.0
        for m, (v, w) in enumerate(zip(self.verbalizers, self.weights)):
            h_m = None if hidden is None else hidden[:, m]                   # (B, H)
            l_m = None if logits is None else logits[:, m]                   # (B, V)
            total = total + w * v.process(h_m, l_m, backbone)                # (B, C)
        return total


def normalise_label_words(classes: Sequence[str] | None,
                          label_words: LabelWords) -> tuple[list[str], list[list[str]]]:
    """-> (classes, words per class); raise VerbalizerError on a count mismatch or an empty class."""
    if isinstance(label_words, Mapping):
        if classes is None:
            classes = list(label_words)
        missing = [c for c in classes if c not in label_words]
        if missing:
            raise VerbalizerError(f"no label words for class(es) {', '.join(map(str, missing))}; add them to "
                                  f"label_words (it has {', '.join(map(str, label_words))})")
        label_words = [label_words[c] for c in classes]
    words = [[w] if isinstance(w, str) else list(w) for w in label_words]
    if classes is None:
        raise VerbalizerError("classes is required when label_words is a list; pass classes=[...] or a "
                              "dict {class: words}")
    if len(classes) == 0:
        raise VerbalizerError("no classes: give label words for at least one class (a verbalizer scores one "
                              "or more classes), e.g. {\"negative\": [\"bad\"], \"positive\": [\"good\"]}")
    if len(words) != len(classes):
        raise VerbalizerError(f"{len(classes)} classes but label words for {len(words)}; give one word or "
                              f"list of words per class, in the order of classes")
    for c, ws in zip(classes, words):
        if not ws or not all(isinstance(w, str) and w.strip() for w in ws):
            raise VerbalizerError(f"class {c!r} has no usable label words ({ws!r}); give at least one "
                                  f"non-empty word per class")
    return list(map(str, classes)), words


def check_label_word_ids(classes: Sequence[str], words: Sequence[Sequence[str]],
                         ids: Sequence[Sequence[Sequence[int]]], unk_id: int | None) -> None:
    """Label words the model cannot use: a class whose every word is the unknown token, or two classes with
    the same words, is a VerbalizerError (it could never be predicted apart); a single such word warns."""
    unknown = [[w for w, t in zip(ws, ts) if unk_id is not None and unk_id in t] for ws, ts in zip(words, ids)]
    for c, ws, bad in zip(classes, words, unknown):
        if bad and len(bad) == len(ws):
            raise VerbalizerError(f"every label word of class {c!r} ({bad}) is the unknown token to this "
                                  "tokenizer, so the class can never be scored; choose words in its vocabulary")
        if bad:
            logger.warning("label word(s) %s of class %r are the unknown token to this tokenizer; they score "
                           "like any unknown word: replace them", bad, c)
    sets = [frozenset(map(tuple, ts)) for ts in ids]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            if sets[i] == sets[j]:
                raise VerbalizerError(f"classes {classes[i]!r} and {classes[j]!r} have the same label words "
                                      f"({list(words[i])}), so they can never be told apart; give each class "
                                      "its own words")
            shared = sets[i] & sets[j]
            if shared:
                logger.warning("classes %r and %r share label word(s) %s; a shared word scores for both",
                               classes[i], classes[j], [w for w, t in zip(words[i], ids[i]) if tuple(t) in shared])


def tokenize_word(tokenizer: Any, word: str, prefix: str = " ", warn: bool = True) -> list[int]:
    """Token ids of one label word (with the prefix, lower-cased for lower-casing tokenizers)."""
    word = word.strip()
    if getattr(tokenizer, "do_lower_case", False):
        word = word.lower()
    ids = list(tokenizer(prefix + word, add_special_tokens=False)["input_ids"])
    if not ids:
        raise VerbalizerError(f"label word {word!r} tokenises to nothing; choose another word")
    if warn and len(ids) > 1:
        logger.warning("label word %r is split into %d tokens %s; they are reduced by multi_token_handler",
                       word, len(ids), tokenizer.convert_ids_to_tokens(ids))
    return ids


def _pack(ids: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Nested ids (class, word, sub-token) -> padded (C, W, S) ids and a bool mask of real slots."""
    n_words = max(len(ws) for ws in ids)
    n_sub = max(len(t) for ws in ids for t in ws)
    token_ids = torch.zeros((len(ids), n_words, n_sub), dtype=torch.long)
    token_mask = torch.zeros((len(ids), n_words, n_sub), dtype=torch.bool)
    for c, ws in enumerate(ids):
        for w, toks in enumerate(ws):
            token_ids[c, w, :len(toks)] = torch.tensor(toks)
            token_mask[c, w, :len(toks)] = True
    return token_ids, token_mask


def _load_json_options(text: str, path: Path) -> list[dict[str, Any]]:
    """A JSON verbalizer file: {class: words} or a list of such dicts (alternatives); .jsonl: one a line."""
    try:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            if path.suffix != ".jsonl":
                raise
            data = [json.loads(line) for line in text.splitlines() if line.strip()]   # one object a line
    except json.JSONDecodeError as err:
        raise VerbalizerError(f"{str(path)!r} is not valid JSON ({err.msg} at line {err.lineno}); write "
                              f'{{"class": ["word", ...], ...}}') from None
    options = [data] if isinstance(data, dict) else data
    if not isinstance(options, list) or not options or not all(isinstance(o, dict) for o in options):
        raise VerbalizerError(f"{str(path)!r} must hold {{class: [words]}} or a non-empty list of such objects; "
                              f"rewrite it in that shape")
    for i, option in enumerate(options):
        if not option:
            raise VerbalizerError(f"verbalizer {i} of {str(path)!r} has no classes ({{}}); write "
                                  f'{{"class": ["word", ...], ...}} with one entry per class')
        for c, words in option.items():
            ok = isinstance(words, str) or (isinstance(words, list) and all(isinstance(w, str) for w in words))
            if not ok:
                raise VerbalizerError(f"class {c!r} of verbalizer {i} in {str(path)!r} has label words "
                                      f"{words!r}; give a word or a list of words (strings)")
    return options


def _load_text_options(text: str, path: Path) -> list[list[list[str]]]:
    """A text verbalizer file: one class per line, comma-separated words; a blank line ends an alternative."""
    options: list[list[list[str]]] = []
    block: list[list[str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if block:
                options.append(block)
            block = []
            continue
        words = [w.strip() for w in line.split(",") if w.strip()]
        if not words:
            raise VerbalizerError(f"line {n} of {str(path)!r} has no label words ({line.strip()!r}); write the "
                                  f"words of one class per line, comma-separated, or delete the line")
        block.append(words)
    if block:
        options.append(block)
    return options


def _pick(options: list[Any], choice: int, path: Path) -> Any:
    """Option number ``choice`` of the alternatives in a verbalizer file."""
    if not options:
        raise VerbalizerError(f"{str(path)!r} holds no label words; {FILE_FORMATS}")
    if isinstance(choice, bool) or not isinstance(choice, int) or not 0 <= choice < len(options):
        raise VerbalizerError(f"choice={choice!r} but {str(path)!r} has {len(options)} verbalizer(s); pass "
                              f"choice in 0..{len(options) - 1}")
    return options[choice]


# --- registry: how the builder makes these verbalizers, and the options a classifier folder rebuilds them from ---
def _build_manual(tokenizer: Any, classes: list[str] | None, options: dict[str, Any],
                  backbone: Any) -> ManualVerbalizer:
    words = label_words_option(options, tokenizer, classes)
    return ManualVerbalizer(tokenizer, classes=classes, label_words=words,
                            **check_options("verbalizer", ManualVerbalizer, options))


def _export_manual(v: ManualVerbalizer) -> dict[str, Any]:
    return {"label_words": v.label_words, "multi_token_handler": v.multi_token_handler, "prefix": v.prefix}


def _build_soft(tokenizer: Any, classes: list[str] | None, options: dict[str, Any], backbone: Any) -> SoftVerbalizer:
    words = label_words_option(options, tokenizer, classes)
    backbone = need_backbone(backbone, "soft verbalizer")
    return SoftVerbalizer(tokenizer, classes=classes, label_words=words, backbone=backbone,
                          **check_options("verbalizer", SoftVerbalizer, options))


def _build_multi_mask(tokenizer: Any, classes: list[str] | None, options: dict[str, Any],
                      backbone: Any) -> MultiMaskVerbalizer:
    """``verbalizers``: one {"kind", "options"} per mask, or ``label_words``: one label-word set per mask
    (ManualVerbalizers; the other options, e.g. multi_token_handler, go to each)."""
    weights, parts = options.pop("weights", None), options.pop("verbalizers", None)
    if parts is None:
        per_mask = options.pop("label_words", None)
        if not isinstance(per_mask, (list, tuple)) or len(per_mask) < 2:
            raise VerbalizerError(f"multi_mask needs label_words with one label-word set per mask (at least 2), "
                                  f"got {per_mask!r}; e.g. label_words=[[['bad'], ['good']], [['no'], ['yes']]]")
        parts = [{"kind": "manual", "options": {**options, "label_words": lw}} for lw in per_mask]
    elif options:
        raise VerbalizerError(f"multi_mask options {sorted(options)} are not used with verbalizers=[...]; put them "
                              f"in each verbalizer's options")
    return MultiMaskVerbalizer([build_verbalizer(p["kind"], tokenizer, classes, p.get("options"), backbone)
                                for p in parts], weights)


register_verbalizer("manual", ManualVerbalizer, _build_manual, _export_manual,
                    config_keys=("label_words", "multi_token_handler"))
register_verbalizer("soft", SoftVerbalizer, _build_soft, lambda v: {"label_words": v.label_words},
                    config_keys=("label_words",))
register_verbalizer("multi_mask", MultiMaskVerbalizer, _build_multi_mask,
                    lambda v: {"verbalizers": [verbalizer_spec(m) for m in v.verbalizers], "weights": v.weights},
                    config_keys=("label_words", "multi_token_handler"))
