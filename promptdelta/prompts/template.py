"""Templates: wrap an example into text pieces with a mask, and tokenise a batch of them.

``ManualTemplate`` is a hand-written prompt (Schick & Schuetze 2021, PET), e.g.
``{"placeholder":"text_a"} It was {"mask"}.``. Tokenisation is one batched call of the fast tokenizer over
the example-dependent pieces (placeholders, meta) of every example, then per-example assembly, truncation
of the shortenable pieces only, the tokenizer's own special tokens, and dynamic padding to the longest row.

Speed (``promptdelta bench data``): the template's own words are the same in every row, so their ids are
cached on the template (keyed by the exact text, post-processing applied) instead of re-tokenised per
example; a fast tokenizer's Rust backend is called directly (``encode_texts``), skipping the per-string
BatchEncoding bookkeeping of ``tokenizer(...)``; padding builds each tensor in one call. Every piece is
still tokenised on its own, so the ids are exactly those of one ``tokenizer(text, add_special_tokens=False)``
call per piece, batched or not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from promptdelta.errors import TemplateError
from promptdelta.prompts.dsl import POST_PROCESSING, Piece, parse_template, read_template_line
from promptdelta.prompts.registry import register_template, template_text

logger = logging.getLogger(__name__)

# the safe named operations live in dsl.py (with the OpenPrompt lambda texts they stand for)
BUILTIN_POST_PROCESSING: dict[str, Callable[[str], str]] = POST_PROCESSING
_VARYING_KINDS = ("placeholder", "meta")          # pieces whose text depends on the example
_UNSUPPORTED = "soft tokens (soft, duplicate, same) need MixedTemplate, not ManualTemplate"


@dataclass
class _Segment:
    ids: list[int]
    shortenable: bool
    is_mask: bool = False


class Template(nn.Module):
    """Base template: subclasses define ``wrap``; the batch tokenisation is shared.

    A template is an ``nn.Module`` so that it can own parameters (soft tokens) later.
    """

    pieces: list[Piece]

    def __init__(self, tokenizer: Any, kind: str | None = None) -> None:
        super().__init__()
        if tokenizer is None:
            raise TemplateError("a template needs a tokenizer; pass tokenizer=... (the one returned by "
                                "pd.load_backbone)")
        self.tokenizer = tokenizer
        # family hook: how the mask is written depends on the backbone kind (see "Backbone kinds" below)
        self.kind = infer_kind(tokenizer) if kind is None else check_kind(kind, tokenizer)
        self.mask_token, self._mask_ids = _mask_for_kind(tokenizer, self.kind)
        self._prefix, self._suffix = _special_frame(tokenizer, self.kind, self.mask_token)
        self._text_ids: dict[str, list[int]] = {}    # ids of the template's constant text pieces, by text

    @property
    def num_special_tokens(self) -> int:
        return len(self._prefix) + len(self._suffix)

    def wrap(self, example: Any) -> list[tuple[str, Piece]]:
        """The text of every piece for one example (mask as the mask token string)."""
        raise NotImplementedError

    def soft_markers(self, piece: Piece) -> list[int]:
        """Marker ids ``-1 - slot`` reserving a soft piece's positions (soft templates override this);
        tokenize() turns them into ``soft_pos``/``soft_ids`` (B, S) and a pad id."""
        raise TemplateError(f"{type(self).__name__} has no soft tokens (column {piece.column}); use "
                            f"MixedTemplate, SoftTemplate or PtuningTemplate for soft pieces")

    def process_embeds(self, inputs_embeds: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Hook for soft tokens; identity here. (B, T, H) -> (B, T, H)."""
        return inputs_embeds

    def tokenize(self, examples: Sequence[Any], max_length: int = 256) -> dict[str, torch.Tensor]:
        """Tokenise a batch: input_ids, attention_mask, token_type_ids (B, T), mask_pos (B, n_masks),
        and labels (B,) when every example has a label."""
        if not isinstance(max_length, int) or max_length <= 0:
            raise TemplateError(f"max_length must be a positive int, got {max_length!r}; pass e.g. "
                                f"max_length=256")
        if len(examples) == 0:
            raise TemplateError("tokenize() got no examples; pass a non-empty list of InputExample")
        rows = self._segments([self.wrap(e) for e in examples])
        budget = max_length - self.num_special_tokens
        ids, mask_pos = [], []
        for segments in rows:
            _truncate(segments, budget, max_length, self.num_special_tokens)
            row, masks = self._assemble(segments)
            ids.append(row)
            mask_pos.append(masks)
        batch = self._pad(ids)
        batch.update(_take_soft_slots(batch["input_ids"], self.tokenizer.pad_token_id or 0))  # soft hook
        batch["mask_pos"] = torch.tensor(mask_pos, dtype=torch.long)          # (B, n_masks)
        labels = [getattr(e, "label", None) for e in examples]
        if all(label is not None for label in labels):
            batch["labels"] = torch.tensor(labels, dtype=torch.long)          # (B,)
        return batch

    def _segments(self, wrapped: list[list[tuple[str, Piece]]]) -> list[list[_Segment]]:
        """One batched tokenizer call over the example-dependent pieces of all examples; the template's
        text pieces come from ``_text_ids`` (tokenised on first sight)."""
        cache = self._text_ids
        new = list(dict.fromkeys(text for row in wrapped for text, piece in row
                                 if piece.kind == "text" and text not in cache))
        varying = [text for row in wrapped for text, piece in row if piece.kind in _VARYING_KINDS]
        ids = encode_texts(self.tokenizer, new + varying)
        cache.update(zip(new, ids[:len(new)]))
        encoded = iter(ids[len(new):])
        rows = []
        for row in wrapped:
            segments = []
            for text, piece in row:
                if piece.kind in _VARYING_KINDS:
                    segments.append(_Segment(next(encoded), piece.shortenable))
                elif piece.kind == "text":        # never shortenable, so the cached list is not cut
                    segments.append(_Segment(cache[text], False))
                elif piece.kind == "soft":  # soft hook: marker ids, replaced in tokenize()
                    segments.append(_Segment(self.soft_markers(piece), False))
                elif piece.kind == "mask":
                    segments.append(_Segment(self._mask_ids, False, is_mask=True))
                else:  # special
                    segments.append(_Segment([self.tokenizer.convert_tokens_to_ids(text)], False))
            rows.append(segments)
        return rows

    def _assemble(self, segments: list[_Segment]) -> tuple[list[int], list[int]]:
        """Concatenate segments inside the special-token frame; return ids and mask positions."""
        ids, masks = list(self._prefix), []
        for seg in segments:
            if seg.is_mask:
                masks.append(_mask_position(len(ids), self.kind))
            ids.extend(seg.ids)
        ids.extend(self._suffix)
        return ids, masks

    def _pad(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pad every row to the longest one in the batch (one flat list -> numpy -> tensor: about 6x
        faster than one torch.tensor per row)."""
        pad_id = self.tokenizer.pad_token_id
        pad_id = 0 if pad_id is None else pad_id
        width = max(len(r) for r in rows)
        flat: list[int] = []
        for r in rows:
            flat += r
            flat += [pad_id] * (width - len(r))
        input_ids = torch.from_numpy(np.array(flat, dtype=np.int64)).view(len(rows), width)      # (B, T)
        lengths = torch.tensor([len(r) for r in rows])                                           # (B,)
        attention_mask = (torch.arange(width) < lengths[:, None]).long()                         # (B, T)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": torch.zeros_like(input_ids)}


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False)["input_ids"]`` as lists, faster for fast tokenizers.

    When the tokenizer is a plain transformers fast tokenizer (its ``__call__``/``_encode_plus`` not
    overridden), its Rust backend encodes the batch directly (``encode_batch_fast``: no offsets), after
    turning off any truncation/padding left on the backend, as transformers itself does before a call
    without truncation or padding. Anything else goes through ``tokenizer(...)``. Same ids either way."""
    if not texts:
        return []
    backend = _plain_backend(tokenizer)
    if backend is None:
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def _plain_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer behind a transformers fast tokenizer whose call is the stock one, else None."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend as Fast
    except ImportError:                                   # transformers 4: PreTrainedTokenizerFast
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    cls = type(tokenizer)
    stock = (isinstance(tokenizer, Fast) and cls.__call__ is PreTrainedTokenizerBase.__call__
             and cls._encode_plus is Fast._encode_plus)
    if not stock or backend is None or not hasattr(backend, "encode_batch"):
        return None
    if bool(backend.encode_special_tokens) != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return backend


class ManualTemplate(Template):
    """A hand-written template in OpenPrompt's text format.

    Args:
        text: e.g. ``'{"placeholder":"text_a"} It was {"mask"}.'``
        tokenizer: the backbone's HF tokenizer.
        post_processing: extra named functions for ``{"post_processing": "name"}`` pieces (the name may
            be the exact lambda text of an OpenPrompt file; it is looked up, never evaluated).
        kind: "mlm", "clm" or "seq2seq" (the backbone's ``model.kind``); None guesses it from the
            tokenizer (mask token -> mlm, ``<extra_id_0>`` -> seq2seq, else clm).
    """

    def __init__(self, text: str, tokenizer: Any,
                 post_processing: Mapping[str, Callable[[str], str]] | None = None,
                 kind: str | None = None) -> None:
        super().__init__(tokenizer, kind=kind)
        self.text = text
        self.pieces = parse_template(text)
        check_mask_placement(self.pieces, self.kind, text)
        self.post_processing = {**BUILTIN_POST_PROCESSING, **(post_processing or {})}
        self._specials = {i: self._resolve_special(p) for i, p in enumerate(self.pieces)
                          if p.kind == "special"}
        for piece in self.pieces:
            self._check_piece(piece)

    @classmethod
    def from_file(cls, path: str | Path, choice: int = 0, tokenizer: Any = None,
                  post_processing: Mapping[str, Callable[[str], str]] | None = None,
                  kind: str | None = None) -> ManualTemplate:
        """Load template number ``choice`` from an OpenPrompt template file (one per line)."""
        return cls(read_template_line(path, choice), tokenizer=tokenizer, post_processing=post_processing,
                   kind=kind)

    def wrap(self, example: Any) -> list[tuple[str, Piece]]:
        """[(text, piece)] for one example; text carries a leading space where the template has one."""
        out = []
        for i, piece in enumerate(self.pieces):
            if piece.kind == "mask":
                out.append((self.mask_token, piece))
            elif piece.kind == "special":
                out.append((self._specials[i], piece))
            else:
                text = self._piece_text(piece, example)
                out.append(((" " + text) if piece.space_before and text else text, piece))
        return out

    def _piece_text(self, piece: Piece, example: Any) -> str:
        if piece.kind == "text":
            text = piece.value
        elif piece.kind == "placeholder":
            text = _placeholder_text(example, piece.value)
        else:
            text = _meta_text(example, piece.value)
        if piece.post_processing is not None:
            text = self.post_processing[piece.post_processing](text)
        return text

    def _check_piece(self, piece: Piece) -> None:
        where = f"(column {piece.column} of {self.text!r})"
        if piece.kind == "soft" or piece.duplicate is not None or piece.same is not None:
            raise TemplateError(f"{_UNSUPPORTED} {where}; write the words as plain text instead")
        name = piece.post_processing
        if name is not None and name not in self.post_processing:
            raise TemplateError(f"post_processing {name!r} {where} is not a registered function (it is never "
                                f"evaluated); use one of {', '.join(BUILTIN_POST_PROCESSING)} or pass "
                                f"ManualTemplate(..., post_processing={{{name!r}: your_function}})")

    def _resolve_special(self, piece: Piece) -> str:
        """'<sep>'-style aliases or a literal special token -> the tokenizer's token string."""
        tok = self.tokenizer
        aliases = {"<cls>": tok.cls_token, "<sep>": tok.sep_token, "<eos>": tok.eos_token or tok.sep_token,
                   "<bos>": tok.bos_token or tok.cls_token, "<pad>": tok.pad_token, "<unk>": tok.unk_token}
        token = aliases.get(piece.value, piece.value)
        if token is None or (token != tok.unk_token and tok.convert_tokens_to_ids(token) == tok.unk_token_id):
            raise TemplateError(f"special token {piece.value!r} (column {piece.column}) is not in the "
                                f"tokenizer's vocabulary; use a token it has (e.g. {tok.sep_token!r}) or one "
                                f"of {', '.join(aliases)}")
        return token


def _placeholder_text(example: Any, name: str) -> str:
    """text_a -> example.text (or .text_a); text_b -> example.text_b, "" when the example has none.

    A missing text_b is empty text, as in OpenPrompt, whose templates for one-text tasks (e.g. AG News)
    often write ``{"placeholder":"text_b"}`` after text_a; a missing text_a is an error."""
    value = getattr(example, "text", None) if name == "text_a" else None
    value = getattr(example, name, None) if value is None else value
    if value is None and name == "text_b":
        return ""
    if value is None:
        guid = getattr(example, "guid", "")
        raise TemplateError(f'the template uses {{"placeholder":"text_a"}} but example {guid!r} has no text; '
                            f"fill it in or use a template without that placeholder")
    return str(value).strip()


def _meta_text(example: Any, key: str) -> str:
    meta = getattr(example, "meta", None) or {}
    if key not in meta:
        guid = getattr(example, "guid", "")
        raise TemplateError(f'the template uses {{"meta":"{key}"}} but example {guid!r} has no meta key '
                            f"{key!r} (it has: {', '.join(map(str, meta)) or 'none'}); add "
                            f"meta={{{key!r}: ...}} to every example")
    return str(meta[key]).strip()


def _take_soft_slots(input_ids: torch.Tensor, fill_id: int) -> dict[str, torch.Tensor]:
    """Soft hook: negative marker ids (-1 - slot) -> soft_pos, soft_ids (B, S); markers become fill_id."""
    is_soft = input_ids < 0                                                     # (B, T)
    if not bool(is_soft.any()):
        return {}
    b = input_ids.shape[0]
    soft_pos = is_soft.nonzero()[:, 1].reshape(b, -1)                           # (B, S), same S per row
    soft_ids = (-1 - input_ids[is_soft]).reshape(b, -1)                         # (B, S)
    input_ids[is_soft] = fill_id
    return {"soft_pos": soft_pos, "soft_ids": soft_ids}


def _truncate(segments: list[_Segment], budget: int, max_length: int, n_special: int) -> None:
    """Cut tokens from the end of the longest shortenable segment until the row fits the budget."""
    fixed = sum(len(s.ids) for s in segments if not s.shortenable)
    if fixed > budget:
        raise TemplateError(f"max_length={max_length} is too small: the template words, mask and special "
                            f"tokens alone need {fixed + n_special} tokens; raise max_length to at least "
                            f"{fixed + n_special} or shorten the template")
    excess = sum(len(s.ids) for s in segments) - budget
    while excess > 0:
        cands = [s for s in segments if s.shortenable and s.ids]
        longest = max(cands, key=lambda s: len(s.ids))
        runner_up = max((len(s.ids) for s in cands if s is not longest), default=0)
        cut = min(excess, max(1, len(longest.ids) - runner_up))
        del longest.ids[len(longest.ids) - cut:]
        excess -= cut


# --- Backbone kinds (family hook) ---------------------------------------------------------------------
# mlm:     the mask is the tokenizer's mask token, anywhere; mask_pos points at it.
# clm:     the mask takes no token and must end the template; mask_pos points at the last token before it,
#          whose next-token output predicts the label word (GPT-2 has no mask token).
# seq2seq: the mask is the T5 sentinel <extra_id_0> in the encoder input; mask_pos points at the sentinel
#          (label words are scored in the decoder after it, see PromptForClassification).
KINDS = ("mlm", "clm", "seq2seq")
SENTINEL = "<extra_id_0>"


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of a single token string, or None when the tokenizer does not know it."""
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    return None if tid is None or (tid == unk and token != getattr(tokenizer, "unk_token", None)) else tid


def infer_kind(tokenizer: Any) -> str:
    """Guess the backbone kind from the tokenizer: a mask token -> mlm, a T5 sentinel -> seq2seq, else clm."""
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return "mlm"
    return "seq2seq" if _token_id(tokenizer, SENTINEL) is not None else "clm"


def check_kind(kind: str, tokenizer: Any) -> str:
    """Validate an explicit kind against the tokenizer."""
    if kind not in KINDS:
        raise TemplateError(f"kind={kind!r} is unknown; use one of {', '.join(KINDS)} (the backbone's "
                            f"model.kind)")
    if kind == "mlm" and getattr(tokenizer, "mask_token_id", None) is None:
        raise TemplateError(f"tokenizer {type(tokenizer).__name__} has no mask token, so kind='mlm' cannot "
                            f"work; pass kind='clm' for a causal LM (GPT-2) or kind='seq2seq' for T5")
    if kind == "seq2seq" and _token_id(tokenizer, SENTINEL) is None:
        raise TemplateError(f"tokenizer {type(tokenizer).__name__} has no {SENTINEL} sentinel, so "
                            f"kind='seq2seq' cannot work; use the T5 tokenizer of the checkpoint")
    return kind


def _mask_for_kind(tokenizer: Any, kind: str) -> tuple[str, list[int]]:
    """(mask text shown by wrap, token ids the mask occupies) for a kind."""
    if kind == "mlm":
        return tokenizer.mask_token, [tokenizer.mask_token_id]
    if kind == "seq2seq":
        return SENTINEL, [_token_id(tokenizer, SENTINEL)]
    return "", []


def _mask_position(n_before: int, kind: str) -> int:
    """Index that mask_pos records for a mask placed after ``n_before`` tokens."""
    if kind != "clm":
        return n_before
    if n_before == 0:
        raise TemplateError("a causal-LM template needs at least one token before the mask (its next-token "
                            "output predicts the label word); put text or a placeholder before {\"mask\"}")
    return n_before - 1


def check_mask_placement(pieces: Sequence[Piece], kind: str, text: str) -> None:
    """A causal LM predicts the next token only: its template must end with its one mask."""
    if kind != "clm":
        return
    masks = [i for i, p in enumerate(pieces) if p.kind == "mask"]
    if len(masks) != 1 or masks[0] != len(pieces) - 1:
        raise TemplateError(f"template {text!r} is for a causal LM (GPT-2), which predicts only the next "
                            f"token: it needs exactly one {{\"mask\"}} and it must be the last piece; move the "
                            f"text after the mask before it, e.g. '{{\"placeholder\":\"text_a\"}} It was "
                            f"{{\"mask\"}}'")


def _special_frame(tokenizer: Any, kind: str = "mlm", mask_token: str | None = None
                   ) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a single sequence ([CLS] / [SEP], </s>).

    A causal LM keeps only the prefix (e.g. a BOS): nothing may follow the mask it predicts.
    """
    if kind == "clm":
        plain = list(tokenizer(" x", add_special_tokens=False)["input_ids"])
        framed = list(tokenizer(" x", add_special_tokens=True)["input_ids"])
        at = next((i for i in range(len(framed)) if framed[i:i + len(plain)] == plain), 0)
        return framed[:at], []
    mask_id = _token_id(tokenizer, mask_token or tokenizer.mask_token)
    build = getattr(tokenizer, "build_inputs_with_special_tokens", None)
    try:
        framed = list(build([mask_id])) if callable(build) else None
    except (AttributeError, NotImplementedError):
        framed = None
    if framed is None:  # transformers 5 fast tokenizers: let the post-processor frame the mask token
        framed = list(tokenizer(mask_token or tokenizer.mask_token, add_special_tokens=True)["input_ids"])
    at = framed.index(mask_id)
    return framed[:at], framed[at + 1:]


# --- registry: how the builder makes a ManualTemplate, and the options a classifier folder rebuilds it from ----
def _build_manual(tokenizer: Any, classes: list[str] | None, options: dict[str, Any], backbone: Any) -> Template:
    text, kw = template_text(options, ManualTemplate)
    return ManualTemplate(text, tokenizer=tokenizer, **kw)


def _export_manual(template: ManualTemplate) -> dict[str, Any]:
    custom = sorted({p.post_processing for p in template.pieces if p.post_processing is not None}
                    - set(BUILTIN_POST_PROCESSING))
    if custom:   # a user function is code, not data: it cannot be written into a classifier folder
        raise TemplateError(f"post_processing {custom} of {template.text!r} are user functions and cannot be saved; "
                            f"use the built-in ones ({', '.join(BUILTIN_POST_PROCESSING)}) in a saved classifier")
    return {"text": template.text, "kind": template.kind}


register_template("manual", ManualTemplate, _build_manual, _export_manual)
