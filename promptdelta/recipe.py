"""An automatic recipe: try a small, bounded set of candidates, keep the best by DEV accuracy only.

The candidates are chosen for robustness on an embedding backbone (no task was tuned on; test is never
read here), cheapest first, so a short budget still gets the strong cheap ones:

    logreg       logistic regression on the frozen mean embeddings, C in {0.1, 1, 10} on dev
    similarity   zero-shot: cosine between the text's mean readout and each class's label words
    setfit-lora  LoRA (r=8) trained contrastively on SetFit pairs, then a logistic head (parameter-efficient SetFit)
    lora-soft    LoRA + soft verbalizer on the mean readout, probe-initialised (LP-FT), 20 epochs, best dev epoch

``auto_recipe`` prints the budget, each candidate's dev score and seconds, and what it chose; a candidate
that would start after the budget is spent is skipped (and listed so). Ties go to the cheaper candidate.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from promptdelta.errors import ConfigError
from promptdelta.utils.seed import seed_everything

DEFAULT_TEMPLATE = '{"placeholder":"text_a"} It was {"mask"}.'
CANDIDATES = ("logreg", "similarity", "setfit-lora", "lora-soft")


@dataclass
class RecipeResult:
    """What ``auto_recipe`` chose: ``predict(examples) -> list[int]``, and every candidate's dev score."""

    chosen: str
    dev_score: float
    predict: Callable[[Sequence[Any]], list[int]]
    table: list[dict[str, Any]] = field(default_factory=list)   # {name, dev, seconds, status}
    budget_s: float = 0.0


def _acc(preds: Sequence[int], examples: Sequence[Any]) -> float:
    return float(np.mean(np.asarray(preds) == np.asarray([ex.label for ex in examples]))) if len(examples) else 0.0


def _logreg(base: Any, tok: Any, train: Sequence[Any], dev: Sequence[Any], seed: int, max_length: int,
            template: str, label_words: Any) -> tuple:
    from sklearn.linear_model import LogisticRegression

    from promptdelta.bench.baselines import embed

    x_tr, x_dev = embed(base, tok, train, max_length), embed(base, tok, dev, max_length)
    best = None
    for c in (0.1, 1.0, 10.0):
        clf = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(x_tr, [ex.label for ex in train])
        score = _acc(clf.predict(x_dev), dev)
        if best is None or score > best[0]:
            best = (score, clf)
    head = best[1]
    return best[0], lambda ex: head.predict(embed(base, tok, list(ex), max_length)).tolist()


def _prompt_model(base: Any, tok: Any, classes: list[str], verbalizer: str, options: dict, template: str,
                  lora: bool, max_length: int, seed: int) -> Any:
    from promptdelta.deltas import attach
    from promptdelta.prompts.registry import build_classifier

    seed_everything(seed)
    model = copy.deepcopy(base)
    if lora:
        attach(model, "lora", r=8, alpha=16)
    else:
        model.requires_grad_(False)
    return build_classifier(model, tok, classes, "manual", verbalizer, template_options={"text": template},
                            verbalizer_options=options, readout="mean", max_length=max_length)


def _predictor(clf: Any) -> Callable[[Sequence[Any]], list[int]]:
    @torch.no_grad()
    def predict(examples: Sequence[Any]) -> list[int]:
        clf.eval()
        ex = list(examples)
        return [p for i in range(0, len(ex), 64) for p in clf(clf.collate(ex[i:i + 64])).argmax(-1).tolist()]
    return predict


def _similarity(base, tok, train, dev, seed, max_length, template, label_words) -> tuple:
    opts = {} if label_words is None else {"label_words": label_words}
    clf = _prompt_model(base, tok, list(train.classes), "similarity", opts, template, False, max_length, seed)
    predict = _predictor(clf)
    return _acc(predict(dev), dev), predict


def _setfit_lora(base, tok, train, dev, seed, max_length, template, label_words) -> tuple:
    from promptdelta.train.contrastive import train_contrastive

    opts = {} if label_words is None else {"label_words": label_words}
    clf = _prompt_model(base, tok, list(train.classes), "soft", opts, template, True, max_length, seed)
    out = train_contrastive(clf, train, dev, objective="pairs", epochs=1, num_iterations=20, lr=1e-3,
                            batch_size=16, head="logistic", seed=seed)
    predict = _predictor(clf)
    return _acc(predict(dev), dev), predict


