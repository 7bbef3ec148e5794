"""Seeded, stratified sampling: k-shot train/dev splits (LM-BFF protocol) and a dev hold-out.

Few-shot protocol (Gao et al. 2021, "Making Pre-trained Language Models Better Few-shot Learners"):
draw k examples per class for train and k per class for dev from the same pool, without overlap, with a
seeded generator. Here one seeded permutation of the pool is drawn (``random.Random(seed)``, which does
not depend on Python's hash seed); each class takes its first k examples in that order for train and the
next ``dev_k`` for dev. So the train draw does not depend on ``dev_k``, and ``few_shot(pool, k, seed)``
equals the train half of ``few_shot_split(pool, k, seed)``.
"""

from __future__ import annotations

import logging
import random

from promptdelta.data.examples import ExampleSet
from promptdelta.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def _check_k(k: int, what: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{what}={k!r} is not a positive integer; pass e.g. {what}=16 "
                          f"(examples per class), or shots=None to use the full train split")


def _by_class_in_seeded_order(pool: ExampleSet, seed: int) -> list[list[int]]:
    """Indices of each class's examples, in the order of one seeded permutation of the pool."""
    if not pool.classes:
        raise DataError(f"the pool {pool.name!r} has no class names; build it with "
                        f"ExampleSet(examples, classes=[...]) or load it with promptdelta.data.load")
    unlabelled = [ex.guid or str(i) for i, ex in enumerate(pool) if ex.label is None]
    if unlabelled:
        raise DataError(f"{len(unlabelled)} example(s) in {pool.name or 'the pool'} have no label "
                        f"(first: {unlabelled[0]}); give every train example a label to sample from it")
    bad = [ex.guid or str(i) for i, ex in enumerate(pool) if not 0 <= ex.label < len(pool.classes)]
    if bad:
        raise DataError(f"{len(bad)} example(s) in {pool.name or 'the pool'} have a label outside "
                        f"0..{len(pool.classes) - 1} (first: {bad[0]}); fix the labels or the classes list")
    per_class: list[list[int]] = [[] for _ in pool.classes]
    for i in _seeded_order(len(pool), seed):
        per_class[pool[i].label].append(i)
    return per_class


def _check_enough(pool: ExampleSet, per_class: list[list[int]], need: int, what: str) -> None:
    short = [f"{name!r} has {len(idx)}" for name, idx in zip(pool.classes, per_class) if len(idx) < need]
    if short:
        counts = ", ".join(f"{n}: {len(i)}" for n, i in zip(pool.classes, per_class))
        raise DataError(f"few-shot sampling needs {need} examples per class ({what}) but class "
                        f"{'; '.join(short)} in {pool.name or 'the pool'} (counts: {counts}); "
                        f"lower shots/dev_shots or add examples of that class to the train file")


def few_shot_split(pool: ExampleSet, k: int, seed: int = 13,
                   dev_k: int | None = None) -> tuple[ExampleSet, ExampleSet]:
    """Draw k per class for train and ``dev_k`` (default k) per class for dev, without overlap.

    Raises DataError when a class has fewer than ``k + dev_k`` examples in the pool.
    """
    dev_k = k if dev_k is None else dev_k
    _check_k(k, "shots")
    _check_k(dev_k, "dev_shots")
    per_class = _by_class_in_seeded_order(pool, seed)
    _check_enough(pool, per_class, k + dev_k, f"{k} train + {dev_k} dev")
    train_idx = {i for idx in per_class for i in idx[:k]}
    dev_idx = {i for idx in per_class for i in idx[k:k + dev_k]}
    order = _seeded_order(len(pool), seed)
    train = pool.like((pool[i] for i in order if i in train_idx), name=f"{pool.name}[train {k}-shot]")
    dev = pool.like((pool[i] for i in order if i in dev_idx), name=f"{pool.name}[dev {dev_k}-shot]")
    return train, dev


def few_shot(pool: ExampleSet, k: int, seed: int = 13) -> ExampleSet:
    """Draw exactly k examples per class from ``pool`` with a seeded generator (train half of the split)."""
    _check_k(k, "shots")
    per_class = _by_class_in_seeded_order(pool, seed)
    _check_enough(pool, per_class, k, f"{k} train")
    chosen = {i for idx in per_class for i in idx[:k]}
    return pool.like((pool[i] for i in _seeded_order(len(pool), seed) if i in chosen),
                     name=f"{pool.name}[train {k}-shot]")


def stratified_holdout(pool: ExampleSet, fraction: float = 0.1,
                       seed: int = 13) -> tuple[ExampleSet, ExampleSet]:
    """Split ``pool`` into (rest, held_out) with about ``fraction`` of every class held out.

    Each class with at least 2 examples gives ``max(1, round(fraction * n_c))`` examples; a class with
    one example stays in the rest. Both keep the pool's order.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"hold-out fraction {fraction!r} must be between 0 and 1 (exclusive); pass e.g. 0.1")
    per_class = _by_class_in_seeded_order(pool, seed)
    held = set()
    for idx in per_class:
        n_dev = max(1, round(fraction * len(idx))) if len(idx) >= 2 else 0
        held.update(idx[:n_dev])
    rest = pool.like((ex for i, ex in enumerate(pool) if i not in held), name=f"{pool.name}[train]")
    dev = pool.like((ex for i, ex in enumerate(pool) if i in held), name=f"{pool.name}[dev hold-out]")
    return rest, dev


def _seeded_order(n: int, seed: int) -> list[int]:
    """The same permutation ``_by_class_in_seeded_order`` walks, so outputs mix classes reproducibly."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order
