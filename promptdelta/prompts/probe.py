"""Linear-probe initialisation of a soft verbalizer (LP-FT, Kumar et al. 2022).

Fine-tuning a backbone under a randomly (or word-embedding) initialised head distorts the pretrained
features while the head is still wrong; fitting the head first on the frozen features, then tuning
everything from there, is both more accurate and more robust (Kumar et al., "Fine-Tuning can Distort
Pretrained Features and Underperform Out-of-Distribution", ICLR 2022). Here the "features" are exactly what
the verbalizer reads in the prompt model (the mask state, or the mean of the states with
``readout="mean"``), so the probe is logistic regression on the prompt-wrapped input:

    W*, b* = argmin_{W, b}  sum_i CE(W h_i + b, y_i) + ||W||^2 / (2 C)      (scikit-learn, lbfgs)

with C chosen on the dev split. The soft verbalizer's head ``W h + b`` is then set to the probe. A binary
probe (one weight vector w, P(y=1) = sigmoid(w h + c)) becomes the two rows -w/2, +w/2, whose softmax is the
same distribution. Used with ``Trainer(eval_at_start=True)`` the probed model is itself a candidate of dev
selection, so tuning only replaces it when dev says it helps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from promptdelta.errors import VerbalizerError
from promptdelta.prompts.model import batch_to

logger = logging.getLogger(__name__)

DEFAULT_C_GRID = (0.01, 0.1, 1.0, 10.0)


@torch.no_grad()
def readout_features(clf: Any, examples: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
    """The vectors the verbalizer reads, (N, H) float32 on CPU, in eval mode (mode restored after)."""
    was_training = clf.training
    clf.eval()
    try:
        feats = []
        for i in range(0, len(examples), batch_size):
            batch = batch_to(clf.collate(list(examples[i:i + batch_size])), clf.device)
            hidden, _, _ = clf._run(batch, keep_state=False)                 # what the verbalizer reads
            if hidden.dim() == 3:                                          # (B, M, H) multi-mask
                raise VerbalizerError("a linear probe reads one vector per example; use a template with one "
                                      "{\"mask\"} (or readout='mean') for verbalizer_init='probe'")
            feats.append(hidden.float().cpu())                             # (B, H)
    finally:
        clf.train(was_training)
    return torch.cat(feats) if feats else torch.zeros(0)


def fit_probe(x_train: np.ndarray, y_train: Sequence[int], num_classes: int,
              x_dev: np.ndarray | None = None, y_dev: Sequence[int] | None = None,
              c_grid: Sequence[float] = DEFAULT_C_GRID, seed: int = 0, max_iter: int = 1000
              ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Multinomial logistic regression -> (W (C, H), b (C,), {"C": chosen, "dev_accuracy": ...}).

    C is chosen on dev accuracy (the first of the grid on ties); without dev the middle of the grid (and
    dev_accuracy is 0)."""
    from sklearn.linear_model import LogisticRegression

    y_train = np.asarray(y_train)
    missing = sorted(set(range(num_classes)) - set(y_train.tolist()))
    if missing:
        raise VerbalizerError(f"a linear probe needs training examples of every class; classes {missing} have "
                              "none: sample more shots or use verbalizer_init='words'")
    grid = [float(c) for c in c_grid]
    if not grid:
        raise VerbalizerError("probe C grid is empty; give at least one value, e.g. [0.1, 1.0]")
    has_dev = x_dev is not None and y_dev is not None and len(y_dev) > 0
    if not has_dev:
        grid = [grid[len(grid) // 2]]
    best, best_score, best_c = None, -1.0, grid[0]
    for c in grid:
        model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(x_train, y_train)
        score = float((model.predict(x_dev) == np.asarray(y_dev)).mean()) if has_dev else 0.0
        if score > best_score:
            best, best_score, best_c = model, score, c
    coef, intercept = best.coef_, best.intercept_                          # (C or 1, H), (C or 1,)
    if coef.shape[0] == 1 and num_classes == 2:                            # binary: rows -w/2, +w/2
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    return coef, intercept, {"C": best_c, "dev_accuracy": best_score}


def probe_init(clf: Any, train: Sequence[Any], dev: Sequence[Any] | None = None,
               c_grid: Sequence[float] = DEFAULT_C_GRID, seed: int = 0, batch_size: int = 64) -> dict[str, float]:
    """Set ``clf.verbalizer.head`` (a :class:`SoftVerbalizer`) to a linear probe of the readout features.

    ``clf`` is a :class:`PromptForClassification`; ``train``/``dev`` are labelled examples. Returns the chosen
    C and the probe's dev accuracy."""
    head = getattr(clf.verbalizer, "head", None)
    if not isinstance(head, torch.nn.Linear):
        raise VerbalizerError(f"verbalizer_init='probe' fits a linear head, which {type(clf.verbalizer).__name__} "
                              "does not have; use verbalizer: soft (or verbalizer_init: words)")
    x_train = readout_features(clf, train, batch_size).numpy()
    x_dev = readout_features(clf, dev, batch_size).numpy() if dev else None
    y_dev = [ex.label for ex in dev] if dev else None
    w, b, info = fit_probe(x_train, [ex.label for ex in train], head.out_features, x_dev, y_dev, c_grid, seed)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(w, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(b, dtype=head.bias.dtype))
    logger.info("linear probe init of the soft verbalizer: C=%g, dev accuracy %.4f", info["C"], info["dev_accuracy"])
    return info