def _lora_soft(base, tok, train, dev, seed, max_length, template, label_words) -> tuple:
    from promptdelta.prompts.probe import probe_init
    from promptdelta.train import Trainer, TrainConfig

    opts = {} if label_words is None else {"label_words": label_words}
    clf = _prompt_model(base, tok, list(train.classes), "soft", opts, template, True, max_length, seed)
    probe_init(clf, train, dev, seed=seed)
    cfg = TrainConfig(lr=1e-3, epochs=20, batch_size=8, seed=seed, progress=False, eval_at_start=True)
    trainer = Trainer(clf, cfg, seed=seed).fit(train, dev)
    return trainer.state.best_score, lambda ex: trainer.predict(list(ex)).tolist()


RUNNERS = {"logreg": _logreg, "similarity": _similarity, "setfit-lora": _setfit_lora, "lora-soft": _lora_soft}


def auto_recipe(base: Any, tokenizer: Any, train: Sequence[Any], dev: Sequence[Any], *, budget_s: float = 1800.0,
                seed: int = 13, template: str = DEFAULT_TEMPLATE, label_words: Any = None,
                candidates: Sequence[str] = CANDIDATES, max_length: int = 128,
                echo: Callable[[str], None] = print) -> RecipeResult:
    """Run ``candidates`` in order within ``budget_s`` seconds; the best dev accuracy wins (never test)."""
    unknown = [c for c in candidates if c not in RUNNERS]
    if unknown or not candidates:
        raise ConfigError(f"unknown recipe candidate(s) {unknown}; choose from {list(CANDIDATES)}")
    if not len(dev):
        raise ConfigError("the auto recipe chooses on dev, and dev is empty; give dev_shots > 0")
    echo(f"recipe auto: {len(candidates)} candidates ({', '.join(candidates)}), budget {budget_s:.0f} s, "
         f"chosen on dev ({len(dev)} examples)")
    start, table, best = time.perf_counter(), [], None
    for name in candidates:
        spent = time.perf_counter() - start
        if table and spent >= budget_s:                     # the first candidate always runs
            table.append({"name": name, "dev": None, "seconds": 0.0, "status": "skipped: budget spent"})
            echo(f"  {name:12s} skipped (budget of {budget_s:.0f} s spent)")
            continue
        t0 = time.perf_counter()
        score, predict = RUNNERS[name](base, tokenizer, train, dev, seed, max_length, template, label_words)
        secs = time.perf_counter() - t0
        table.append({"name": name, "dev": score, "seconds": secs, "status": "ran"})
        echo(f"  {name:12s} dev accuracy {score:.4f}  ({secs:.1f} s)")
        if best is None or score > best[1]:
            best = (name, score, predict)
    echo(f"recipe auto: chose {best[0]} (dev accuracy {best[1]:.4f})")
    return RecipeResult(best[0], best[1], best[2], table, budget_s)


def run_recipe(config: Any, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """``promptdelta run --recipe auto``: per seed of ``config``, the auto recipe chosen on dev, then scored on
    test once; returns {"seeds": [{seed, chosen, dev, test, table}], "mean_test": float}."""
    from promptdelta import data as pdata
    from promptdelta.backbones import load_backbone
    from promptdelta.prompts.registry import label_words_option

    base, tok = load_backbone(config.backbone)
    rows = []
    for seed in config.seeds:
        train, dev, test = pdata.load(config.data, shots=config.shots, seed=seed, columns=config.columns or None)
        words = None
        if config.label_words is not None:
            words = label_words_option({"label_words": config.label_words}, tok, list(train.classes))
        echo(f"seed {seed}:")
        out = auto_recipe(base, tok, train, dev, seed=seed, label_words=words, max_length=config.max_length,
                          template=config.template if "{" in str(config.template) else DEFAULT_TEMPLATE,
                          budget_s=float(getattr(config, "recipe_budget_s", 1800.0)), echo=echo)
        test_acc = _acc(out.predict(list(test)), test)
        echo(f"seed {seed}: chose {out.chosen}, dev {out.dev_score:.4f}, test accuracy {test_acc:.4f}")
        rows.append({"seed": seed, "chosen": out.chosen, "dev": out.dev_score, "test": test_acc,
                     "table": out.table})
    mean = float(np.mean([r["test"] for r in rows]))
    std = float(np.std([r["test"] for r in rows], ddof=1)) if len(rows) > 1 else 0.0
    echo(f"recipe auto: test accuracy {100 * mean:.1f} ± {100 * std:.1f} over {len(rows)} seed(s)")
    return {"seeds": rows, "mean_test": mean, "std_test": std}
