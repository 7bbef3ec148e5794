"""ManualVerbalizer (reductions, normalisation, logits vs embedding path, files) and SoftVerbalizer."""

import json
import logging

import pytest
import torch

from promptdelta.data.examples import ExampleSet, InputExample
from promptdelta.errors import MissingFileError, VerbalizerError
from promptdelta.prompts import ManualVerbalizer, SoftVerbalizer

MULTI = "unbelievably"          # MiniLM WordPiece: un ##bel ##ie ##va ##bly


def ids_of(tok, word):
    return tok(" " + word, add_special_tokens=False)["input_ids"]


def test_multi_token_word_warns_with_its_pieces(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="promptdelta.prompts.verbalizer"):
        ManualVerbalizer(tok, ["neg", "pos"], [["bad"], ["good", MULTI]])
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and MULTI in msgs[0]
    for piece in tok.convert_ids_to_tokens(ids_of(tok, MULTI)):
        assert piece in msgs[0]


@pytest.mark.parametrize("handler", ["first", "mean", "max"])
def test_reductions_match_a_hand_computation(tok, handler):
    words = [["bad", "awful"], ["good", MULTI]]
    v = ManualVerbalizer(tok, ["neg", "pos"], words, multi_token_handler=handler)
    torch.manual_seed(0)
    logits = torch.randn(3, tok.vocab_size)
    reduce = {"first": lambda s: s[:, 0], "mean": lambda s: s.mean(1), "max": lambda s: s.max(1).values}[handler]
    word_scores = torch.stack([reduce(logits[:, ids_of(tok, w)]) for ws in words for w in ws], 1)   # (B, 4)
    log_p = word_scores.log_softmax(-1)
    expected = torch.stack([log_p[:, :2].mean(1), log_p[:, 2:].mean(1)], 1)                      # (B, 2)
    torch.testing.assert_close(v.process(torch.zeros(3, 4), logits, None), expected)


def test_uneven_word_counts_ignore_padding_slots(tok):
    v = ManualVerbalizer(tok, ["a", "b"], ["bad", ["good", "great", "fine"]])
    logits = torch.randn(2, tok.vocab_size)
    ids = [ids_of(tok, w)[0] for w in ["bad", "good", "great", "fine"]]
    log_p = logits[:, ids].log_softmax(-1)
    torch.testing.assert_close(v.process(None, logits, None), torch.stack([log_p[:, 0], log_p[:, 1:].mean(1)], 1))


def test_embedding_path_equals_logits_through_tied_embeddings(tok, encoder_backbone, caplog):
    v = ManualVerbalizer(tok, ["neg", "pos"], [["bad", "awful"], ["good", MULTI]], multi_token_handler="mean")
    hidden = torch.randn(4, encoder_backbone.config.hidden_size)
    emb = encoder_backbone.input_embeddings().weight
    with caplog.at_level(logging.INFO, logger="promptdelta.prompts.verbalizer"):
        got = v.process(hidden, None, encoder_backbone)
        v.process(hidden, None, encoder_backbone)
    torch.testing.assert_close(got, v.process(hidden, hidden @ emb.T, encoder_backbone))
    infos = [r for r in caplog.records if "no MLM head" in r.getMessage()]
    assert len(infos) == 1 and infos[0].levelno == logging.INFO


def test_calibration_divides_by_the_prior(tok):
    v = ManualVerbalizer(tok, ["neg", "pos"], ["bad", "good"])
    logits = torch.randn(2, tok.vocab_size)
    before = v.process(None, logits, None)
    v.set_calibration(before[:1].reshape(2, 1))                  # prior = the first row's word log-probs
    after = v.process(None, logits, None)
    torch.testing.assert_close(after[0].exp(), torch.tensor([0.5, 0.5]))
    v.set_calibration(None)
    torch.testing.assert_close(v.process(None, logits, None), before)


def test_label_words_are_lower_cased_for_lower_casing_tokenizers(tok):
    upper = ManualVerbalizer(tok, ["a"], [["Great"]])
    lower = ManualVerbalizer(tok, ["a"], [["great"]])
    assert torch.equal(upper.token_ids, lower.token_ids)


def test_dict_label_words_and_class_order(tok):
    v = ManualVerbalizer(tok, label_words={"pos": "good", "neg": ["bad", "awful"]})
    assert v.classes == ["pos", "neg"] and v.num_classes == 2
    v2 = ManualVerbalizer(tok, ["neg", "pos"], {"pos": "good", "neg": ["bad", "awful"]})
    assert v2.label_words == [["bad", "awful"], ["good"]]


