"""Contrastive objectives (SetFit pairs, SupCon) against direct formulas, and parameter-efficient SetFit on
a tiny BERT: only the delta and the head change, and the objective pulls same-class readouts together."""

import copy
import random

import pytest
import torch

from promptdelta.data import load
from promptdelta.deltas.base import attach
from promptdelta.errors import ConfigError
from promptdelta.prompts.registry import build_classifier
from promptdelta.train.contrastive import _readout, pair_loss, sample_pairs, supcon_loss, train_contrastive


def naive_supcon(h, labels, tau):
    z = torch.nn.functional.normalize(h, dim=-1)
    total, anchors = 0.0, 0
    for i in range(len(z)):
        pos = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        denom = sum(torch.exp(z[i] @ z[a] / tau) for a in range(len(z)) if a != i)
        total += -sum(torch.log(torch.exp(z[i] @ z[p] / tau) / denom) for p in pos) / len(pos)
        anchors += 1
    return total / anchors


def test_supcon_matches_the_formula():
    torch.manual_seed(0)
    h, labels = torch.randn(7, 5), torch.tensor([0, 1, 0, 2, 1, 0, 3])       # class 2 and 3: no positive
    assert torch.allclose(supcon_loss(h, labels, 0.5), naive_supcon(h, labels.tolist(), 0.5), atol=1e-5)


def test_pair_loss_and_sampling():
    a, b = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert pair_loss(a, b, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.0)
    assert pair_loss(a, b, torch.tensor([0.0, 1.0])).item() == pytest.approx(1.0)
    pairs = sample_pairs([0, 0, 1, 1, 1], rounds=3, rng=random.Random(0))
    labels = [0, 0, 1, 1, 1]
    assert len(pairs) == 3 * 5 * 2
    assert all((labels[i] == labels[j]) == (s == 1.0) and i != j for i, j, s in pairs)


@pytest.fixture(scope="module")
def setup(tiny_sentence_backbone):
    base, tok = tiny_sentence_backbone
    train, dev, _ = load("builtin:demo", shots=4, seed=13)
    return base, tok, train, dev


def make_clf(setup, verbalizer="soft"):
    base, tok, train, _ = setup
    model = copy.deepcopy(base)
    attach(model, "lora", r=2, alpha=4)
    return build_classifier(model, tok, list(train.classes), "manual", verbalizer, readout="mean",
                            template_options={"text": '{"placeholder":"text_a"} It was {"mask"}.'}, max_length=32)


def separation(clf, examples):
    with torch.no_grad():
        z = torch.nn.functional.normalize(_readout(clf.eval(), examples), dim=-1)
    y = torch.tensor([ex.label for ex in examples])
    sim, same = z @ z.T, y[:, None] == y[None, :]
    return (sim[same].mean() - sim[~same].mean()).item()


@pytest.mark.parametrize("objective", ["pairs", "supcon"])
def test_only_delta_and_head_change_and_classes_separate(setup, objective):
    _, _, train, dev = setup
    clf = make_clf(setup)
    before = {n: p.detach().clone() for n, p in clf.named_parameters()}
    sep0 = separation(clf, list(train))
    out = train_contrastive(clf, train, dev, objective=objective, epochs=3, num_iterations=4, lr=5e-3,
                            batch_size=8, temperature=0.5, head="logistic", seed=0)
    changed = {n for n, p in clf.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora" in n or n.startswith("verbalizer.") for n in changed), changed
    assert any(n.startswith("verbalizer.") for n in changed)                    # the head was fitted
    assert separation(clf, list(train)) > sep0                                  # same-class readouts closer
    assert len(out["losses"]) == 3 and "C" in str(out["head"])


def test_soft_head_trains_only_the_verbalizer_after_the_stage(setup):
    _, _, train, dev = setup
    clf = make_clf(setup, verbalizer="similarity")
    out = train_contrastive(clf, train, dev, objective="supcon", epochs=1, head="soft", head_epochs=5, seed=0)
    assert out["head_losses"][-1] < out["head_losses"][0]


def test_bad_input_is_named(setup):
    base, tok, train, dev = setup
    with pytest.raises(ConfigError, match="objective"):
        train_contrastive(make_clf(setup), train, objective="triplet")
    frozen = build_classifier(copy.deepcopy(base).requires_grad_(False), tok, list(train.classes), "manual",
                              "manual", verbalizer_options={"label_words": [["bad"], ["good"]]})
    with pytest.raises(ConfigError, match="nothing to train"):
        train_contrastive(frozen, train)


def body_separation(body, tok, examples):
    from promptdelta.bench.baselines import embed

    z = torch.nn.functional.normalize(torch.from_numpy(embed(body, tok, list(examples), 32)), dim=-1)
    y = torch.tensor([ex.label for ex in examples])
    sim, same = z @ z.T, y[:, None] == y[None, :]
    return (sim[same].mean() - sim[~same].mean()).item()


def test_body_pairs_trains_the_whole_encoder_and_is_reproducible(setup):
    from promptdelta.train.contrastive import train_body_pairs

    base, tok, train, _ = setup
    bodies = [copy.deepcopy(base) for _ in range(2)]
    sep0 = body_separation(base, tok, train)
    for body in bodies:
        out = train_body_pairs(body, tok, train, max_length=32, num_iterations=4, epochs=2, lr=1e-3, seed=3)
    assert len(out["losses"]) == 2 and out["steps"] == 2 * (4 * 2 * len(train) // 16)
    changed = [n for n, p in bodies[0].named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert any("embeddings" in n for n in changed) and any("layer.1." in n or "layers.1." in n for n in changed)
    assert body_separation(bodies[0], tok, train) > sep0                        # same-class embeddings closer
    assert all(torch.equal(p, q) for p, q in zip(bodies[0].parameters(), bodies[1].parameters()))
    with pytest.raises(ConfigError, match="two classes"):
        train_body_pairs(copy.deepcopy(base), tok, [ex for ex in train if ex.label == 0])
