"""KnowledgeableVerbalizer (KPT): files, refinement, weights, save/load, neighbour expansion; and the
multi-mask support added to verbalizer.py (MultiMaskVerbalizer, the one-mask check)."""

import copy
import logging

import pytest
import torch

from promptdelta.data.examples import InputExample
from promptdelta.errors import CheckpointError, MissingFileError, VerbalizerError
from promptdelta.prompts import (KnowledgeableVerbalizer, ManualTemplate, ManualVerbalizer, MultiMaskVerbalizer,
                                 PromptForClassification, expand_label_words, refine_with_support)

KPT_FILE = ("politics,government,election,senate,market,unbelievably\n"
            "sports,football,tennis,football,market\n")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids contention (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ids(tok, words):
    return [tok.convert_tokens_to_ids(w) for w in words]


def kpt(tok, words=(("politics", "government", "election"), ("sports", "football", "tennis")), **kw):
    return KnowledgeableVerbalizer(tok, ["World", "Sports"], [list(w) for w in words], **kw)


def test_from_file_dedupes_drops_shared_words_and_warns_once(tok, tmp_path, caplog):
    path = tmp_path / "knowledgeable_verbalizer.txt"
    path.write_text(KPT_FILE)
    with caplog.at_level(logging.WARNING, logger="promptdelta"):
        v = KnowledgeableVerbalizer.from_file(path, tokenizer=tok)
    assert v.classes == ["politics", "sports"]                          # first word names the class
    assert v.label_words == [["politics", "government", "election", "senate", "unbelievably"],
                             ["sports", "football", "tennis"]]           # "market" was in both
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unbelievably" in warnings[0]
    short = KnowledgeableVerbalizer.from_file(path, tokenizer=tok, classes=["W", "S"], max_token_split=1)
    assert "unbelievably" not in short.label_words[0] and short.classes == ["W", "S"]


def test_zero_weights_equal_the_manual_mean_and_weights_reweight(tok):
    v = kpt(tok, words=(("politics", "government"), ("sports", "football", "tennis")))
    manual = ManualVerbalizer(tok, ["World", "Sports"], v.label_words)
    logits = torch.randn(3, tok.vocab_size)
    torch.testing.assert_close(v.process(None, logits, None), manual.process(None, logits, None))
    with torch.no_grad():
        v.label_word_weights.copy_(torch.tensor([[1.0, -1.0, 5.0], [0.0, 2.0, 1.0]]))
    lp = logits[:, ids(tok, ["politics", "government", "sports", "football", "tennis"])].log_softmax(-1)
    w0, w1 = torch.tensor([1.0, -1.0]).softmax(0), torch.tensor([0.0, 2.0, 1.0]).softmax(0)
    expected = torch.stack([lp[:, :2] @ w0, lp[:, 2:] @ w1], 1)         # padded slot (weight 5) ignored
    torch.testing.assert_close(v.process(None, logits, None), expected)


def test_frequency_refinement_removes_the_rare_words(tok):
    v = kpt(tok)
    with torch.no_grad():
        v.label_word_weights.copy_(torch.arange(6.0).view(2, 3))
    prior = torch.tensor([[0.30, 0.02, 0.21], [0.25, 0.20, 0.03]]).log()
    v.set_calibration(prior)
    removed = v.refine_by_frequency(prior, threshold=0.05)
    assert removed == [["government"], ["tennis"]]
    assert v.label_words == [["politics", "election"], ["sports", "football"]]
    torch.testing.assert_close(v.label_word_weights.detach(), torch.tensor([[0.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(v.calibration, torch.stack([prior[0, [0, 2]], prior[1, [0, 1]]]))
    assert v.token_ids.shape[:2] == (2, 2)
    v2 = kpt(tok)
    assert v2.refine_by_frequency(prior, drop_frac=0.5) == [["government"], ["football", "tennis"]]


def test_relevance_refinement_removes_words_that_follow_another_class(tok):
    v = kpt(tok)
    torch.manual_seed(0)
    anchor_w, anchor_s = torch.rand(6), torch.rand(6)
    q = torch.stack([anchor_w, anchor_w * 1.1, anchor_s,                # "election" behaves like sports
                     anchor_s, anchor_s + 0.01, anchor_w], 1).view(6, 2, 3)   # "tennis" like world
    lp = (q / q.sum((1, 2), keepdim=True)).log()
    r = v.relevance_scores(lp)
    cos = torch.nn.functional.cosine_similarity
    qv = lp.exp()[:, 0, 2]                                              # direct formula, one entry
    torch.testing.assert_close(r[0, 2], cos(qv, lp.exp()[:, 0, 0], 0) / cos(qv, lp.exp()[:, 1, 0], 0))
    assert v.refine_by_relevance(lp) == [["election"], ["tennis"]]
    assert v.label_words == [["politics", "government"], ["sports", "football"]]


def test_refinement_that_empties_a_class_is_an_error(tok):
    v = kpt(tok)
    prior = torch.tensor([[0.30, 0.30, 0.30], [0.01, 0.01, 0.01]]).log()
    with pytest.raises(VerbalizerError) as err:
        v.refine_by_frequency(prior, threshold=0.05)
    assert "'Sports'" in str(err.value) and "lower the refinement threshold" in str(err.value)
    assert v.label_words[1] == ["sports", "football", "tennis"]         # unchanged after the error
    with pytest.raises(VerbalizerError, match="exactly one of threshold"):
        v.refine_by_frequency(prior)
    with pytest.raises(VerbalizerError, match="recompute it with this verbalizer"):
        v.refine_by_frequency(prior[:, :2], threshold=0.05)
    with pytest.raises(VerbalizerError, match="remove_shared=False"):
        kpt(tok, words=(("market", "stock"), ("market", "stock")))


def test_loss_falls_and_support_refinement_runs_end_to_end(tok, mlm_backbone):
    backbone = copy.deepcopy(mlm_backbone)
    words = (("politics", "government", "election", "senate"), ("sports", "football", "tennis", "game"))
    clf = PromptForClassification(backbone, ManualTemplate('{"placeholder":"text_a"} A {"mask"} story.', tok),
                                  kpt(tok, words), max_length=32)
    texts = ["the senate vote", "a tennis final", "new tax law", "the cup match", "poll results", "goal!"]
    train = [InputExample(t, label=i % 2) for i, t in enumerate(texts)]
    refine_with_support(clf, train, drop_frac=0.25, relevance_threshold=None)
    assert sum(map(len, clf.verbalizer.label_words)) == 6 and clf.verbalizer.calibration is not None
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    batch = clf.collate(train)
    clf.eval()                                                          # no dropout: a deterministic loss
    losses = []
    for _ in range(15):
        loss, _ = clf.loss(batch)
        opt.zero_grad()
        loss.backward()
        assert clf.verbalizer.label_word_weights.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_save_load_round_trip(tok, tmp_path):
    v = kpt(tok)
    v.refine_by_frequency(torch.tensor([[0.3, 0.01, 0.2], [0.3, 0.2, 0.3]]).log(), threshold=0.05)
    with torch.no_grad():
        v.label_word_weights.normal_()
    v.set_calibration(torch.randn(2, 3).log_softmax(-1)[:, :v.word_mask.shape[1]])
    v.save(tmp_path / "kpt")
    w = KnowledgeableVerbalizer.load(tmp_path / "kpt", tok)
    assert w.label_words == v.label_words and w.classes == v.classes
    torch.testing.assert_close(w.label_word_weights, v.label_word_weights)
    logits = torch.randn(2, tok.vocab_size)
    torch.testing.assert_close(w.process(None, logits, None), v.process(None, logits, None))
    w.load_state_dict(v.state_dict())                                   # same words: plain state dicts fit too
    with pytest.raises(MissingFileError, match="KnowledgeableVerbalizer.save"):
        KnowledgeableVerbalizer.load(tmp_path / "nothing", tok)
    from safetensors.torch import save_file
    save_file({"label_word_weights": torch.zeros(2, 7)}, str(tmp_path / "kpt" / "verbalizer.safetensors"))
    with pytest.raises(CheckpointError, match="tokenizer it was saved with"):
        KnowledgeableVerbalizer.load(tmp_path / "kpt", tok)


def test_neighbour_expansion_returns_close_whole_words(tok, mlm_backbone):
    backbone = copy.deepcopy(mlm_backbone)
    emb = backbone.input_embeddings().weight
    torch.manual_seed(1)
    with torch.no_grad():
        for seed, near in [("sports", ["football", "tennis", "##ball"]), ("politics", ["election", "senate"])]:
            for i, tid in enumerate(ids(tok, near)):
                emb[tid] = emb[ids(tok, [seed])[0]] * (1 + 0.05 * i) + 0.002 * torch.randn(emb.shape[1])
    words = expand_label_words(tok, backbone, [["sports"], ["politics"]], k=2)
    assert words == [["sports", "football", "tennis"], ["politics", "election", "senate"]]   # no "##ball"
    for ws in words:
        for w in ws:
            assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1
    assert expand_label_words(tok, backbone, [["sports"], ["politics"]], k=5, min_similarity=1.1) == [
        ["sports"], ["politics"]]
    v = KnowledgeableVerbalizer.from_neighbours(tok, backbone, ["S", "W"], [["sports"], ["politics"]], k=2)
    assert v.label_words == words


# ---------------------------------------------------------------- multi-mask (verbalizer.py additions)
def test_multi_mask_sums_per_mask_log_probs(tok):
    v = MultiMaskVerbalizer.from_label_words(tok, ["neg", "pos"], [["bad", "good"], ["no", "yes"]],
                                             weights=[1.0, 0.5])
    logits = torch.randn(3, 2, tok.vocab_size)                          # (B, M, V)
    lp0 = logits[:, 0, ids(tok, ["bad", "good"])].log_softmax(-1)
    lp1 = logits[:, 1, ids(tok, ["no", "yes"])].log_softmax(-1)
    torch.testing.assert_close(v.process(None, logits, None), lp0 + 0.5 * lp1)
    with pytest.raises(VerbalizerError, match="scores 2"):
        v.process(None, logits[:, 0], None)


def test_one_mask_verbalizer_rejects_two_masks(tok):
    v = ManualVerbalizer(tok, ["neg", "pos"], ["bad", "good"])
    logits = torch.randn(3, 2, tok.vocab_size)
    torch.testing.assert_close(v.process(None, logits[:, :1], None), v.process(None, logits[:, 0], None))
    with pytest.raises(VerbalizerError) as err:
        v.process(None, logits, None)
    assert "2 mask(s)" in str(err.value) and "MultiMaskVerbalizer" in str(err.value)
    with pytest.raises(VerbalizerError, match="same classes"):
        MultiMaskVerbalizer([v, ManualVerbalizer(tok, ["a", "b"], ["no", "yes"])])
    with pytest.raises(VerbalizerError, match="one verbalizer per mask"):
        MultiMaskVerbalizer([v])
