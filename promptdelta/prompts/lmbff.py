"""LM-BFF's automatic prompt search (Gao et al. 2021, "Making Pre-trained Language Models Better Few-shot
Learners"): label words and templates found from the few-shot data itself.

Label words (for a fixed template T):
    s_c(w)  = sum_{x in D_train, y(x) = c} log P([MASK] = w | T(x))        (per class; top-k words kept)
    combos  = the assignments (w_1 .. w_C) in top-k_1 x .. x top-k_C with distinct words, ranked by
              zero-shot dev accuracy: acc = mean_x [ argmax_c log P(w_c | T(x)) == y(x) ]   (ties: sum s_c)

Templates (for fixed label words): an encoder-decoder (T5) fills the sentinel spans of a *format*,
e.g. ``"{x} <extra_id_0> {label} <extra_id_1>"`` -> the template ``{x} <span_0> [MASK] <span_1>``. The spans
are decoded by beam search on the summed log-likelihood over all train examples (one template for all):
    score(s) = sum_{(x, y) in D_train} log P_T5(s | format(x, word(y)))
Decoding is constrained to well-formed outputs (``<extra_id_0>`` first, the sentinels in order, ``</s>`` only
after the last one), so every candidate is a valid template; candidates are then re-ranked by zero-shot dev
accuracy on the classifier's backbone (``rank_templates``).

Both write OpenPrompt files: ``save_label_words`` (JSON list of {class: [word]} alternatives, best first),
``save_templates`` (one template per line, best first). Label-word search needs a masked or causal LM (or a
backbone without head, scored through its tied input embeddings); template generation a seq2seq backbone.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptdelta.errors import CheckpointError, ConfigError, DataError, TemplateError
from promptdelta.prompts.autoprompt import trigger_vocabulary
from promptdelta.prompts.dsl import parse_template
from promptdelta.prompts.model import PromptForClassification, batch_to
from promptdelta.prompts.template import Template
from promptdelta.prompts.verbalizer import Verbalizer
from promptdelta.utils.io import atomic_write_json, atomic_write_text

DEFAULT_FORMAT = "{x} <extra_id_0> {label} <extra_id_1>"
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


# --------------------------------------------------------------------------------------------- label words
@dataclass
class LabelWordSearch:
    """Result: ``combos`` (label words, one per class) best first, with their dev accuracy; ``candidates``
    the top-k words per class by summed train log-likelihood."""

    classes: list[str]
    combos: list[list[str]]
    dev_accuracy: list[float]
    candidates: list[list[str]]

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """OpenPrompt JSON verbalizer file: a list of {class: [word]} alternatives, best first."""
        return save_label_words(path, self.classes, self.combos, overwrite)


@torch.no_grad()
def mask_log_probs(backbone: nn.Module, template: Template, examples: Sequence[Any], batch_size: int = 32,
                   max_length: int = 256, readout: str = "mask") -> torch.Tensor:
    """log P(w | T(x)) at the mask over the whole vocabulary: (N, V).

    Uses the LM head's logits; a backbone without one is scored through its input embeddings (hidden @ E^T),
    as ManualVerbalizer does. ``readout="mean"`` scores the mean hidden state instead of the mask's (through
    the embeddings; for sentence encoders without MLM head, as PromptForClassification's readout)."""
    kind = getattr(backbone, "kind", "mlm")
    if kind == "seq2seq":
        raise ConfigError("label-word search reads one mask output of a masked or causal LM; use a BERT/RoBERTa/"
                          "GPT-2 style backbone (T5 is for generate_templates)")
    if readout not in ("mask", "mean"):
        raise ConfigError(f"readout={readout!r} is unknown; use 'mask' or 'mean'")
    device = next(backbone.parameters()).device
    out_rows = []
    for i in range(0, len(examples), batch_size):
        batch = batch_to(template.tokenize(list(examples[i:i + batch_size]), max_length=max_length), device)
        embeds = template.process_embeds(backbone.input_embeddings()(batch["input_ids"]), batch)   # (B, T, H)
        out = backbone(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                       token_type_ids=batch.get("token_type_ids"))
        rows = torch.arange(embeds.shape[0], device=device)
        at = batch["mask_pos"][:, 0]
        if readout == "mean":
            keep = batch["attention_mask"][..., None].to(out.last_hidden_state.dtype)      # (B, T, 1)
            hidden = (out.last_hidden_state * keep).sum(1) / keep.sum(1).clamp(min=1)      # (B, H)
            logits = hidden @ backbone.input_embeddings().weight.T                         # (B, V)
        elif out.logits is not None:
            logits = out.logits[rows, at]                                                  # (B, V)
        else:
            logits = out.last_hidden_state[rows, at] @ backbone.input_embeddings().weight.T   # (B, V)
        out_rows.append(logits.float().log_softmax(-1).cpu())
    return torch.cat(out_rows)


