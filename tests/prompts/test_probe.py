"""Linear-probe initialisation (LP-FT) of the soft verbalizer: the head equals a scikit-learn probe of the
readout features, the probed model is a dev-selection candidate, and bad input is refused."""

import copy

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from promptdelta.data.examples import InputExample
from promptdelta.errors import ConfigError, VerbalizerError
from promptdelta.prompts import ManualTemplate, ManualVerbalizer, PromptForClassification, SoftVerbalizer
from promptdelta.prompts.probe import fit_probe, probe_init, readout_features
from promptdelta.train import Trainer

TEMPLATE = '{"placeholder":"text_a"} It was {"mask"}.'
POS = ["a great film", "wonderful and fun", "great acting", "a lovely story", "fun and great", "truly wonderful"]
NEG = ["a dull film", "boring and bad", "awful acting", "a terrible story", "bad and dull", "truly awful"]


def examples(words_pos=POS, words_neg=NEG):
    return [InputExample(t, label=1) for t in words_pos] + [InputExample(t, label=0) for t in words_neg]


def build(tok, backbone, readout="mean", classes=("negative", "positive")):
    model = copy.deepcopy(backbone)
    verbalizer = SoftVerbalizer(tok, list(classes), [["bad"], ["good"]][:len(classes)] if len(classes) == 2
                                else [[c] for c in classes], model)
    return PromptForClassification(model, ManualTemplate(TEMPLATE, tok), verbalizer, max_length=32, readout=readout)


@pytest.mark.parametrize("readout", ["mean", "mask"])
def test_binary_probe_gives_sklearn_probabilities(tok, encoder_backbone, readout):
    clf = build(tok, encoder_backbone, readout)
    train = examples()
    info = probe_init(clf, train, dev=None)
    x = readout_features(clf, train).numpy()
    ref = LogisticRegression(C=info["C"], max_iter=1000, random_state=0).fit(x, [e.label for e in train])
    clf.eval()
    with torch.no_grad():
        probs = clf(clf.collate(train)).softmax(-1).numpy()                 # (N, 2)
    np.testing.assert_allclose(probs, ref.predict_proba(x), atol=1e-5)


def test_multiclass_probe_and_dev_choice(tok, encoder_backbone):
    classes = ["a", "b", "c"]
    g = np.random.default_rng(0)
    y = np.array([0] * 12 + [1] * 3 + [2] * 3 + [0, 1, 2] * 4)             # 18 skewed train rows, 12 dev rows
    x = g.normal(size=(len(y), 8)).astype(np.float32)
    x[np.arange(len(y)), y] += 3.0                                          # separable along three axes
    w, b, info = fit_probe(x[:18], y[:18], 3, x[18:], y[18:], c_grid=[1e-4, 1.0])
    assert w.shape == (3, 8) and b.shape == (3,)
    # C=1e-4 shrinks the weights to ~0 and predicts the majority class: 1/3 on the balanced dev split
    assert info["C"] == 1.0 and info["dev_accuracy"] == 1.0
    assert ((x[18:] @ w.T + b).argmax(1) == y[18:]).all()
    w_small, b_small, _ = fit_probe(x[:18], y[:18], 3, c_grid=[1e-4])
    assert ((x[18:] @ w_small.T + b_small).argmax(1) == 0).all()
    clf = build(tok, encoder_backbone, classes=classes)
    train = [InputExample(t, label=i % 3) for i, t in enumerate(POS + NEG)]
    probe_init(clf, train)
    assert clf.verbalizer.head.weight.shape == (3, 32)


def test_probe_is_a_dev_candidate_before_tuning(tok, encoder_backbone):
    """With eval_at_start the probed model is scored at step 0; when tuning cannot beat it (the probe already
    scores 1.0 on this dev set) the Trainer ends with exactly the probe's parameters."""
    clf = build(tok, encoder_backbone)
    train = examples()
    probe_init(clf, train, c_grid=[100.0])                                 # weak regularisation: fits the 12
    before = {n: p.detach().clone() for n, p in clf.named_parameters()}
    assert Trainer(clf, progress=False).evaluate(train)["accuracy"] == 1.0
    trainer = Trainer(clf, lr=5.0, max_steps=3, batch_size=4, eval_every=1, eval_at_start=True,
                      progress=False, max_grad_norm=1e9).fit(train, train)  # a destructive lr
    assert [h["step"] for h in trainer.state.history] == [0, 1, 2, 3]
    assert trainer.state.best_step == 0 and trainer.state.best_score == 1.0
    for n, p in clf.named_parameters():                                     # restored: exactly the probe
        assert torch.equal(p, before[n]), n


def test_probe_refuses_bad_input(tok, encoder_backbone):
    clf = build(tok, encoder_backbone)
    with pytest.raises(VerbalizerError, match="every class"):
        probe_init(clf, [InputExample(t, label=1) for t in POS])
    model = copy.deepcopy(encoder_backbone)
    manual = PromptForClassification(model, ManualTemplate(TEMPLATE, tok),
                                     ManualVerbalizer(tok, ["negative", "positive"], [["bad"], ["good"]]), max_length=32)
    with pytest.raises(VerbalizerError, match="verbalizer: soft"):
        probe_init(manual, examples())
    from promptdelta.config import RunConfig
    with pytest.raises(ConfigError, match="verbalizer_init"):
        RunConfig(verbalizer_init="lp")
    with pytest.raises(ConfigError, match="soft"):
        RunConfig(verbalizer="manual", verbalizer_init="probe")
