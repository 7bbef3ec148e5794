"""What the auto recipe chose is saved: the folder's probabilities are the recipe's own (logreg, setfit, their
ensemble; single texts and pairs), `promptdelta run --recipe auto` writes a run folder that `promptdelta predict`
reads, and nothing finished is replaced without the flag."""

import json
import sys

import numpy as np
import pytest
import torch

from promptdelta.data import InputExample, load
from promptdelta.data.examples import ExampleSet
from promptdelta.errors import CheckpointError, MissingFileError
from promptdelta.prompts.model import PromptForClassification
from promptdelta.recipe import RUNNERS, RecipeResult, _mean_proba, auto_recipe
from promptdelta.recipe_export import ENSEMBLE_FILE, RecipeEnsemble, load_recipe

ML = 32


@pytest.fixture(scope="module")
def setup(tiny_sentence_backbone):
    base, tok = tiny_sentence_backbone
    return base, tok, load("builtin:demo", shots=4, seed=13)


def pairs(split):
    """The demo task as a pair task: text_b a second sentence (token types 1 for it)."""
    return split.like([InputExample(text_a=ex.text_a, text_b=f"said a viewer, number {i}.", label=ex.label)
                       for i, ex in enumerate(split)])


def ensemble_result(members, tok, train):
    """A RecipeResult whose choice is the mean of ``members`` (logreg, setfit), as auto_recipe makes it."""
    proba = _mean_proba(members)
    return RecipeResult("ensemble", 1.0, lambda ex: proba(list(ex)).argmax(-1).tolist(), proba=proba,
                        tokenizer=tok, max_length=ML, classes=list(train.classes), members=["logreg", "setfit"])


def saved_probs(folder, examples):
    return load_recipe(folder).predict(list(examples), batch_size=3).probs.numpy()


@pytest.mark.parametrize("choice", ["logreg", "setfit"])
def test_single_choice_round_trip(setup, tmp_path, choice):
    base, tok, (train, dev, test) = setup
    out = auto_recipe(base, tok, train, dev, candidates=[choice], max_length=ML, echo=lambda s: None)
    assert out.refit and out.members == [choice]
    out.save_pretrained(tmp_path / "clf")
    clf = PromptForClassification.from_pretrained(tmp_path / "clf")         # the plain classifier loader reads it
    got = clf.predict(list(test), batch_size=3).probs.numpy()
    assert np.allclose(got, out.proba(list(test)), atol=1e-5)
    assert clf.predict(list(test)).tolist() == out.predict(list(test))
    assert (tmp_path / "clf" / "backbone").is_dir()             # setfit tuned it; the tiny live base has no name
    record = json.loads((tmp_path / "clf" / "recipe.json").read_text())
    assert record["chosen"] == choice and record["refit"] is True


def test_setfit_body_is_the_tuned_one(setup, tmp_path):
    """The saved setfit body differs from the base (tuned), and the logreg body is the base itself."""
    base, tok, (train, dev, _) = setup
    for choice in ("setfit", "logreg"):
        out = auto_recipe(base, tok, train, dev, candidates=[choice], max_length=ML, refit=False,
                          echo=lambda s: None)
        out.save_pretrained(tmp_path / choice)
    hidden = {c: load_recipe(tmp_path / c).backbone.state_dict() for c in ("setfit", "logreg")}
    same = [torch.equal(v, hidden["logreg"][k]) for k, v in hidden["setfit"].items()]
    assert not all(same)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in hidden["logreg"].items())


