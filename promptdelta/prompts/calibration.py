"""Calibration of a ManualVerbalizer's label-word probabilities.

A PLM prefers some label words whatever the input (Zhao et al. 2021, "Calibrate Before Use"). Both
methods estimate that prior p~(v) over the label words and divide it out (``verbalizer.calibrate``):

    p_cal(v | x) = normalise_v( p(v | x) / p~(v) )

* contextual (support-set) calibration: p~(v) = mean_{x in S} p(v | x) over an unlabelled support set S
  (KPT's contextualised calibration, Hu et al. 2022).
* template-only (content-free) calibration: p~(v) = mean over content-free inputs ("N/A", "") put in
  every text slot of the template (Zhao et al. 2021). With one word per class this is exactly their
  W = diag(p_cf)^-1 correction.

Here p(v | x) is the verbalizer's word distribution: normalised over all label words of all classes (on
causal LMs / T5 with multi-token words, the model's sequence scores normalised the same way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from promptdelta.data.examples import InputExample
from promptdelta.errors import DataError, VerbalizerError
from promptdelta.prompts.verbalizer import ManualVerbalizer

CONTENT_FREE = ("N/A", "")


def _manual(clf: Any) -> ManualVerbalizer:
    v = getattr(clf, "verbalizer", None)
    if not isinstance(v, ManualVerbalizer):
        raise VerbalizerError(f"calibration needs a ManualVerbalizer (or KnowledgeableVerbalizer), got "
                              f"{type(v).__name__}; calibrate the label-word verbalizer instead")
    return v


@torch.no_grad()
def word_log_probs(clf: Any, examples: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
    """Uncalibrated word log-probs log p(v | x) (N, C, W) of each example; padded word slots hold -inf.

    Runs ``clf`` in eval mode (then restores the mode) with the verbalizer in word_log_prob_mode."""
    v = _manual(clf)
    if len(examples) == 0:
        raise DataError("no examples to estimate the label-word prior from; pass a non-empty support set")
    was_training = clf.training
    clf.eval()
    try:
        with v.word_log_prob_mode():
            flat = [clf(clf.collate(list(examples[i:i + batch_size]))).float().cpu()
                    for i in range(0, len(examples), batch_size)]
    finally:
        clf.train(was_training)
    return torch.cat(flat).reshape(-1, *v.word_mask.shape)                              # (N, C, W)


def prior_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """log mean_x p(v | x): (N, C, W) -> (C, W); padded slots (-inf everywhere) become 0."""
    prior = log_probs.logsumexp(0) - math.log(log_probs.shape[0])                       # (C, W)
    return prior.masked_fill(torch.isneginf(prior), 0.0)


def contextual_prior(clf: Any, support: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
    """The prior log p~(v) (C, W) over an unlabelled support set (labels, if any, are ignored)."""
    unlabelled = [_strip_label(ex) for ex in support]
    return prior_from_log_probs(word_log_probs(clf, unlabelled, batch_size))


def content_free_prior(clf: Any, texts: Sequence[str] = CONTENT_FREE) -> torch.Tensor:
    """The prior log p~(v) (C, W) from content-free inputs: each text fills text_a and text_b."""
    if not texts:
        raise DataError("no content-free texts given; pass e.g. texts=('N/A', '')")
    examples = [InputExample(text=t, text_b=t) for t in texts]
    return prior_from_log_probs(word_log_probs(clf, examples))


def calibrate_contextual(clf: Any, support: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
    """Estimate the support-set prior and set it on the verbalizer; returns it (C, W)."""
    prior = contextual_prior(clf, support, batch_size)
    _manual(clf).set_calibration(prior)
    return prior


def calibrate_content_free(clf: Any, texts: Sequence[str] = CONTENT_FREE) -> torch.Tensor:
    """Estimate the content-free (template-only) prior and set it on the verbalizer; returns it (C, W)."""
    prior = content_free_prior(clf, texts)
    _manual(clf).set_calibration(prior)
    return prior


def _strip_label(ex: Any) -> Any:
    """The example without its label (so a support set of labelled examples is used as unlabelled)."""
    if isinstance(ex, InputExample) and ex.label is not None:
        return InputExample(text=ex.text, text_b=ex.text_b, meta=dict(ex.meta), guid=ex.guid)
    return ex
