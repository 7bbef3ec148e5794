"""An automatic recipe: try a small, bounded set of candidates, keep the best by DEV accuracy only.

The default candidates are chosen for robustness on an embedding backbone (no task was tuned on; test is
never read here), from priors rather than from the suite's test numbers:

    setfit       SetFit (Tunstall et al. 2022) in our own code: the whole body trained on same/other-class
                 pairs of the plain texts (cosine regression (cos(h_i, h_j) - y_ij)^2, lr 2e-5, 1 epoch; SetFit's
                 defaults: one body, num_iterations=20, ``SETFIT_SEEDS`` lists more bodies to average). One text:
                 the pairs also draw on ``AUGMENT`` copies of each class description (SetFit's templated
                 examples, ``get_templated_dataset``), and the head is the prior head: the tuned body's own
                 zero-shot logits cos(h(x), e_c) / tau plus a logistic head fitted on top of them,
                     P(y | x) = softmax(cos(h, e) / tau + W h^ + b),  c sum CE + |W|^2 / 2,
                 C on dev (the smallest of the best: nearest the prior; CLAP, Silva-Rodriguez et al. 2024).
                 A text pair: a logistic head on the tuned mean embeddings, C on dev
    zero-shot    the embedding model's own similarity, fitted by one or two numbers on train (never averaged):
                 one text: s_c(x) = cos(h(x), e_c) / tau, e_c the mean embedding of class c's descriptions,
                 the template with its text left out and its mask filled by each label word ("It was
                 great."), tau by likelihood on train (argmax does not depend on it); a text pair:
                 softmax(w cos(h(a), h(b)) + b), a logistic head on the two texts' cosine (Reimers & Gurevych
                 2019), C on dev. Last, so it must beat the others strictly: on held-out examples of the
                 train pools (never test; docs/results/fewshot) it stayed at 71-73% on SST-2 where few-shot
                 heads fell to 56% on an unlucky 16-shot draw, and lifted RTE's pairs from chance to ~56%
    (optional)   logreg (logistic regression on the frozen mean embeddings, C on dev), ensemble (the mean of
                 the class probabilities of the trained candidates before it, kept only when strictly better on
                 dev), lora-soft (LoRA + soft verbalizer on the template's mean readout, LP-FT, 20 epochs, best dev
                 epoch: its dev score is the max over 21 checkpoints, so it is biased upwards against the
                 others), similarity (zero-shot label words), setfit-lora (LoRA on pairs)

Why two defaults: with 16 dev examples a class, every extra candidate is one more chance to choose on noise.
On held-out examples of the train pools (never test; docs/guide/recipe.md) logreg and the ensemble were the
choices dev made by one or two examples and that then scored below the SetFit candidate.

Refit: once dev has chosen (and chosen each head's C), the choice is trained again on train + dev, every
labelled example (``GridSearchCV(refit=True)``'s rule; in the LM-BFF protocol dev is half of the labelled
data). Only candidates that train without reading dev are refit (logreg, setfit, their ensemble).

``auto_recipe`` prints the budget, each candidate's dev score, wall and CPU seconds, and what it chose. Ties
go to the earlier candidate (the defaults are listed strongest prior first: with 16 dev examples per class a
tie says nothing, and SetFit is the stronger method in expectation). The budget is a guard: a candidate
that would start after it is spent is skipped and listed so, but the defaults fit far inside the default
budget, so the choice does not depend on machine load.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from promptdelta.errors import ConfigError
from promptdelta.utils.seed import seed_everything

DEFAULT_TEMPLATE = '{"placeholder":"text_a"} It was {"mask"}.'
CANDIDATES = ("setfit", "zero-shot")
SETFIT_SEEDS, SETFIT_ROUNDS = (0,), 20       # seed offsets of the bodies averaged, pair rounds per body
AUGMENT = 2          # copies of each class description in SetFit's body training (setfit's get_templated_dataset)
# the heads read a single text longer than max_length whole, as the token-weighted mean of its windows'
# embeddings, instead of its first max_length tokens (held-out IMDB reviews: +0 to +3 points; docs/guide/recipe.md)
WINDOWS = True
C_GRID = (0.01, 0.1, 1.0, 10.0)
Proba = Callable[[Sequence[Any]], np.ndarray]          # examples -> class probabilities (N, C)


@dataclass
class RecipeResult:
    """What ``auto_recipe`` chose: ``predict(examples) -> list[int]``, and every candidate's dev score."""

    chosen: str
    dev_score: float
    predict: Callable[[Sequence[Any]], list[int]]
    table: list[dict[str, Any]] = field(default_factory=list)   # {name, dev, seconds, cpu_s, status}
    budget_s: float = 0.0
    proba: Proba | None = None
    refit: bool = False          # whether ``predict`` is the choice trained again on train + dev
    tokenizer: Any = None        # what embedded the examples, and how (the saved classifier tokenises alike)
    max_length: int = 128
    classes: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)   # the chosen candidate, or the chosen ensemble's members

    def save_pretrained(self, path: Any, overwrite: bool = False) -> Any:
        """Write the choice as a folder that ``promptdelta predict`` and ``recipe_export.load_recipe`` read
        (a classifier folder, or an ensemble of them); its probabilities are ``proba``'s. See recipe_export."""
        from promptdelta.recipe_export import save_recipe

        return save_recipe(self, path, overwrite=overwrite)