def search_label_words(backbone: nn.Module, tokenizer: Any, template: Template, train: Sequence[Any],
                       dev: Sequence[Any], classes: Sequence[str], k: int = 10, n_best: int = 5,
                       max_combos: int = 10000, batch_size: int = 32, readout: str = "mask") -> LabelWordSearch:
    """Top-``k`` words per class by summed train log-likelihood, combinations re-ranked by zero-shot dev
    accuracy; returns the ``n_best`` combinations. Candidate words are whole words of the vocabulary."""
    _check_labelled(train, classes, "train")
    _check_labelled(dev, classes, "dev")
    if k < 1 or n_best < 1:
        raise ConfigError(f"k={k} and n_best={n_best} must be >= 1")
    if k ** len(classes) > max_combos:
        raise ConfigError(f"k={k} over {len(classes)} classes gives {k ** len(classes)} combinations "
                          f"(> max_combos={max_combos}); lower k or raise max_combos")
    allowed = trigger_vocabulary(tokenizer)
    lp_train = mask_log_probs(backbone, template, train, batch_size, readout=readout)                     # (N, V)
    labels = torch.tensor([e.label for e in train])
    per_class = torch.stack([lp_train[labels == c].sum(0) for c in range(len(classes))])   # (C, V)
    per_class[:, ~allowed] = -float("inf")
    top = per_class.topk(k, dim=-1).indices                                               # (C, k)
    lp_dev = mask_log_probs(backbone, template, dev, batch_size, readout=readout)                           # (M, V)
    dev_y = torch.tensor([e.label for e in dev])
    scored = []
    for combo in itertools.product(*top.tolist()):
        if len(set(combo)) < len(combo):
            continue                                                  # one word cannot name two classes
        ids = torch.tensor(combo)
        acc = float((lp_dev[:, ids].argmax(-1) == dev_y).float().mean())
        prior = float(per_class[torch.arange(len(classes)), ids].sum())
        scored.append((acc, prior, combo))
    scored.sort(key=lambda t: (-t[0], -t[1]))
    words = lambda ids: [tokenizer.decode([i]).strip() for i in ids]   # noqa: E731
    best = scored[:n_best]
    return LabelWordSearch(list(classes), [words(c) for _, _, c in best], [a for a, _, _ in best],
                           [words(row) for row in top.tolist()])


def save_label_words(path: str | Path, classes: Sequence[str], combos: Sequence[Sequence[str]],
                     overwrite: bool = False) -> Path:
    """Write combos as an OpenPrompt JSON verbalizer (``ManualVerbalizer.from_file(path, choice=i)``)."""
    _check_new(path, overwrite)
    return atomic_write_json(path, [{c: [w] for c, w in zip(classes, combo)} for combo in combos])


# --------------------------------------------------------------------------------------------- templates
@dataclass
class GeneratedTemplate:
    template: str                      # OpenPrompt template text
    score: float                       # summed train log-likelihood of its spans under T5