def test_ensemble_round_trip_on_a_pair_task(setup, tmp_path):
    base, tok, (train, dev, test) = setup
    train, dev, test = pairs(train), pairs(dev), pairs(test)
    members = [RUNNERS[n](base, tok, train, dev, 13, ML, None, None) for n in ("logreg", "setfit")]
    out = ensemble_result(members, tok, train)
    out.save_pretrained(tmp_path / "ens")
    record = json.loads((tmp_path / "ens" / ENSEMBLE_FILE).read_text())
    assert [m["name"] for m in record["members"]] == ["logreg", "setfit"]
    assert [m["weight"] for m in record["members"]] == [0.5, 0.5]
    loaded = load_recipe(tmp_path / "ens")
    assert isinstance(loaded, RecipeEnsemble)
    want = out.proba(list(test))
    assert np.allclose(saved_probs(tmp_path / "ens", test), want, atol=1e-5)
    # each member is a classifier folder of its own, with its member's probabilities
    first = PromptForClassification.from_pretrained(tmp_path / "ens" / record["members"][0]["folder"])
    assert np.allclose(first.predict(list(test)).probs.numpy(), members[0](list(test)), atol=1e-5)
    # the pair matters: the same texts without text_b score differently
    single = [InputExample(text_a=ex.text_a, label=ex.label) for ex in test]
    assert not np.allclose(saved_probs(tmp_path / "ens", single), want, atol=1e-5)


def test_multiclass_head_with_a_class_absent_from_train(setup, tmp_path):
    """3 classes, the third never in train: the recipe gives it probability 0, and so does the folder."""
    base, tok, (train, dev, test) = setup
    three = ["negative", "positive", "neutral"]
    train3 = ExampleSet(list(train), three)
    test3 = ExampleSet(list(test) + [InputExample(text_a="It was fine, I guess.", label=2)], three)
    out = auto_recipe(base, tok, train3, ExampleSet(list(dev), three), candidates=["logreg"], max_length=ML,
                      echo=lambda s: None)
    out.save_pretrained(tmp_path / "three")
    got = saved_probs(tmp_path / "three", test3)
    assert got.shape == (len(test3), 3) and np.all(got[:, 2] == 0.0)
    assert np.allclose(got, out.proba(list(test3)), atol=1e-5)


def test_save_refuses_to_replace_without_overwrite(setup, tmp_path):
    base, tok, (train, dev, test) = setup
    out = auto_recipe(base, tok, train, dev, candidates=["logreg"], max_length=ML, echo=lambda s: None)
    out.save_pretrained(tmp_path / "clf")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        out.save_pretrained(tmp_path / "clf")
    out.save_pretrained(tmp_path / "clf", overwrite=True)
    assert np.allclose(saved_probs(tmp_path / "clf", test), out.proba(list(test)), atol=1e-5)


def _run_args(folder, out_dir, *extra):
    return ["run", "--recipe", "auto", "--backbone", str(folder), "--data", "builtin:demo", "--shots", "4",
            "--seeds", "13", "--max-length", str(ML), "--output-dir", str(out_dir), "--name", "r", *extra]