def _acc(preds: Sequence[int], examples: Sequence[Any]) -> float:
    return float(np.mean(np.asarray(preds) == np.asarray([ex.label for ex in examples]))) if len(examples) else 0.0


def _head(embed_fn: Callable[[Sequence[Any]], np.ndarray], train: Sequence[Any], dev: Sequence[Any],
          seed: int, c: float | None = None) -> Proba:
    """A logistic head on ``embed_fn``'s vectors; C given, else chosen on dev (the smallest C of the best on
    ties). The returned scorer carries its C as ``proba.c`` (the refit on train + dev reuses it)."""
    from sklearn.linear_model import LogisticRegression

    x_tr, y_tr = embed_fn(train), [ex.label for ex in train]
    if c is None:
        x_dev, best = embed_fn(dev), None
        for grid_c in C_GRID:
            clf = LogisticRegression(C=grid_c, max_iter=1000, random_state=seed).fit(x_tr, y_tr)
            score = _acc(clf.predict(x_dev), dev)
            if best is None or score > best[0]:
                best = (score, clf, grid_c)
        head, c = best[1], best[2]
    else:
        head = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(x_tr, y_tr)
    n_classes = len(train.classes)

    def proba(examples: Sequence[Any]) -> np.ndarray:
        out = np.zeros((len(examples), n_classes))
        out[:, head.classes_] = head.predict_proba(embed_fn(list(examples)))   # classes absent from train: 0
        return out
    proba.c, proba.head = c, head          # the fitted head, for recipe_export (saving changes nothing here)
    return proba


def _logreg(base, tok, train, dev, seed, max_length, template, label_words, c=None) -> Proba:
    from promptdelta.bench.baselines import embed

    proba = _head(lambda ex: embed(base, tok, list(ex), max_length, windows=WINDOWS), train, dev, seed, c)
    proba.body, proba.tuned, proba.windows = base, False, WINDOWS  # what embedded the head's inputs, and how
    return proba