def test_from_file_txt_with_alternatives(tok, tmp_path):
    path = tmp_path / "manual.txt"
    path.write_text("bad, awful\ngood,great\n\nno\nyes\n")
    v = ManualVerbalizer.from_file(path, tokenizer=tok)
    assert v.classes == ["bad", "good"] and v.label_words == [["bad", "awful"], ["good", "great"]]
    v1 = ManualVerbalizer.from_file(path, tokenizer=tok, classes=["n", "y"], choice=1)
    assert v1.classes == ["n", "y"] and v1.label_words == [["no"], ["yes"]]
    with pytest.raises(VerbalizerError, match=r"choice in 0\.\.1"):
        ManualVerbalizer.from_file(path, tokenizer=tok, choice=2)


def test_from_file_json(tok, tmp_path):
    path = tmp_path / "manual.json"
    path.write_text(json.dumps({"World": ["world", "politics"], "Sports": "sports"}))
    v = ManualVerbalizer.from_file(path, tokenizer=tok, multi_token_handler="max")
    assert v.classes == ["World", "Sports"] and v.label_words == [["world", "politics"], ["sports"]]
    assert v.multi_token_handler == "max"
    path.write_text("{not json")
    with pytest.raises(VerbalizerError, match="not valid JSON"):
        ManualVerbalizer.from_file(path, tokenizer=tok)
    with pytest.raises(MissingFileError, match="check the path"):
        ManualVerbalizer.from_file(tmp_path / "missing.json", tokenizer=tok)


def test_from_file_line_endings_and_errors_name_the_file(tok, tmp_path):
    path = tmp_path / "manual.txt"
    path.write_bytes(b"bad, awful\r\ngood\r\n  \r\nno\r\nyes\r\n")          # CRLF; a blank line of spaces
    assert ManualVerbalizer.from_file(path, tokenizer=tok, choice=1).label_words == [["no"], ["yes"]]
    with pytest.raises(VerbalizerError, match=r"^'.*manual\.txt' \(choice=0\): 3 classes but label words for 2"):
        ManualVerbalizer.from_file(path, tokenizer=tok, classes=["a", "b", "c"])
    with pytest.raises(VerbalizerError, match=r"choice=True but"):
        ManualVerbalizer.from_file(path, tokenizer=tok, choice=True)


@pytest.mark.parametrize("classes, words, kwargs, fix", [
    (["a", "b"], [["x"]], {}, "one word or list of words per class"),
    (["a", "b"], [["x"], []], {}, "at least one"),
    (["a", "b"], [["x"], [""]], {}, "at least one"),
    (None, [["x"], ["y"]], {}, "pass classes="),
    (["a", "b"], {"a": "x"}, {}, "add them to label_words"),
    (["a"], [["x"]], {"multi_token_handler": "sum"}, "first, mean, max"),
    ([], [], {}, "no classes: give label words for at least one class"),
    (None, {}, {}, "no classes"),
])
def test_bad_label_words(tok, classes, words, kwargs, fix):
    with pytest.raises(VerbalizerError) as err:
        ManualVerbalizer(tok, classes, words, **kwargs)
    assert fix in str(err.value)


def test_check_labels(tok):
    v = ManualVerbalizer(tok, ["neg", "pos"], ["bad", "good"])
    v.check_labels(ExampleSet([InputExample("x", label=1), InputExample("y")], classes=["n", "p"]))
    with pytest.raises(VerbalizerError) as err:
        v.check_labels([InputExample("x", label=2, guid="g7")])
    assert "'g7'" in str(err.value) and "2 classes" in str(err.value) and "fix the labels" in str(err.value)
    with pytest.raises(VerbalizerError) as err:
        v.check_labels(ExampleSet([InputExample("x", label=0)], classes=["a", "b", "c"]))
    assert "3 classes" in str(err.value) and "has 2" in str(err.value) and "same order" in str(err.value)


def test_soft_verbalizer_init_is_the_mean_label_word_embedding(tok, encoder_backbone):
    words = [["bad", "awful"], [MULTI]]
    v = SoftVerbalizer(tok, ["neg", "pos"], words, encoder_backbone)
    emb = encoder_backbone.input_embeddings().weight
    for c, ws in enumerate(words):
        ids = [i for w in ws for i in ids_of(tok, w)]
        torch.testing.assert_close(v.head.weight[c], emb[ids].mean(0))
    assert v.head.bias.eq(0).all()
    hidden = torch.randn(3, emb.shape[1])
    out = v.process(hidden, None, encoder_backbone)
    torch.testing.assert_close(out, hidden @ v.head.weight.T)
    out.sum().backward()
    assert v.head.weight.grad is not None and emb.grad is None      # a copy, not tied to the embeddings