def generate_templates(t5: nn.Module, tokenizer: Any, train: Sequence[Any], label_words: Sequence[str],
                       fmt: str = DEFAULT_FORMAT, beam_size: int = 8, max_tokens: int = 12,
                       num_return: int | None = None) -> list[GeneratedTemplate]:
    """Templates from T5 span filling, best summed log-likelihood first (see the module docstring).

    Args:
        t5: a seq2seq backbone (native T5, or a transformers T5 through ``load_backbone``).
        label_words: one word per class, put in place of ``{label}`` for each train example.
        fmt: the format, with ``{x}`` (the example's text_a), ``{label}`` and sentinels ``<extra_id_i>``
            numbered 0, 1, ... in order.
    """
    if getattr(t5, "kind", None) != "seq2seq":
        raise ConfigError("generate_templates needs an encoder-decoder (T5) backbone; load one with load_backbone")
    n_spans = _check_format(fmt)
    _check_labelled(train, label_words, "train")
    sentinels = [tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(n_spans)]
    if any(s is None or s == tokenizer.unk_token_id for s in sentinels):
        raise ConfigError(f"the tokenizer lacks the sentinels <extra_id_0..{n_spans - 1}> that {fmt!r} needs; "
                          f"use a T5 tokenizer")
    texts = [fmt.replace("{x}", e.text).replace("{label}", label_words[e.label]) for e in train]
    device = next(t5.parameters()).device
    enc_in = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        enc = t5.encode(input_ids=enc_in["input_ids"], attention_mask=enc_in["attention_mask"]).last_hidden_state
        beams = _beam_search(t5, tokenizer, enc, enc_in["attention_mask"], sentinels, beam_size, max_tokens)
    out = []
    for ids, score in beams[:num_return or beam_size]:
        spans = _split_spans(tokenizer, ids, sentinels)
        out.append(GeneratedTemplate(_render(fmt, spans), score))
    return out


def _beam_search(t5: nn.Module, tokenizer: Any, enc: torch.Tensor, enc_mask: torch.Tensor,
                 sentinels: list[int], beam_size: int, max_tokens: int) -> list[tuple[list[int], float]]:
    """Constrained beam search; one hypothesis is scored on every example at once (summed log-probs)."""
    N, V = enc.shape[0], t5.config.vocab_size
    start, eos = t5.config.decoder_start_token_id, tokenizer.eos_token_id
    banned = torch.zeros(V, dtype=torch.bool, device=enc.device)
    banned[[i for i in tokenizer.all_special_ids if i < V]] = True              # pad, unk, every sentinel ...
    banned[len(tokenizer):] = True                                              # ids beyond the tokenizer
    beams: list[tuple[list[int], float]] = [([sentinels[0]], 0.0)]             # span 0 opens at once
    done: list[tuple[list[int], float]] = []
    for _ in range(max_tokens + len(sentinels)):
        if not beams:
            break
        dec = torch.tensor([[start] + ids for ids, _ in beams], device=enc.device)    # (Bm, L)
        Bm = dec.shape[0]
        logits = t5(encoder_outputs=enc.repeat(Bm, 1, 1), attention_mask=enc_mask.repeat(Bm, 1),
                    decoder_input_ids=dec.repeat_interleave(N, 0)).logits[:, -1]       # (Bm*N, V)
        lp = logits.float().log_softmax(-1).reshape(Bm, N, V).sum(1)                  # (Bm, V) summed over x
        cands = []
        for b, (ids, score) in enumerate(beams):
            opened = sum(i in sentinels for i in ids)
            allowed = ~banned.clone()
            if opened < len(sentinels):
                allowed[sentinels[opened]] = True                                  # the next span may open
            else:
                allowed[eos] = True                                                # or it ends
            if len(ids) - opened >= max_tokens:                                    # span budget spent: close
                allowed[:] = False
                allowed[sentinels[opened] if opened < len(sentinels) else eos] = True
            row = lp[b].masked_fill(~allowed, -float("inf"))
            vals, idx = row.topk(min(beam_size, int(allowed.sum())))
            cands += [(ids + [int(i)], score + float(v)) for v, i in zip(vals, idx)]
        cands.sort(key=lambda t: -t[1])
        beams = []
        for ids, score in cands[:beam_size]:
            (done if ids[-1] == eos else beams).append((ids, score))
    done.sort(key=lambda t: -t[1])
    return done