def _setfit(base, tok, train, dev, seed, max_length, template, label_words, c=None) -> Proba:
    """SetFit bodies (one per offset in ``SETFIT_SEEDS``, ``SETFIT_ROUNDS`` pair rounds each), their class
    probabilities averaged. One text: the body also trains on ``AUGMENT`` copies of each class description
    (SetFit's templated examples), and the head is the prior head (``fit_prior_head``) on the body's own
    zero-shot logits; text pairs: a logistic head (C on dev, or ``c[i]`` given by the refit)."""
    from promptdelta.bench.baselines import embed
    from promptdelta.data.examples import InputExample
    from promptdelta.train.contrastive import train_body_pairs

    pairs = any(ex.text_b is not None for ex in train)
    classes = [str(k) for k in train.classes]
    descs = None if pairs else class_descriptions(template or DEFAULT_TEMPLATE, tok, classes, label_words)
    body_train = train if pairs else train.like(list(train) + [
        InputExample(text=d, label=k) for _ in range(AUGMENT) for k, ds in enumerate(descs) for d in ds])
    heads = []
    for i, s in enumerate(SETFIT_SEEDS):
        seed_everything(seed + s)
        body = copy.deepcopy(base)
        train_body_pairs(body, tok, body_train, max_length=max_length, num_iterations=SETFIT_ROUNDS, lr=2e-5,
                         batch_size=16, seed=seed + s)
        body.requires_grad_(False)
        embed_fn = lambda ex, b=body: embed(b, tok, list(ex), max_length, windows=WINDOWS)   # noqa: E731
        given = None if c is None else c[i]
        if pairs:
            heads.append(_head(embed_fn, train, dev, seed, given))
        else:
            heads.append(_prior_head(embed_fn, class_vectors(body, tok, descs), train, dev, given))
        heads[-1].body, heads[-1].tuned, heads[-1].windows = body, True, WINDOWS
    proba = _mean_proba(heads)
    proba.c = [h.c for h in heads]
    return proba


