"""The recipe's zero-shot candidate: class descriptions from the template, the embedding model's cosine to
them (one text) or between the two texts (pairs), probabilities equal to a direct computation, never
averaged into the ensemble, refit on train + dev, and saved as a folder that predicts the same."""

import numpy as np
import pytest
import torch

from promptdelta.bench.baselines import embed
from promptdelta.data import InputExample, load
from promptdelta.errors import ConfigError
from promptdelta.prompts.model import PromptForClassification
from promptdelta.prompts.similarity import mean_embeddings
from promptdelta.recipe import RUNNERS, auto_recipe, class_descriptions, fit_temperature

ML = 32
TEMPLATE = '{"placeholder":"text_a","shortenable":true} It was {"mask"}.'


@pytest.fixture(scope="module")
def setup(tiny_sentence_backbone):
    base, tok = tiny_sentence_backbone
    return base, tok, load("builtin:demo", shots=4, seed=13)


def pairs(split):
    return split.like([InputExample(text_a=ex.text_a, text_b=f"a viewer wrote review {i}.", label=ex.label)
                       for i, ex in enumerate(split)])


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("template, words, want", [
    (TEMPLATE, [["terrible"], ["great", "good"]], [["It was terrible."], ["It was great.", "It was good."]]),
    ('[ Topic : {"mask"} ] {"placeholder":"text_a"}', [["world"], ["sports"]], [["[ Topic : world ]"],
                                                                                 ["[ Topic : sports ]"]]),
    ('{"placeholder":"text_a"} {"placeholder":"text_b"}', [["no"], ["yes"]], [["no"], ["yes"]]),  # no mask
    (TEMPLATE, None, [["It was negative."], ["It was positive."]]),                                   # names
])
def test_class_descriptions_fill_the_mask_and_leave_the_text_out(setup, template, words, want):
    _, tok, _ = setup
    assert class_descriptions(template, tok, ["negative", "positive"], words) == want


def test_class_descriptions_need_one_word_list_per_class(setup):
    _, tok, _ = setup
    with pytest.raises(ConfigError, match="2 classes"):
        class_descriptions(TEMPLATE, tok, ["negative", "positive"], [["bad"]])


def test_temperature_is_the_likelihood_optimum():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    cos = rng.normal(0, 0.05, (200, 3))
    cos[np.arange(200), y] += 0.08                            # informative but noisy: a finite optimum
    tau = fit_temperature(cos, y)

    def nll(t):
        z = cos / t
        z = z - z.max(1, keepdims=True)
        return -(z[np.arange(200), y] - np.log(np.exp(z).sum(1))).mean()
    assert 1e-3 <= tau <= 1.0
    assert nll(tau) <= min(nll(tau * 1.5), nll(tau / 1.5))


def test_single_text_probabilities_are_the_cosine_softmax(setup):
    base, tok, (train, dev, test) = setup
    words = [["bad"], ["good", "fine"]]
    proba = RUNNERS["zero-shot"](base, tok, train, dev, 13, ML, TEMPLATE, words)
    descs = class_descriptions(TEMPLATE, tok, list(train.classes), words)
    e = torch.stack([mean_embeddings(base, tok, ds).mean(0) for ds in descs]).numpy()          # (C, H)
    cos_train = unit(embed(base, tok, list(train), ML)) @ unit(e).T
    tau = fit_temperature(cos_train, [ex.label for ex in train])
    z = unit(embed(base, tok, list(test), ML)) @ unit(e).T / tau
    want = np.exp(z - z.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    assert np.allclose(proba(list(test)), want, atol=1e-5)
    assert proba.clf.verbalizer.temperature == pytest.approx(tau)
    assert not any(p.requires_grad for p in proba.clf.verbalizer.parameters())


def test_pair_probabilities_are_a_logistic_head_on_the_two_texts_cosine(setup):
    from sklearn.linear_model import LogisticRegression

    base, tok, (train, dev, test) = setup
    train, dev, test = pairs(train), pairs(dev), pairs(test)
    proba = RUNNERS["zero-shot"](base, tok, train, dev, 13, ML, TEMPLATE, None)

    def feature(split):
        a = embed(base, tok, [InputExample(text=ex.text_a) for ex in split], ML)
        b = embed(base, tok, [InputExample(text=ex.text_b) for ex in split], ML)
        return 10.0 * (unit(a) * unit(b)).sum(1, keepdims=True)
    head = LogisticRegression(C=proba.c, max_iter=1000, random_state=13).fit(feature(train),
                                                                          [ex.label for ex in train])
    assert np.allclose(proba(list(test)), head.predict_proba(feature(test)), atol=1e-5)
    # the texts are read apart: swapping text_a and text_b gives the same cosine
    swapped = [InputExample(text_a=ex.text_b, text_b=ex.text_a, label=ex.label) for ex in test]
    assert np.allclose(proba(swapped), proba(list(test)), atol=1e-5)


def test_zero_shot_is_never_averaged_and_is_refit(setup):
    base, tok, (train, dev, _) = setup
    out = auto_recipe(base, tok, train, dev, candidates=["logreg", "zero-shot", "setfit", "ensemble"],
                      template=TEMPLATE, label_words=[["bad"], ["good"]], max_length=ML, echo=lambda s: None)
    ens = next(r for r in out.table if r["name"] == "ensemble")
    assert ens["members"] == ["logreg", "setfit"]
    only = auto_recipe(base, tok, train, dev, candidates=["zero-shot"], template=TEMPLATE,
                       label_words=[["bad"], ["good"]], max_length=ML, echo=lambda s: None)
    assert only.chosen == "zero-shot" and only.refit and only.table[-1]["examples"] == len(train) + len(dev)


@pytest.mark.parametrize("pair", [False, True])
def test_zero_shot_choice_round_trips(setup, tmp_path, pair):
    from promptdelta.recipe_export import load_recipe

    base, tok, (train, dev, test) = setup
    if pair:
        train, dev, test = pairs(train), pairs(dev), pairs(test)
    out = auto_recipe(base, tok, train, dev, candidates=["zero-shot"], template=TEMPLATE,
                      label_words=[["bad"], ["good"]], max_length=ML, echo=lambda s: None)
    out.save_pretrained(tmp_path / "zs")
    clf = load_recipe(tmp_path / "zs")
    assert isinstance(clf, PromptForClassification)
    got = clf.predict(list(test), batch_size=3).probs.numpy()
    assert np.allclose(got, out.proba(list(test)), atol=1e-5)
    assert clf.predict(list(test)).tolist() == out.predict(list(test))
