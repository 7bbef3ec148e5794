"""predict's last-layer pruning (``PromptForClassification.pruned_positions`` -> the native backbone's
``keep_positions``): the same predictions as the full last layer (argmax equal, probabilities within 1e-5) on
tiny BERT and RoBERTa for every mask readout (one mask, several masks; logits- and hidden-state verbalizers),
with several delta kinds; never applied to a mean readout, under autograd, or when a ladder delta hooks the
layers' outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import promptdelta as pd
from promptdelta.data.examples import InputExample

sys.path.insert(0, str(Path(__file__).resolve().parent / "prompts"))
from prompt_helpers import roberta_tokenizer, tiny_backbone  # noqa: E402

CLASSES = ["negative", "positive"]
WORDS = [["bad", "awful"], ["good", "great"]]
TEXTS = ["a great and wonderful film", "terrible, bad acting and an awful plot", "fine", "the best of the year",
         "It was a long movie with some good scenes but a boring end; I would not watch it again.", "a waste"]
ONE = '{"placeholder":"text_a"} It was {"mask"}.'
SETUPS = {   # name -> (template kind, template options, verbalizer kind, verbalizer options)
    "manual": ("manual", {"text": ONE}, "manual", {"label_words": WORDS, "multi_token_handler": "mean"}),
    "soft+mixed": ("mixed", {"text": '{"placeholder":"text_a"} {"soft": "It was"} {"soft"} {"mask"}.'}, "soft",
                   {"label_words": WORDS}),
    "kpt": ("manual", {"text": ONE}, "kpt", {"label_words": [["bad", "awful", "poor"], ["good", "great", "fine"]]}),
    "proto": ("manual", {"text": ONE}, "proto", {"proto_dim": 8}),
    "multi_mask": ("manual", {"text": '{"placeholder":"text_a"} It was {"mask"} , {"mask"} .'}, "multi_mask",
                   {"label_words": [WORDS, [["no"], ["yes"]]], "weights": [1.0, 0.5]}),
}


def _backbone(family: str, tiny_bert_dir):
    if family == "bert":
        return pd.load_backbone(tiny_bert_dir)
    tok = roberta_tokenizer()
    return tiny_backbone("roberta", len(tok)), tok


def _classifier(family, tiny_bert_dir, setup="manual", readout="mask", delta="lora", seed=1):
    model, tok = _backbone(family, tiny_bert_dir)
    if delta:
        pd.attach(model, delta, **({"targets": ["q_proj", "v_proj"], "r": 2, "alpha": 4} if delta == "lora" else {}))
    t_kind, t_opts, v_kind, v_opts = json.loads(json.dumps(SETUPS[setup]))
    clf = pd.build_classifier(model, tok, CLASSES, t_kind, v_kind, template_options=t_opts,
                              verbalizer_options=v_opts, max_length=48, readout=readout)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():                                 # stand-in for training: every trainable tensor moves
        for p in clf.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return clf


def _spy(clf, monkeypatch) -> list:
    """Record the keep_positions of every backbone call."""
    seen, real = [], clf.backbone.forward

    def forward(*args, **kwargs):
        seen.append(kwargs.get("keep_positions"))
        return real(*args, **kwargs)

    monkeypatch.setattr(clf.backbone, "forward", forward)
    return seen


def _full(clf):
    clf.prune_readout = False
    try:
        return clf.predict(TEXTS, batch_size=4)
    finally:
        clf.prune_readout = True


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_pruned_last_layer_predicts_as_the_full_one(tiny_bert_dir, monkeypatch, family, setup):
    clf = _classifier(family, tiny_bert_dir, setup)
    seen = _spy(clf, monkeypatch)
    pruned = clf.predict(TEXTS, batch_size=4)
    masks = 2 if setup == "multi_mask" else 1
    assert len(seen) == 2 and all(k is not None and k.shape[1] == masks for k in seen)   # it did prune
    full = _full(clf)
    assert seen[2:] == [None, None]                                                      # and this did not
    assert pruned.labels == full.labels
    torch.testing.assert_close(pruned.probs, full.probs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("delta", ["adapter", "prefix", "bitfit", "ia3"])
def test_pruning_is_exact_with_other_deltas(tiny_bert_dir, monkeypatch, delta):
    clf = _classifier("bert", tiny_bert_dir, delta=delta)
    seen = _spy(clf, monkeypatch)
    pruned = clf.predict(TEXTS, batch_size=4)
    assert seen and all(k is not None for k in seen)
    full = _full(clf)
    assert pruned.labels == full.labels
    torch.testing.assert_close(pruned.probs, full.probs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_mean_readout_is_never_pruned(tiny_bert_dir, monkeypatch, family):
    """The mean reads every position, so pruning would change the answer: checked against the mean of the
    full forward's last hidden states computed here."""
    clf = _classifier(family, tiny_bert_dir, "soft+mixed", readout="mean").eval()
    seen = _spy(clf, monkeypatch)
    got = clf.predict(TEXTS, batch_size=len(TEXTS))
    assert seen == [None]
    assert clf.pruned_positions(clf.collate([InputExample(t) for t in TEXTS])) is None
    order = sorted(range(len(TEXTS)), key=lambda i: -len(TEXTS[i]))
    batch = clf.collate([InputExample(TEXTS[i]) for i in order])
    with torch.inference_mode():
        embeds = clf.template.process_embeds(clf.backbone.input_embeddings()(batch["input_ids"]), batch)
        states = clf.backbone(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                              token_type_ids=batch["token_type_ids"]).last_hidden_state       # (B, T, H)
        keep = batch["attention_mask"][..., None].float()
        want = clf.verbalizer.process((states * keep).sum(1) / keep.sum(1), None, clf.backbone).softmax(-1)
    torch.testing.assert_close(got.probs[order], want, rtol=0, atol=1e-5)


def test_no_pruning_under_autograd_or_with_a_ladder(tiny_bert_dir, monkeypatch):
    clf = _classifier("bert", tiny_bert_dir)
    batch = clf.collate([InputExample(t) for t in TEXTS])
    assert clf.pruned_positions(batch) is None                      # grads on: training sees every row
    with torch.no_grad():
        assert torch.equal(clf.pruned_positions(batch), batch["mask_pos"])
    ladder = _classifier("bert", tiny_bert_dir, delta="ladder")   # its side network reads every layer's output
    seen = _spy(ladder, monkeypatch)
    got = ladder.predict(TEXTS, batch_size=4)
    assert seen and all(k is None for k in seen)
    assert len(got) == len(TEXTS)
