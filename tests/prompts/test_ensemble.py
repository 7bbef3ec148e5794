"""TemplateEnsemble (PET-style): the weighted average of per-template probabilities, weights = dev accuracy."""

import copy

import pytest
import torch

from promptdelta.data import load
from promptdelta.errors import ConfigError
from promptdelta.prompts.ensemble import TemplateEnsemble
from promptdelta.prompts.registry import build_classifier

TEMPLATES = ['{"placeholder":"text_a"} It was {"mask"}.', 'Review: {"placeholder":"text_a"} Sentiment: {"mask"}']


@pytest.fixture(scope="module")
def models(encoder_backbone, tok):
    classes = ["negative", "positive"]
    out = []
    for i, text in enumerate(TEMPLATES):
        torch.manual_seed(i)
        out.append(build_classifier(copy.deepcopy(encoder_backbone), tok, classes, "manual", "soft",
                                    template_options={"text": text}, readout="mean", max_length=32))
    return out


def test_weighted_average_of_probabilities(models):
    train, dev, _ = load("builtin:demo", shots=4, seed=13)
    ens = TemplateEnsemble(models, weights=[3.0, 1.0])
    p = ens.predict_proba(list(train))
    with torch.no_grad():
        p1, p2 = (m.eval()(m.collate(list(train))).softmax(-1) for m in models)
    assert torch.allclose(p, 0.75 * p1 + 0.25 * p2, atol=1e-6)
    assert ens.predict(list(train)) == p.argmax(-1).tolist()
    single = TemplateEnsemble(models[:1])
    assert torch.allclose(single.predict_proba(list(train)), p1, atol=1e-6)     # one template = that model


def test_weights_from_dev_accuracy(models):
    _, dev, _ = load("builtin:demo", shots=4, seed=13)
    ens = TemplateEnsemble.from_dev(models, list(dev))
    labels = torch.tensor([ex.label for ex in dev])
    accs = [float((TemplateEnsemble([m]).predict_proba(list(dev)).argmax(-1) == labels).float().mean())
            for m in models]
    expect = torch.tensor(accs) / sum(accs) if sum(accs) > 0 else torch.full((2,), 0.5)
    assert torch.allclose(ens.weights, expect)


def test_bad_ensembles_are_named(models, encoder_backbone, tok):
    with pytest.raises(ConfigError, match="at least one"):
        TemplateEnsemble([])
    with pytest.raises(ConfigError, match="one non-negative weight"):
        TemplateEnsemble(models, weights=[1.0])
    other = build_classifier(copy.deepcopy(encoder_backbone), tok, ["a", "b", "c"], "manual", "soft", readout="mean")
    with pytest.raises(ConfigError, match="different classes"):
        TemplateEnsemble([models[0], other])
    with pytest.raises(ConfigError, match="dev is empty"):
        TemplateEnsemble.from_dev(models, [])
