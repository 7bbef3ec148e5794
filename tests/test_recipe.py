"""The auto recipe: every candidate runs on a tiny BERT, the choice is the best dev score (ties to the
cheaper), the budget bounds what runs, and test data is never given to it."""

import copy

import pytest
import torch

from promptdelta.data import load
from promptdelta.errors import ConfigError
from promptdelta.recipe import CANDIDATES, auto_recipe


@pytest.fixture(scope="module")
def setup(tiny_sentence_backbone):
    base, tok = tiny_sentence_backbone
    return base, tok, load("builtin:demo", shots=4, seed=13)


def test_every_candidate_runs_and_the_best_dev_wins(setup):
    base, tok, (train, dev, test) = setup
    said = []
    before = {k: v.clone() for k, v in base.state_dict().items()}
    out = auto_recipe(base, tok, train, dev, budget_s=600, seed=13, label_words=[["bad"], ["good"]],
                      max_length=32, echo=said.append)
    assert [r["name"] for r in out.table] == list(CANDIDATES) and all(r["status"] == "ran" for r in out.table)
    scores = [r["dev"] for r in out.table]
    assert out.dev_score == max(scores)
    assert out.chosen == out.table[scores.index(max(scores))]["name"]            # first of the best: cheaper
    assert "budget 600 s" in said[0] and f"chose {out.chosen}" in said[-1]
    preds = out.predict(list(test))
    assert len(preds) == len(test) and set(preds) <= {0, 1}
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())  # the base is never modified


def test_budget_bounds_the_candidates(setup):
    base, tok, (train, dev, _) = setup
    out = auto_recipe(base, tok, train, dev, budget_s=0, max_length=32, echo=lambda s: None)
    assert [r["status"] for r in out.table] == ["ran"] + ["skipped: budget spent"] * (len(CANDIDATES) - 1)
    assert out.chosen == "logreg"


def test_bad_candidates_and_empty_dev_are_named(setup):
    base, tok, (train, dev, _) = setup
    with pytest.raises(ConfigError, match="unknown recipe candidate"):
        auto_recipe(base, tok, train, dev, candidates=["magic"])
    with pytest.raises(ConfigError, match="dev is empty"):
        auto_recipe(base, tok, train, [], echo=lambda s: None)


def test_cli_run_recipe_auto(tiny_bert_nohead_dir, capsys):
    from promptdelta import cli

    rc = cli.main(["run", "--recipe", "auto", "--backbone", str(tiny_bert_nohead_dir), "--data", "builtin:demo",
                   "--shots", "4", "--seeds", "13", "--max-length", "32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "budget" in out and "recipe auto: chose" in out and "test accuracy" in out
    for name in CANDIDATES:
        assert f"  {name}" in out
