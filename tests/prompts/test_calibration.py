"""Calibration (support-set and content-free priors) against a hand computation on a tiny native BERT."""

import pytest
import torch

from promptdelta.data.examples import InputExample
from promptdelta.errors import DataError, VerbalizerError
from promptdelta.prompts import (ManualTemplate, ManualVerbalizer, PromptForClassification, SoftVerbalizer,
                                 calibrate_content_free, calibrate_contextual, content_free_prior,
                                 contextual_prior, word_log_probs)

TEMPLATE = '{"placeholder":"text_a"} It was {"mask"}.'
WORDS = [["bad", "awful"], ["great", "good"]]
SUPPORT = [InputExample("a truly great film", label=1), InputExample("dull and slow"),
           InputExample("I would not watch it again"), InputExample("fine acting", label=0)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids contention (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(tok, backbone, words=WORDS):
    template = ManualTemplate(TEMPLATE, tok)
    return PromptForClassification(backbone, template, ManualVerbalizer(tok, ["neg", "pos"], words), max_length=32)


def hand_word_log_probs(tok, clf, examples, words=WORDS):
    """log p(v | x) (N, C, W) straight from the backbone's MLM logits at the mask token."""
    batch = clf.template.tokenize(examples, max_length=32)
    with torch.no_grad():
        out = clf.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"])
    pos = (batch["input_ids"] == tok.mask_token_id).float().argmax(1)
    logits = out.logits[torch.arange(len(examples)), pos]                                  # (N, V)
    ids = [tok.convert_tokens_to_ids(w) for ws in words for w in ws]
    return logits[:, ids].log_softmax(-1).reshape(len(examples), len(words), -1)           # (N, C, W)


def test_word_log_probs_match_the_mlm_head(tok, mlm_backbone):
    clf = build(tok, mlm_backbone).train()
    got = word_log_probs(clf, SUPPORT, batch_size=3)
    assert clf.training                                                    # mode restored
    torch.testing.assert_close(got, hand_word_log_probs(tok, clf.eval(), SUPPORT))


def test_contextual_calibration_against_a_hand_computation(tok, mlm_backbone):
    clf = build(tok, mlm_backbone).eval()
    batch = clf.collate(SUPPORT[:2])
    before = clf(batch)
    lp = hand_word_log_probs(tok, clf, SUPPORT)
    prior = lp.exp().mean(0)                                                # (C, W) p~(v)
    torch.testing.assert_close(calibrate_contextual(clf, SUPPORT), prior.log())
    q = lp[:2].exp() / prior                                                # p(v|x) / p~(v)
    q = q / q.sum((1, 2), keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(clf(batch), q.log().mean(-1))
        clf.verbalizer.set_calibration(None)
        torch.testing.assert_close(clf(batch), before)
    # a second estimate ignores the calibration already set
    clf.verbalizer.set_calibration(prior.log())
    torch.testing.assert_close(contextual_prior(clf, SUPPORT), prior.log())


def test_content_free_calibration_makes_the_content_free_input_uniform(tok, mlm_backbone):
    clf = build(tok, mlm_backbone, words=["bad", "great"]).eval()
    na = hand_word_log_probs(tok, clf, [InputExample("N/A")], words=[["bad"], ["great"]])[0]   # (C, 1)
    empty = hand_word_log_probs(tok, clf, [InputExample("")], words=[["bad"], ["great"]])[0]
    torch.testing.assert_close(content_free_prior(clf, ["N/A"]), na)
    torch.testing.assert_close(content_free_prior(clf), ((na.exp() + empty.exp()) / 2).log())
    calibrate_content_free(clf, ["N/A"])
    with torch.no_grad():
        probs = clf(clf.collate([InputExample("N/A")])).exp()              # Zhao et al.: W = diag(p_cf)^-1
    torch.testing.assert_close(probs, torch.full((1, 2), 0.5))


def test_padded_word_slots_get_a_zero_prior(tok, mlm_backbone):
    clf = build(tok, mlm_backbone, words=[["bad"], ["great", "good", "fine"]])
    prior = contextual_prior(clf, SUPPORT)
    assert prior.shape == (2, 3) and torch.isfinite(prior).all() and (prior[0, 1:] == 0).all()


def test_calibration_errors(tok, mlm_backbone):
    template = ManualTemplate(TEMPLATE, tok)
    soft = PromptForClassification(mlm_backbone, template, SoftVerbalizer(tok, ["n", "p"], WORDS, mlm_backbone))
    with pytest.raises(VerbalizerError, match="calibrate the label-word verbalizer"):
        contextual_prior(soft, SUPPORT)
    clf = build(tok, mlm_backbone)
    with pytest.raises(DataError, match="non-empty support set"):
        contextual_prior(clf, [])
    with pytest.raises(DataError, match="texts="):
        content_free_prior(clf, [])
