"""The recipe's SetFit candidate on one text: its body also trains on the class descriptions (SetFit's templated
examples), and its head is fitted on top of the body's own zero-shot logits (the prior head). The head's fit
is checked against sklearn (no prior) and against its optimality conditions (with one), the head with no
weights is the zero-shot classifier, and the saved folder predicts the recipe's probabilities."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from promptdelta.bench.baselines import embed
from promptdelta.data import load
from promptdelta.prompts.model import PromptForClassification
from promptdelta.recipe import (AUGMENT, C_GRID, RUNNERS, PriorHead, auto_recipe, class_descriptions,
                                class_vectors, fit_prior_head)
from promptdelta.recipe_export import PriorLinearVerbalizer

ML = 32
TEMPLATE = '{"placeholder":"text_a","shortenable":true} It was {"mask"}.'


@pytest.fixture(scope="module")
def setup(tiny_sentence_backbone):
    base, tok = tiny_sentence_backbone
    return base, tok, load("builtin:demo", shots=4, seed=13)


def blobs(n=60, h=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, h)) + 1.5 * np.eye(classes, h)[y]
    return x, y


@pytest.mark.parametrize("c", [0.05, 1.0, 20.0])
def test_without_a_prior_the_head_is_sklearns_multinomial_logistic_regression(c):
    x, y = blobs()
    w, b = fit_prior_head(x, np.zeros((len(y), 3)), y, c)
    ref = LogisticRegression(C=c, max_iter=10000, tol=1e-10).fit(x, y)
    z = x @ w.T + b
    got = np.exp(z - z.max(1, keepdims=True))
    got /= got.sum(1, keepdims=True)
    assert np.allclose(got, ref.predict_proba(x), atol=1e-5)


def test_with_a_prior_the_fit_is_the_optimum():
    """Gradient of c sum CE(prior + W x + b) + |W|^2 / 2 vanishes at the returned W, b (and not at W = 0)."""
    x, y = blobs(seed=1)
    prior = np.random.default_rng(2).normal(size=(len(y), 3)) * 2.0
    c = 0.7

    def grads(w, b):
        wt = torch.tensor(w, requires_grad=True)
        bt = torch.tensor(b, requires_grad=True)
        z = torch.tensor(prior) + torch.tensor(x) @ wt.T + bt
        loss = c * torch.nn.functional.cross_entropy(z, torch.tensor(y), reduction="sum") + 0.5 * (wt * wt).sum()
        loss.backward()
        return wt.grad.abs().max().item(), bt.grad.abs().max().item()
    w, b = fit_prior_head(x, prior, y, c)
    assert max(grads(w, b)) < 1e-6
    assert max(grads(np.zeros_like(w), np.zeros_like(b))) > 1e-2
    w_small, _ = fit_prior_head(x, prior, y, 1e-6)          # a tiny C keeps the prior: W -> 0
    assert np.abs(w_small).max() < 1e-4 < np.abs(w).max()


def test_a_head_with_no_weights_is_the_zero_shot_classifier(setup):
    base, tok, (train, dev, test) = setup
    descs = class_descriptions(TEMPLATE, tok, list(train.classes), [["terrible"], ["great"]])
    e = class_vectors(base, tok, descs)                                                   # (C, H)
    h = embed(base, tok, list(test), ML)
    unit_e = (e / e.norm(dim=-1, keepdim=True)).numpy()
    head = PriorHead(unit_e, 0.05, np.zeros_like(unit_e), np.zeros(len(unit_e)))
    cos = h @ unit_e.T / np.linalg.norm(h, axis=1, keepdims=True)
    assert np.allclose(head.logits(h), cos / 0.05, atol=1e-5)
    verbalizer = PriorLinearVerbalizer(list(train.classes), e, 0.05)
    assert torch.allclose(verbalizer.process(torch.tensor(h), None, None), torch.tensor(cos / 0.05, dtype=torch.float32),
                          atol=1e-4)


def test_the_body_trains_on_the_class_descriptions_and_the_head_on_its_prior(setup, monkeypatch):
    import promptdelta.train.contrastive as contrastive

    base, tok, (train, dev, test) = setup
    seen = []
    real = contrastive.train_body_pairs

    def spy(body, tok_, examples, **kw):
        seen.append(list(examples))
        return real(body, tok_, examples, **kw)
    monkeypatch.setattr(contrastive, "train_body_pairs", spy)
    proba = RUNNERS["setfit"](base, tok, train, dev, 13, ML, TEMPLATE, [["terrible"], ["great"]])
    extra = seen[0][len(train):]
    assert seen[0][:len(train)] == list(train) and len(extra) == AUGMENT * 2
    assert sorted((ex.text, ex.label) for ex in extra) == sorted([("It was terrible.", 0), ("It was great.", 1)] * AUGMENT)
    leaf = proba.members[0]
    assert isinstance(leaf.head, PriorHead) and leaf.c in C_GRID
    # the head's prior is the tuned body's own zero-shot similarity, its probabilities softmax(prior + W x + b)
    e = class_vectors(leaf.body, tok, [["It was terrible."], ["It was great."]])
    assert np.allclose(leaf.head.class_embeds, (e / e.norm(dim=-1, keepdim=True)).numpy(), atol=1e-6)
    h = embed(leaf.body, tok, list(test), ML, windows=True)
    z = leaf.head.logits(h)
    want = np.exp(z - z.max(1, keepdims=True))
    assert np.allclose(proba(list(test)), want / want.sum(1, keepdims=True), atol=1e-6)


def test_the_saved_setfit_folder_predicts_the_recipes_probabilities(setup, tmp_path):
    base, tok, (train, dev, test) = setup
    out = auto_recipe(base, tok, train, dev, candidates=["setfit"], max_length=ML, template=TEMPLATE,
                      label_words=[["terrible"], ["great"]], echo=lambda s: None)
    assert out.refit
    out.save_pretrained(tmp_path / "clf")
    clf = PromptForClassification.from_pretrained(tmp_path / "clf")
    assert isinstance(clf.verbalizer, PriorLinearVerbalizer)
    assert np.allclose(clf.predict(list(test), batch_size=3).probs.numpy(), out.proba(list(test)), atol=1e-5)