def class_vectors(body: Any, tok: Any, descs: Sequence[Sequence[str]]) -> torch.Tensor:
    """(C, H): each class's mean embedding of its descriptions through ``body``."""
    from promptdelta.prompts.similarity import mean_embeddings

    flat = mean_embeddings(body, tok, [d for ds in descs for d in ds])                              # (sum W, H)
    return torch.stack([part.mean(0) for part in torch.split(flat, [len(ds) for ds in descs])])   # (C, H)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def fit_prior_head(x: np.ndarray, prior: np.ndarray, labels: Sequence[int], c: float) -> tuple[np.ndarray, np.ndarray]:
    """A multinomial logistic head fitted on top of fixed logits: minimises
    c sum_i CE(prior_i + W x_i + b, y_i) + 1/2 ||W||^2 (sklearn's C convention, b not penalised) over W (C, H),
    b (C,), by L-BFGS in float64. x (N, H), prior (N, C). W = 0 leaves the prior as it is; a small c keeps
    the head near it (the zero-shot-anchored linear probe of CLAP, Silva-Rodriguez et al. 2024)."""
    xt = torch.tensor(x, dtype=torch.float64)                                                     # (N, H)
    pt = torch.tensor(prior, dtype=torch.float64)                                                 # (N, C)
    yt = torch.tensor(np.asarray(labels), dtype=torch.long)
    w = torch.zeros(pt.shape[1], xt.shape[1], dtype=torch.float64, requires_grad=True)           # (C, H)
    b = torch.zeros(pt.shape[1], dtype=torch.float64, requires_grad=True)                        # (C,)
    opt = torch.optim.LBFGS([w, b], max_iter=1000, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = c * F.cross_entropy(pt + xt @ w.T + b, yt, reduction="sum") + 0.5 * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


@dataclass
class PriorHead:
    """softmax(cos(x, e_c) / tau + W x^ + b), x^ = x / |x|: what ``_prior_head`` fitted (recipe_export saves it)."""

    class_embeds: np.ndarray      # (C, H), unit rows
    temperature: float
    weight: np.ndarray            # (C, H)
    bias: np.ndarray              # (C,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        xn = _unit(x)                                                                             # (N, H)
        return xn @ self.class_embeds.T / self.temperature + xn @ self.weight.T + self.bias     # (N, C)


def _prior_head(embed_fn: Callable[[Sequence[Any]], np.ndarray], class_embeds: torch.Tensor, train: Sequence[Any],
                dev: Sequence[Any], c: float | None = None) -> Proba:
    """The prior head on ``embed_fn``'s unit vectors: the zero-shot logits cos(x, e_c) / tau (tau by likelihood on
    train, ``fit_temperature``) plus a logistic head fitted on top (``fit_prior_head``); C given, else chosen on
    dev, the smallest C (nearest the prior) of the best on ties."""
    e = _unit(class_embeds.float().numpy())                                                       # (C, H)
    x_tr, y_tr = _unit(embed_fn(train)), [ex.label for ex in train]
    cos_tr = x_tr @ e.T                                                                           # (N, C)
    tau = fit_temperature(cos_tr, y_tr)
    prior_tr = cos_tr / tau
    grid = C_GRID if c is None else (c,)
    x_dev = _unit(embed_fn(dev)) if c is None else None
    best = None
    for grid_c in grid:
        head = PriorHead(e, tau, *fit_prior_head(x_tr, prior_tr, y_tr, grid_c))
        score = _acc(head.logits(x_dev).argmax(-1), dev) if x_dev is not None else 0.0
        if best is None or score > best[0]:
            best = (score, head, grid_c)
    head = best[1]

    def proba(examples: Sequence[Any]) -> np.ndarray:
        return _softmax_np(head.logits(embed_fn(list(examples))))
    proba.c, proba.head = best[2], head
    return proba


def class_descriptions(template: str, tokenizer: Any, classes: Sequence[str],
                       label_words: Sequence[Sequence[str]] | None) -> list[list[str]]:
    """Each class's descriptions: ``template`` with its text placeholders left empty and its mask filled by each
    of the class's label words ('{"placeholder":"text_a"} It was {"mask"}.' -> "It was great."); the words
    alone when the template has no mask; the class name when there are no label words."""
    from promptdelta.data.examples import InputExample
    from promptdelta.prompts.dsl import parse_template
    from promptdelta.prompts.template import ManualTemplate

    words = [[str(c)] for c in classes] if label_words is None else [[w] if isinstance(w, str) else list(w)
                                                                      for w in label_words]
    if len(words) != len(classes):
        raise ConfigError(f"{len(words)} label-word lists for {len(classes)} classes; give one list per class")
    if not any(p.kind == "mask" for p in parse_template(template, require_mask=False)):
        return words
    pieces = ManualTemplate(template, tokenizer).wrap(InputExample(text="", text_b="", label=0))

    def fill(word: str) -> str:
        out = ""
        for text, p in pieces:
            part = word if p.kind == "mask" else (text if p.kind == "text" else "")
            if part.strip():
                out += (" " if out and p.space_before else "") + part.strip()
        return out
    return [[fill(w) for w in ws] for ws in words]


def _softmax_np(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(cos: np.ndarray, labels: Sequence[int]) -> float:
    """tau minimising the mean negative log-likelihood of softmax(cos / tau) on (cos (N, C), labels): one
    number, searched over 1/tau in [1, 1000] on a log grid; the zero-shot argmax does not depend on it."""
    y = np.asarray(labels)
    betas = np.logspace(0, 3, 61)
    nll = [-np.log(_softmax_np(cos * b)[np.arange(len(y)), y] + 1e-12).mean() for b in betas]
    return float(1.0 / betas[int(np.argmin(nll))])


def _zero_shot(base, tok, train, dev, seed, max_length, template, label_words, c=None) -> Proba:
    """The zero-shot candidate (module docstring): class descriptions for one text, the two texts' cosine for
    pairs. ``proba.clf`` is a prompt model with the same probabilities (recipe_export saves it)."""
    from promptdelta.bench.baselines import embed
    from promptdelta.data.examples import InputExample
    from promptdelta.prompts.registry import build_classifier
    from promptdelta.prompts.similarity import SimilarityVerbalizer
    from promptdelta.recipe_export import PairCosineVerbalizer, PairTemplate, PlainTemplate

    classes = [str(k) for k in train.classes]
    if any(ex.text_b is not None for ex in train):                     # text pairs: cos(h(a), h(b))
        def feature(examples: Sequence[Any]) -> np.ndarray:
            a = embed(base, tok, [InputExample(text=ex.text, label=ex.label) for ex in examples], max_length)
            b = embed(base, tok, [InputExample(text=ex.text_b or "", label=ex.label) for ex in examples],
                      max_length)                                                                   # (N, H) each
            a, b = (v / np.linalg.norm(v, axis=1, keepdims=True).clip(1e-12) for v in (a, b))
            return PairCosineVerbalizer.SCALE * (a * b).sum(1, keepdims=True)                      # (N, 1)
        fitted = _head(feature, train, dev, seed, c)
        verbalizer = PairCosineVerbalizer(classes)
        verbalizer.set_head(fitted.head)
        clf = build_classifier(base, tok, classes, PairTemplate(tok), verbalizer, readout="mean",
                               max_length=max_length)
        proba = _softmax_of(clf)
        proba.c = fitted.c
        return proba
    descs = class_descriptions(template, tok, classes, label_words)
    embeds = class_vectors(base, tok, descs)                                                      # (C, H)
    h = embed(base, tok, list(train), max_length, windows=WINDOWS)                                # (N, H)
    cos = (h / np.linalg.norm(h, axis=1, keepdims=True).clip(1e-12)) @ torch.nn.functional.normalize(
        embeds, dim=-1).numpy().T                                                                 # (N, C)
    verbalizer = SimilarityVerbalizer(classes, embeds, ["; ".join(ds) for ds in descs],
                                      temperature=fit_temperature(cos, [ex.label for ex in train]), trainable=False)
    clf = build_classifier(base, tok, classes, PlainTemplate(tok, windows=WINDOWS), verbalizer, readout="mean",
                           max_length=max_length)
    proba = _softmax_of(clf)
    proba.c = None
    return proba


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


def _softmax_of(clf: Any) -> Proba:
    @torch.no_grad()
    def proba(examples: Sequence[Any]) -> np.ndarray:
        clf.eval()
        ex = list(examples)
        parts = [clf(clf.collate(ex[i:i + 64])).float().softmax(-1).cpu().numpy() for i in range(0, len(ex), 64)]
        return np.concatenate(parts) if parts else np.zeros((0, len(clf.verbalizer.classes)))
    proba.clf = clf                        # a prompt model: recipe_export saves it as it is
    return proba


def _similarity(base, tok, train, dev, seed, max_length, template, label_words) -> Proba:
    opts = {} if label_words is None else {"label_words": label_words}
    return _softmax_of(_prompt_model(base, tok, list(train.classes), "similarity", opts, template, False,
                                     max_length, seed))


def _setfit_lora(base, tok, train, dev, seed, max_length, template, label_words) -> Proba:
    from promptdelta.train.contrastive import train_contrastive

    opts = {} if label_words is None else {"label_words": label_words}
    clf = _prompt_model(base, tok, list(train.classes), "soft", opts, template, True, max_length, seed)
    train_contrastive(clf, train, dev, objective="pairs", epochs=1, num_iterations=20, lr=1e-3,
                      batch_size=16, head="logistic", seed=seed)
    return _softmax_of(clf)


def _lora_soft(base, tok, train, dev, seed, max_length, template, label_words) -> Proba:
    from promptdelta.prompts.probe import probe_init
    from promptdelta.train import Trainer, TrainConfig

    opts = {} if label_words is None else {"label_words": label_words}
    clf = _prompt_model(base, tok, list(train.classes), "soft", opts, template, True, max_length, seed)
    probe_init(clf, train, dev, seed=seed)
    cfg = TrainConfig(lr=1e-3, epochs=20, batch_size=8, seed=seed, progress=False, eval_at_start=True)
    Trainer(clf, cfg, seed=seed).fit(train, dev)        # ends on the best dev epoch's weights
    return _softmax_of(clf)


RUNNERS: dict[str, Callable[..., Proba]] = {"logreg": _logreg, "setfit": _setfit, "lora-soft": _lora_soft,
                                            "similarity": _similarity, "setfit-lora": _setfit_lora,
                                            "zero-shot": _zero_shot}
REFIT = {"logreg", "setfit", "zero-shot"}  # trained without reading dev, once C is known: refit on train + dev
ZERO_SHOT = {"similarity", "zero-shot"}    # never averaged: the few-shot heads' mean stays what it was
KNOWN = tuple(RUNNERS) + ("ensemble",)


def _mean_proba(members: list[Proba]) -> Proba:
    def proba(examples: Sequence[Any]) -> np.ndarray:
        return np.mean([p(examples) for p in members], axis=0)
    proba.members = members                # recipe_export saves the mean of its members
    return proba


def auto_recipe(base: Any, tokenizer: Any, train: Sequence[Any], dev: Sequence[Any], *, budget_s: float = 3600.0,
                seed: int = 13, template: str = DEFAULT_TEMPLATE, label_words: Any = None,
                candidates: Sequence[str] = CANDIDATES, max_length: int = 128, refit: bool = True,
                echo: Callable[[str], None] = print) -> RecipeResult:
    """Run ``candidates`` in order within ``budget_s`` seconds; the best dev accuracy wins (never test).

    ``ensemble`` (when listed) averages the probabilities of the trained candidates that ran before it and
    replaces the best single one only if its dev accuracy is strictly higher. With ``refit`` (default) the
    choice, once made on dev, is trained again on train + dev with the head's C found on dev (grid search,
    then refit on all labelled data, as sklearn's ``GridSearchCV(refit=True)``): a few-shot task's dev is half
    of its labelled examples. Candidates that use dev inside training (lora-soft's best epoch) are not refit."""
    unknown = [c for c in candidates if c not in KNOWN]
    if unknown or not candidates:
        raise ConfigError(f"unknown recipe candidate(s) {unknown}; choose from {list(KNOWN)}")
    if not len(dev):
        raise ConfigError("the auto recipe chooses on dev, and dev is empty; give dev_shots > 0")
    echo(f"recipe auto: {len(candidates)} candidates ({', '.join(candidates)}), budget {budget_s:.0f} s, "
         f"chosen on dev ({len(dev)} examples)")
    start, table, best, members, fitted = time.perf_counter(), [], None, [], {}
    for name in candidates:
        spent = time.perf_counter() - start
        if table and spent >= budget_s:                     # the first candidate always runs
            table.append({"name": name, "dev": None, "seconds": 0.0, "status": "skipped: budget spent"})
            echo(f"  {name:12s} skipped (budget of {budget_s:.0f} s spent)")
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        if name == "ensemble":
            if len(members) < 2:
                table.append({"name": name, "dev": None, "seconds": 0.0, "status": "skipped: < 2 members"})
                echo(f"  {name:12s} skipped (fewer than 2 trained candidates ran)")
                continue
            dev_probs = np.mean([p for _, p, _ in members], axis=0)                    # (N_dev, C)
            proba = _mean_proba([f for _, _, f in members])
            member_names = [m for m, _, _ in members]
        else:
            proba = RUNNERS[name](base, tokenizer, train, dev, seed, max_length, template, label_words)
            dev_probs = proba(list(dev))                                               # (N_dev, C)
            fitted[name] = proba
            if name not in ZERO_SHOT:
                members.append((name, dev_probs, proba))
        score = _acc(dev_probs.argmax(-1), dev)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        # cpu_s: the process's CPU seconds, = wall seconds on an idle machine at 1 thread (load-independent)
        row = {"name": name, "dev": score, "seconds": secs, "cpu_s": cpu, "status": "ran"}
        if name == "ensemble":
            row["members"] = member_names
        table.append(row)
        echo(f"  {name:12s} dev accuracy {score:.4f}  ({secs:.1f} s, {cpu:.1f} s CPU)")
        if best is None or score > best[1]:
            best = (name, score, proba)
    echo(f"recipe auto: chose {best[0]} (dev accuracy {best[1]:.4f})")
    chosen_proba, names = best[2], (member_names if best[0] == "ensemble" else [best[0]])
    refitted = refit and all(n in REFIT for n in names)
    if refitted:
        chosen_proba = _refit(base, tokenizer, train, dev, seed, max_length, template, label_words, names,
                              fitted, table, echo)
    return RecipeResult(best[0], best[1], lambda ex: chosen_proba(list(ex)).argmax(-1).tolist(), table, budget_s,
                        chosen_proba, refitted, tokenizer, max_length, [str(c) for c in train.classes], names)


def _refit(base, tokenizer, train, dev, seed, max_length, template, label_words, names: list[str],
           probas: dict[str, Proba], table: list[dict[str, Any]], echo: Callable[[str], None]) -> Proba:
    """The chosen candidate (or each member of the chosen ensemble) trained again on train + dev, its head's C
    the one dev chose; the refit scorer has no dev score of its own (every labelled example trained it)."""
    full = train.like(list(train) + list(dev))          # an ExampleSet: the heads read train.classes
    t0, c0 = time.perf_counter(), time.process_time()
    parts = [RUNNERS[n](base, tokenizer, full, None, seed, max_length, template, label_words, c=probas[n].c)
             for n in names]
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    table.append({"name": "refit", "dev": None, "seconds": secs, "cpu_s": cpu, "status": "ran",
                  "members": names, "examples": len(full)})
    echo(f"  {'refit':12s} {'+'.join(names)} on train + dev ({len(full)} examples; {secs:.1f} s, {cpu:.1f} s CPU)")
    return parts[0] if len(parts) == 1 else _mean_proba(parts)


def run_recipe(config: Any, echo: Callable[[str], None] = print, overwrite: bool = False,
               write: bool = True) -> dict[str, Any]:
    """``promptdelta run --recipe auto``: per seed of ``config``, the auto recipe chosen on dev, then scored on
    test once; returns {"seeds": [{seed, chosen, dev, test, table}], "mean_test": float, "run_dir"}. With
    ``write``, ``runs/<name>/`` gets config.yaml, metrics.json and ``seed<N>/`` (the choice, recipe_export)."""
    from promptdelta import data as pdata
    from promptdelta.backbones import load_backbone
    from promptdelta.prompts.registry import label_words_option
    from promptdelta.recipe_export import open_run_dir, write_seed

    run_dir = open_run_dir(config, overwrite, echo) if write else None  # chosen (and said) before any training
    base, tok = load_backbone(config.backbone)
    rows, written = [], []
    for seed in config.seeds:
        train, dev, test = pdata.load(config.data, shots=config.shots, seed=seed, columns=config.columns or None)
        words = None
        if config.label_words is not None:
            words = label_words_option({"label_words": config.label_words}, tok, list(train.classes))
        echo(f"seed {seed}:")
        out = auto_recipe(base, tok, train, dev, seed=seed, label_words=words, max_length=config.max_length,
                          template=config.template if "{" in str(config.template) else DEFAULT_TEMPLATE,
                          budget_s=float(getattr(config, "recipe_budget_s", 3600.0)), echo=echo)
        test_acc = _acc(out.predict(list(test)), test)
        echo(f"seed {seed}: chose {out.chosen}, dev {out.dev_score:.4f}, test accuracy {test_acc:.4f}")
        rows.append({"seed": seed, "chosen": out.chosen, "dev": out.dev_score, "test": test_acc,
                     "table": out.table})
        if run_dir is not None:
            written.append({"seed": seed, "chosen": out.chosen, "members": out.members, "refit": out.refit,
                            "dev_accuracy": out.dev_score, "accuracy": test_acc, "n_train": len(train),
                            "n_dev": len(dev), "n_test": len(test), "table": out.table})
            echo(f"seed {seed}: wrote {write_seed(run_dir, seed, out, written)}")
    mean = float(np.mean([r["test"] for r in rows]))
    std = float(np.std([r["test"] for r in rows], ddof=1)) if len(rows) > 1 else 0.0
    echo(f"recipe auto: test accuracy {100 * mean:.1f} ± {100 * std:.1f} over {len(rows)} seed(s)")
    return {"seeds": rows, "mean_test": mean, "std_test": std, "run_dir": None if run_dir is None else str(run_dir)}

