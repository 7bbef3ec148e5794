"""PromptForClassification on tiny native BERTs: shapes, gather at the mask, gradients, predict, errors."""

import pytest
import torch

from promptdelta.data.examples import ExampleSet, InputExample
from promptdelta.errors import DataError, VerbalizerError
from promptdelta.prompts import ManualTemplate, ManualVerbalizer, PromptForClassification, SoftVerbalizer

TEMPLATE = '{"placeholder":"text_a"} It was {"mask"}.'
EXAMPLES = [InputExample("a truly great film", label=1), InputExample("dull", label=0),
            InputExample("I would not watch it again, the plot is thin", label=0)]


def build(tok, backbone, soft=False):
    template = ManualTemplate(TEMPLATE, tok)
    words = [["bad", "awful"], ["great", "good"]]
    verbalizer = (SoftVerbalizer(tok, ["neg", "pos"], words, backbone) if soft
                  else ManualVerbalizer(tok, ["neg", "pos"], words))
    return PromptForClassification(backbone, template, verbalizer, max_length=32).eval()  # no dropout


@pytest.mark.parametrize("head", [True, False])
def test_forward_shapes(tok, mlm_backbone, encoder_backbone, head):
    clf = build(tok, mlm_backbone if head else encoder_backbone)
    logits = clf(clf.collate(EXAMPLES))
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
    # mean word log-prob per class: its exp is <= the class's mean word prob, and those sum to <= 1
    assert (logits.exp().sum(1) <= 1 + 1e-6).all()


def test_gather_is_at_the_mask(tok, mlm_backbone):
    clf = build(tok, mlm_backbone)
    batch = clf.collate(EXAMPLES)
    seen = {}
    clf.verbalizer.process = lambda hidden, logits, backbone: seen.update(h=hidden, l=logits) or hidden[:, :2]
    clf(batch)
    out = mlm_backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for i in range(3):
        pos = int((batch["input_ids"][i] == tok.mask_token_id).nonzero())
        torch.testing.assert_close(seen["h"][i], out.last_hidden_state[i, pos])
        torch.testing.assert_close(seen["l"][i], out.logits[i, pos])


def test_padding_does_not_change_an_examples_logits(tok, mlm_backbone):
    clf = build(tok, mlm_backbone)
    together = clf(clf.collate(EXAMPLES))
    alone = torch.cat([clf(clf.collate([e])) for e in EXAMPLES])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("soft", [False, True])
def test_loss_backward_gives_gradients(tok, encoder_backbone, soft):
    clf = build(tok, encoder_backbone, soft=soft)
    clf.zero_grad(set_to_none=True)
    loss, logits = clf.loss(clf.collate(EXAMPLES))
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0, 0]))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    trainable = [p for p in clf.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    if soft:
        assert clf.verbalizer.head.weight.grad.abs().sum() > 0
    clf.zero_grad(set_to_none=True)


def test_predict_matches_argmax_and_restores_mode(tok, mlm_backbone):
    clf = build(tok, mlm_backbone).train()
    unlabelled = [InputExample(e.text) for e in EXAMPLES]
    preds = clf.predict(unlabelled, batch_size=2)
    assert clf.training
    clf.eval()
    assert preds.dtype == torch.long and preds.tolist() == clf(clf.collate(unlabelled)).argmax(-1).tolist()
    assert clf.predict([]).shape == (0,)


def test_loss_without_labels_and_bad_labels(tok, mlm_backbone):
    clf = build(tok, mlm_backbone)
    with pytest.raises(DataError, match="give every example a label"):
        clf.loss(clf.collate([InputExample("no label")]))
    with pytest.raises(VerbalizerError, match="labels 0..1"):
        clf.collate([InputExample("x", label=5)])
    with pytest.raises(VerbalizerError, match="3 classes"):
        clf.collate(ExampleSet([InputExample("x", label=0)], classes=["a", "b", "c"]))
