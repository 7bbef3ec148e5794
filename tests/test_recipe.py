"""The auto recipe: every candidate runs on a tiny BERT, the choice is the best dev score (ties to the
cheaper), the budget bounds what runs, and test data is never given to it."""

import copy

import numpy as np
import pytest
import torch

from promptdelta.data import load
from promptdelta.errors import ConfigError
from promptdelta.recipe import CANDIDATES, REFIT, RUNNERS, ZERO_SHOT, auto_recipe


@pytest.fixture(scope="module")
def setup(tiny_sentence_backbone):
    base, tok = tiny_sentence_backbone
    return base, tok, load("builtin:demo", shots=4, seed=13)


def test_every_candidate_runs_and_the_best_dev_wins(setup):
    base, tok, (train, dev, test) = setup
    said = []
    before = {k: v.clone() for k, v in base.state_dict().items()}
    everything = [*RUNNERS, "ensemble"]                                         # defaults + optional ones
    out = auto_recipe(base, tok, train, dev, budget_s=600, seed=13, label_words=[["bad"], ["good"]],
                      candidates=everything, max_length=32, echo=said.append)
    rows = [r for r in out.table if r["name"] != "refit"]
    assert [r["name"] for r in rows] == everything and all(r["status"] == "ran" for r in out.table)
    assert rows[-1]["members"] == [n for n in RUNNERS if n not in ZERO_SHOT]     # zero-shot is not averaged
    scores = [r["dev"] for r in rows]
    assert out.dev_score == max(scores)
    assert out.chosen == rows[scores.index(max(scores))]["name"]                 # ties: the first listed
    assert out.refit == (out.chosen in REFIT) == (out.table[-1]["name"] == "refit")
    assert "budget 600 s" in said[0] and f"chose {out.chosen}" in said[-2 if out.refit else -1]
    preds, proba = out.predict(list(test)), out.proba(list(test))
    assert len(preds) == len(test) and set(preds) <= {0, 1}
    assert np.allclose(proba.sum(-1), 1.0) and preds == proba.argmax(-1).tolist()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())  # the base is never modified


def test_budget_bounds_the_candidates(setup):
    base, tok, (train, dev, _) = setup
    out = auto_recipe(base, tok, train, dev, budget_s=0, max_length=32, echo=lambda s: None)
    rows = [r["status"] for r in out.table if r["name"] != "refit"]
    assert rows == ["ran"] + ["skipped: budget spent"] * (len(CANDIDATES) - 1)
    assert out.chosen == CANDIDATES[0] and out.refit          # the choice's refit is not a candidate: it runs


def test_bad_candidates_and_empty_dev_are_named(setup):
    base, tok, (train, dev, _) = setup
    with pytest.raises(ConfigError, match="unknown recipe candidate"):
        auto_recipe(base, tok, train, dev, candidates=["magic"])
    with pytest.raises(ConfigError, match="dev is empty"):
        auto_recipe(base, tok, train, [], echo=lambda s: None)