def test_cli_run_writes_a_folder_that_predict_reads(tiny_bert_nohead_dir, tmp_path, capsys, monkeypatch):
    from promptdelta import cli

    assert cli.main(_run_args(tiny_bert_nohead_dir, tmp_path)) == 0
    said = capsys.readouterr().out
    run_dir = tmp_path / "r"
    assert f"wrote {run_dir}" in said and f"--model {run_dir}/seed13" in said
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row = metrics["rows"][0]
    assert row["seed"] == 13 and row["chosen"] in ("setfit", "zero-shot") and "refit" in row
    assert {r["name"] for r in row["table"]} >= {"setfit", "zero-shot"}
    assert (run_dir / "config.yaml").is_file() and metrics["summary"]["best_seed_dir"] == "seed13"
    # predict reads the seed folder; its labels score the test accuracy the recipe printed
    _, _, test = load("builtin:demo", shots=4, seed=13)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": ex.text_a}) + "\n" for ex in test))
    assert cli.main(["predict", "--model", str(run_dir / "seed13"), "--input", str(tmp_path / "in.jsonl"),
                     "--output", str(tmp_path / "out.jsonl")]) == 0
    labels = [json.loads(line)["label"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    acc = np.mean([lab == test.classes[ex.label] for lab, ex in zip(labels, test)])
    assert acc == pytest.approx(row["accuracy"])
    capsys.readouterr()
    # an output folder that is a file is refused before anything trains (the run folder's cases, for this
    # command and plain `run` alike: tests/test_run_folders.py); --overwrite replaces the run
    import promptdelta.recipe as recipe

    def never(*a, **k):
        raise AssertionError("trained before refusing")
    monkeypatch.setattr(recipe, "auto_recipe", never)
    assert cli.main(_run_args(tiny_bert_nohead_dir, tmp_path / "in.jsonl")) != 0     # a file, not a folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a writable folder" in err[0] and "--output-dir" in err[0]
    monkeypatch.undo()
    assert cli.main(_run_args(tiny_bert_nohead_dir, tmp_path, "--overwrite")) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["rows"][0]["seed"] == 13


def test_auto_recipe_ensemble_choice_with_refit_round_trips(setup, tmp_path, monkeypatch):
    """auto_recipe's own ensemble (its members refit on train + dev), the choice forced by the dev scores."""
    import promptdelta.recipe as recipe

    base, tok, (train, dev, test) = setup
    real, scores = recipe._acc, iter([0.5, 0.6, 0.9])      # logreg, setfit, ensemble: the ensemble wins

    def acc(preds, examples):                               # only auto_recipe's own dev scores (not C's grid)
        return next(scores) if sys._getframe(1).f_code.co_name == "auto_recipe" else real(preds, examples)
    monkeypatch.setattr(recipe, "_acc", acc)
    out = auto_recipe(base, tok, train, dev, candidates=["logreg", "setfit", "ensemble"], max_length=ML,
                      echo=lambda s: None)
    assert out.chosen == "ensemble" and out.refit and out.members == ["logreg", "setfit"]
    out.save_pretrained(tmp_path / "ens")
    assert (tmp_path / "ens" / ENSEMBLE_FILE).is_file()
    assert np.allclose(saved_probs(tmp_path / "ens", test), out.proba(list(test)), atol=1e-5)
    with pytest.raises(MissingFileError, match="load_recipe"):          # the plain loader points to the right one
        PromptForClassification.from_pretrained(tmp_path / "ens")


@pytest.mark.parametrize("choice", ["similarity", "lora-soft"])
def test_optional_prompt_model_choices_round_trip(tiny_bert_nohead_dir, tmp_path, choice):
    """Optional candidates are prompt models already: saved as they are (lora-soft's delta beside its base's
    recorded folder), with the recipe's probabilities."""
    from promptdelta.backbones import load_backbone

    base, tok = load_backbone(str(tiny_bert_nohead_dir))
    train, dev, test = load("builtin:demo", shots=4, seed=13)
    out = auto_recipe(base, tok, train, dev, candidates=[choice], max_length=ML, label_words=[["bad"], ["good"]],
                      echo=lambda s: None)
    out.save_pretrained(tmp_path / choice)
    assert not (tmp_path / choice / "backbone").exists()                  # the base is recorded by its folder
    assert (tmp_path / choice / "delta").is_dir() == (choice == "lora-soft")
    assert np.allclose(saved_probs(tmp_path / choice, test), out.proba(list(test)), atol=1e-5)


def test_nested_means_flatten_to_member_weights(setup, tmp_path, monkeypatch):
    """SetFit over two bodies inside the ensemble: members logreg 1/2, each setfit body 1/4."""
    import promptdelta.recipe as recipe

    base, tok, (train, dev, test) = setup
    monkeypatch.setattr(recipe, "SETFIT_SEEDS", (0, 1))
    members = [RUNNERS[n](base, tok, train, dev, 13, ML, None, None) for n in ("logreg", "setfit")]
    out = ensemble_result(members, tok, train)
    out.save_pretrained(tmp_path / "ens")
    record = json.loads((tmp_path / "ens" / ENSEMBLE_FILE).read_text())
    assert [(m["name"], m["weight"]) for m in record["members"]] == [("logreg", 0.5), ("setfit", 0.25),
                                                                     ("setfit", 0.25)]
    assert np.allclose(saved_probs(tmp_path / "ens", test), out.proba(list(test)), atol=1e-5)
