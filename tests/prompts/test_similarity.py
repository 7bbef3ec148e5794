"""SimilarityVerbalizer: zero-shot by construction, refresh through the template, trainable, saved and
reloaded, registered."""

import copy

import pytest
import torch

from promptdelta.data.examples import InputExample
from promptdelta.errors import VerbalizerError
from promptdelta.prompts.registry import build_classifier, build_verbalizer, registered_verbalizers
from promptdelta.prompts.similarity import SimilarityVerbalizer, mean_embeddings

CLASSES = ["negative", "positive", "neutral"]
WORDS = [["terrible", "bad"], ["great", "good"], ["okay"]]
TEMPLATE = '{"placeholder":"text_a"} It was {"mask"}.'


def make(backbone, tok, readout="mean", **opts):
    return build_classifier(copy.deepcopy(backbone), tok, CLASSES, "manual", "similarity", readout=readout,
                            template_options={"text": TEMPLATE},
                            verbalizer_options={"label_words": WORDS, **opts}, max_length=32)


def test_registered_and_zero_shot_on_descriptions(encoder_backbone, tok):
    assert "similarity" in registered_verbalizers()
    v = build_verbalizer("similarity", tok, CLASSES, {"label_words": WORDS}, encoder_backbone)
    assert v.descriptions == ["terrible, bad", "great, good", "okay"]
    h = mean_embeddings(encoder_backbone, tok, v.descriptions)              # the descriptions themselves
    logits = v.process(h, None, encoder_backbone)                            # (3, 3)
    assert logits.argmax(-1).tolist() == [0, 1, 2]
    assert torch.allclose(logits.diagonal(), torch.full((3,), 1 / 0.05), atol=1e-3)   # cos = 1 on the diagonal


def test_refresh_reads_classes_through_the_template(encoder_backbone, tok):
    clf = make(encoder_backbone, tok, readout="mask", wrap=True, temperature=0.1)
    before = clf.verbalizer.class_embeds.detach().clone()
    clf.verbalizer.refresh(clf)
    assert not torch.allclose(before, clf.verbalizer.class_embeds)          # now the mask readout of each
    clf.eval()
    with torch.no_grad():
        logits = clf(clf.collate([InputExample(d, label=i) for i, d in enumerate(clf.verbalizer.descriptions)]))
    assert logits.argmax(-1).tolist() == [0, 1, 2]
    assert torch.allclose(logits.diagonal(), torch.full((3,), 10.0), atol=1e-3)


def test_trainable_or_frozen(encoder_backbone, tok):
    clf = make(encoder_backbone, tok)
    batch = clf.collate([InputExample("a fine day", label=2), InputExample("awful", label=0)])
    loss, _ = clf.loss(batch)
    loss.backward()
    assert clf.verbalizer.class_embeds.grad is not None and clf.verbalizer.class_embeds.grad.abs().sum() > 0
    frozen = make(encoder_backbone, tok, trainable=False)
    assert not frozen.verbalizer.class_embeds.requires_grad


def test_save_and_load_round_trip(encoder_backbone, tok, tmp_path):
    from promptdelta.prompts.model import PromptForClassification

    clf = make(encoder_backbone, tok, temperature=0.2)
    with torch.no_grad():
        clf.verbalizer.class_embeds.add_(0.5)                              # a "trained" state, not the init
    clf.save_pretrained(tmp_path / "clf")
    back = PromptForClassification.from_pretrained(tmp_path / "clf", backbone=copy.deepcopy(encoder_backbone),
                                                   tokenizer=tok)
    assert isinstance(back.verbalizer, SimilarityVerbalizer) and back.verbalizer.temperature == 0.2
    batch = clf.collate([InputExample("nice and warm"), InputExample("cold and wet")])
    with torch.no_grad():
        assert torch.allclose(clf.eval()(batch), back.eval()(batch), atol=1e-5)


def test_bad_options_are_named(encoder_backbone, tok):
    with pytest.raises(VerbalizerError, match="descriptions for 3 classes"):
        build_verbalizer("similarity", tok, CLASSES, {"descriptions": ["a", "b"]}, encoder_backbone)
    with pytest.raises(VerbalizerError, match="temperature"):
        build_verbalizer("similarity", tok, CLASSES, {"temperature": 0}, encoder_backbone)