def test_cli_run_recipe_auto(tiny_bert_nohead_dir, capsys, tmp_path):
    from promptdelta import cli

    rc = cli.main(["run", "--recipe", "auto", "--backbone", str(tiny_bert_nohead_dir), "--data", "builtin:demo",
                   "--shots", "4", "--seeds", "13", "--max-length", "32", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "budget" in out and "recipe auto: chose" in out and "test accuracy" in out
    for name in CANDIDATES:
        assert f"  {name}" in out


def fake(dev_labels, right, confidence):
    """A candidate whose dev probabilities put ``confidence`` on the true class where ``right`` else on the
    other class (binary); on other inputs it predicts class 0."""
    def runner(base, tok, train, dev, seed, max_length, template, label_words, c=None):
        def proba(examples):
            if len(examples) != len(dev_labels):
                return np.tile([0.9, 0.1], (len(examples), 1))
            p = np.zeros((len(examples), 2))
            for i, (y, ok, c) in enumerate(zip(dev_labels, right, confidence)):
                p[i, y if ok else 1 - y], p[i, 1 - y if ok else y] = c, 1 - c
            return p
        proba.c = c
        return proba
    return runner


@pytest.mark.parametrize("complementary", [True, False])
def test_ensemble_is_kept_only_when_its_dev_beats_the_best_single(setup, monkeypatch, complementary):
    import promptdelta.recipe as recipe

    base, tok, (train, dev, _) = setup
    y = [ex.label for ex in dev]
    n = len(y)
    half = [i < n // 2 for i in range(n)]
    # a: right on the first half, sure there and unsure elsewhere; b: the mirror image. Averaged, each is
    # right where it is sure: the ensemble is perfect. Non-complementary: b is a's copy, the mean is a.
    b_right = [not h for h in half] if complementary else half
    monkeypatch.setitem(recipe.RUNNERS, "logreg", fake(y, half, [0.9 if h else 0.6 for h in half]))
    monkeypatch.setitem(recipe.RUNNERS, "setfit", fake(y, b_right, [0.9 if r else 0.6 for r in b_right]))
    out = auto_recipe(base, tok, train, dev, candidates=["logreg", "setfit", "ensemble"], refit=False,
                      echo=lambda s: None)
    dev_of = {r["name"]: r["dev"] for r in out.table}
    assert out.table[-1]["members"] == ["logreg", "setfit"]
    if complementary:
        assert dev_of["ensemble"] == 1.0 and out.chosen == "ensemble"
        assert out.proba(list(dev)).argmax(-1).tolist() == y
    else:
        assert dev_of["ensemble"] == dev_of["logreg"] and out.chosen == "logreg"   # a tie keeps the single


def test_test_labels_are_never_read(tiny_sentence_backbone):
    """The harness cell gives the recipe (train, dev, test): poisoned test labels change no choice nor score."""
    from promptdelta.bench.peers_harness import run_recipe_cell
    from promptdelta.data import InputExample

    base, tok = tiny_sentence_backbone
    train, dev, test = load("builtin:demo", shots=4, seed=21)
    poisoned = test.like([InputExample(text_a=ex.text_a, text_b=ex.text_b, label=1 - ex.label) for ex in test])
    task = {"label_words": {"negative": ["bad"], "positive": ["good"]}}
    opts = {"candidates": ["logreg", "setfit", "ensemble"]}
    rows = [run_recipe_cell(base, tok, (train, dev, t), 32, opts, 21, task) for t in (test, poisoned)]
    assert [ex.label for ex in poisoned] != [ex.label for ex in test]
    assert rows[0]["preds"] == rows[1]["preds"] and rows[0]["chosen"] == rows[1]["chosen"]
    assert rows[0]["grid_dev"] == rows[1]["grid_dev"]


def test_setfit_candidate_averages_two_differently_seeded_bodies(setup, monkeypatch):
    import promptdelta.recipe as recipe

    base, tok, (train, dev, test) = setup
    monkeypatch.setattr(recipe, "SETFIT_SEEDS", (0, 1))
    run = lambda: recipe.RUNNERS["setfit"](base, tok, train, dev, 13, 32, recipe.DEFAULT_TEMPLATE, None)(list(test))
    both = run()
    singles = []
    for s in recipe.SETFIT_SEEDS:
        monkeypatch.setattr(recipe, "SETFIT_SEEDS", (s,))
        singles.append(run())
    assert len(singles) == 2 and not np.allclose(singles[0], singles[1])       # two different bodies
    assert np.allclose(both, np.mean(singles, axis=0), atol=1e-6)



def recording(calls, name, c_found, inner=None):
    """A candidate that records how it was called (train size, dev given, C); ``inner`` (a ``fake``) gives its
    probabilities, else it predicts class 0 everywhere."""
    def runner(base, tok, train, dev, seed, max_length, template, label_words, c=None):
        calls.append((name, len(train), dev is not None, c))
        if inner is not None:
            proba = inner(base, tok, train, dev, seed, max_length, template, label_words, c)
        else:
            proba = lambda examples: np.tile([0.6, 0.4], (len(examples), 1))
        proba.c = c_found if c is None else c
        return proba
    return runner


@pytest.mark.parametrize("chosen", ["logreg", "ensemble", "lora-soft"])
def test_the_choice_is_refit_on_train_plus_dev_with_the_c_dev_chose(setup, monkeypatch, chosen):
    import promptdelta.recipe as recipe

    base, tok, (train, dev, test) = setup
    y = [ex.label for ex in dev]
    half = [i < len(y) // 2 for i in range(len(y))]
    calls = []
    inner = {"logreg": fake(y, half, [0.9 if h else 0.6 for h in half]),              # complementary members:
             "setfit": fake(y, [not h for h in half], [0.6 if h else 0.9 for h in half])}   # the ensemble wins
    for name, c in (("logreg", 0.1), ("setfit", [10.0]), ("lora-soft", None)):
        monkeypatch.setitem(recipe.RUNNERS, name, recording(calls, name, c, inner.get(name)))
    candidates = {"logreg": ["logreg"], "ensemble": ["setfit", "logreg", "ensemble"], "lora-soft": ["lora-soft"]}
    out = auto_recipe(base, tok, train, dev, candidates=candidates[chosen], echo=lambda s: None)
    assert out.chosen == chosen
    if chosen == "lora-soft":                               # uses dev for its best epoch: never refit
        assert not out.refit and calls == [("lora-soft", len(train), True, None)]
        return
    picked = out.table[-1]
    assert out.refit and picked["name"] == "refit" and picked["examples"] == len(train) + len(dev)
    members = ["setfit", "logreg"] if chosen == "ensemble" else [chosen]
    again = [cl for cl in calls if not cl[2]]               # the refit calls: no dev, every labelled example
    assert picked["members"] == members and [cl[0] for cl in again] == members
    assert all(n == len(train) + len(dev) for _, n, _, _ in again)
    assert {name: c for name, _, _, c in again} == {n: {"logreg": 0.1, "setfit": [10.0]}[n] for n in members}
    assert all(cl[3] is None for cl in calls if cl[2])      # the selection runs choose C on dev themselves
    assert len(out.predict(list(test))) == len(test)
    calls.clear()
    plain = auto_recipe(base, tok, train, dev, candidates=candidates[chosen], refit=False, echo=lambda s: None)
    assert not plain.refit and all(r["name"] != "refit" for r in plain.table) and all(cl[2] for cl in calls)