def _split_spans(tokenizer: Any, ids: list[int], sentinels: list[int]) -> list[str]:
    """Decoded text between consecutive sentinels (``{``/``}`` removed: they would open template pieces)."""
    cuts = [ids.index(s) for s in sentinels] + [len(ids) - 1]                     # last: the eos
    spans = [tokenizer.decode(ids[a + 1:b], skip_special_tokens=True) for a, b in zip(cuts, cuts[1:])]
    return [" ".join(s.replace("{", "").replace("}", "").split()) for s in spans]


def _render(fmt: str, spans: Sequence[str]) -> str:
    text = fmt.replace("{x}", '{"placeholder":"text_a"}').replace("{label}", '{"mask"}')
    text = _SENTINEL.sub(lambda m: spans[int(m.group(1))], text)
    return " ".join(text.split())


def _check_format(fmt: str) -> int:
    if fmt.count("{x}") != 1 or fmt.count("{label}") != 1:
        raise TemplateError(f"the format {fmt!r} needs exactly one {{x}} and one {{label}}; e.g. {DEFAULT_FORMAT!r}")
    found = [int(n) for n in _SENTINEL.findall(fmt)]
    if not found or found != list(range(len(found))):
        raise TemplateError(f"the format {fmt!r} must number its sentinels <extra_id_0>, <extra_id_1>, ... in order")
    return len(found)


def rank_templates(templates: Sequence[str], backbone: nn.Module, tokenizer: Any, verbalizer: Verbalizer,
                   dev: Sequence[Any], readout: str = "mask") -> list[tuple[str, float]]:
    """Zero-shot dev accuracy of each template with ``verbalizer`` on ``backbone``, best first."""
    from promptdelta.prompts.template import ManualTemplate

    _check_labelled(dev, verbalizer.classes, "dev")
    out = []
    for text in templates:
        parse_template(text)
        clf = PromptForClassification(backbone, ManualTemplate(text, tokenizer=tokenizer), verbalizer,
                                      readout=readout)
        out.append((text, accuracy(clf, dev)))
    return sorted(out, key=lambda t: -t[1])


@torch.no_grad()
def accuracy(clf: nn.Module, examples: Sequence[Any], batch_size: int = 32) -> float:
    """Accuracy of a prompt classifier (``collate`` + forward -> label logits) on labelled examples, in eval
    mode (the mode is restored)."""
    was = clf.training
    clf.eval()
    try:
        hits = sum(int((clf(clf.collate(list(examples[i:i + batch_size]))).argmax(-1).cpu()
                        == torch.tensor([e.label for e in examples[i:i + batch_size]])).sum())
                   for i in range(0, len(examples), batch_size))
    finally:
        clf.train(was)
    return hits / len(examples)


def save_templates(path: str | Path, templates: Sequence[str], overwrite: bool = False) -> Path:
    """One template per line (OpenPrompt's template file; ``ManualTemplate.from_file(path, choice=i)``)."""
    _check_new(path, overwrite)
    for t in templates:
        parse_template(t)
    return atomic_write_text(path, "".join(t + "\n" for t in templates))


# --------------------------------------------------------------------------------------------- checks
def _check_labelled(examples: Sequence[Any], classes: Sequence[Any], split: str) -> None:
    if not examples:
        raise DataError(f"the {split} set is empty; LM-BFF's search needs labelled {split} examples")
    bad = [e for e in examples if e.label is None or not 0 <= e.label < len(classes)]
    if bad:
        raise DataError(f"{len(bad)} {split} example(s) have no label in 0..{len(classes) - 1} (first: "
                        f"{bad[0].text[:40]!r}); give every {split} example a class index")


def _check_new(path: str | Path, overwrite: bool) -> None:
    if Path(path).exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it, or choose another path")
