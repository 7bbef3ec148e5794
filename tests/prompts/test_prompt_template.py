"""ManualTemplate: wrapping, batch tokenisation (parity with the tokenizer), truncation, padding, errors."""

from types import SimpleNamespace

import pytest
import torch
from prompt_helpers import gpt2_tokenizer, roberta_tokenizer, t5_tokenizer, unpadded

from promptdelta.data.examples import ExampleSet, InputExample
from promptdelta.errors import MissingFileError, TemplateError
from promptdelta.prompts import ManualTemplate, MixedTemplate
from promptdelta.prompts.template import _plain_backend, encode_texts

SENT = '{"placeholder":"text_a"} It was {"mask"}.'
PAIR = '{"placeholder":"text_a"} Question: {"placeholder":"text_b"}? Answer: {"mask"}.'
LONG = " ".join(["wonderful movie with a plot that keeps going"] * 12)


def contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_wrap_gives_piece_texts_with_template_spacing(tok):
    t = ManualTemplate(SENT, tok)
    wrapped = t.wrap(InputExample("  A fine film  ", label=1))
    assert [text for text, _ in wrapped] == ["A fine film", " It was", "[MASK]", "."]


@pytest.mark.parametrize("template, ex, expected", [
    (SENT, InputExample("A fine, fine film!"), "A fine, fine film! It was [MASK]."),
    (PAIR, InputExample("Paris is in France.", text_b="Is Paris in Spain"),
     "Paris is in France. Question: Is Paris in Spain? Answer: [MASK]."),
    ('{"meta":"entity"} is a {"mask"} in {"placeholder":"text_a"}',
     InputExample("the zoo", meta={"entity": "Leo"}), "Leo is a [MASK] in the zoo"),
])
def test_tokens_equal_the_tokenizer_on_the_filled_in_string(tok, template, ex, expected):
    batch = ManualTemplate(template, tok).tokenize([ex])
    assert batch["input_ids"][0].tolist() == tok(expected)["input_ids"]


def test_batch_shapes_padding_and_labels(tok):
    t = ManualTemplate(SENT, tok)
    exs = [InputExample("short", label=0), InputExample("a much longer sentence than the first one", label=1),
           InputExample("mid length text", label=1)]
    batch = t.tokenize(exs)
    lengths = [len(tok(f"{e.text} It was [MASK].")["input_ids"]) for e in exs]
    b, width = batch["input_ids"].shape
    assert (b, width) == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["token_type_ids"].eq(0).all() and batch["token_type_ids"].shape == (3, width)
    for i, n in enumerate(lengths):
        assert batch["input_ids"][i, n:].eq(tok.pad_token_id).all()
    assert batch["labels"].tolist() == [0, 1, 1] and batch["labels"].dtype == torch.long
    assert "labels" not in t.tokenize(exs[:2] + [InputExample("no label")])


def test_mask_pos_points_at_the_mask_id(tok):
    t = ManualTemplate('{"mask"} : {"placeholder":"text_a"} , {"mask"} !', tok)
    batch = t.tokenize([InputExample("one"), InputExample("two words here")])
    assert batch["mask_pos"].shape == (2, 2)
    for i in range(2):
        where = (batch["input_ids"][i] == tok.mask_token_id).nonzero().flatten().tolist()
        assert batch["mask_pos"][i].tolist() == where


def test_a_literal_mask_string_in_the_text_does_not_move_mask_pos(tok):
    batch = ManualTemplate(SENT, tok).tokenize([InputExample("the [MASK] word")])
    ids = batch["input_ids"][0]
    assert ids[batch["mask_pos"][0, 0]] == tok.mask_token_id
    assert batch["mask_pos"][0, 0] == len(ids) - 3          # [MASK] . [SEP]


# OpenPrompt's AG News template: text_b after text_a, on a task whose examples have no text_b.
AGNEWS_OPENPROMPT = ' A {"mask"} news : {"placeholder": "text_a"} {"placeholder": "text_b"}'


@pytest.mark.parametrize("template", [AGNEWS_OPENPROMPT, PAIR, '{"placeholder":"text_b"} {"mask"}'])
def test_a_missing_text_b_is_empty_text(tok, template):
    t = ManualTemplate(template, tok)
    no_b, empty_b = InputExample("Stocks rose."), InputExample("Stocks rose.", text_b="")
    assert [s for s, _ in t.wrap(no_b)] == [s for s, _ in t.wrap(empty_b)]
    batch = t.tokenize([no_b, InputExample("Stocks fell.", text_b="Oil too.")])
    assert unpadded(batch, 0) == t.tokenize([empty_b])["input_ids"][0].tolist()
    if template == AGNEWS_OPENPROMPT:
        assert unpadded(batch, 0) == tok("A [MASK] news : Stocks rose.")["input_ids"]


def test_batched_equals_per_example(tok):
    t = ManualTemplate(PAIR, tok)
    exs = [InputExample("Paris is big.", text_b="Is it"), InputExample(LONG, text_b="Is it long"),
           InputExample("x", text_b=LONG)]
    batch = t.tokenize(exs, max_length=40)
    for i, ex in enumerate(exs):
        alone = t.tokenize([ex], max_length=40)
        assert unpadded(batch, i) == alone["input_ids"][0].tolist()
        assert batch["mask_pos"][i].tolist() == alone["mask_pos"][0].tolist()


@pytest.fixture(scope="module")
def family_tokenizers(tok):
    return {"bert": tok, "roberta": roberta_tokenizer(), "gpt2": gpt2_tokenizer(), "t5": t5_tokenizer()}


ENCODE_TEXTS = ["", " It was", "A fine film", " [MASK]", "Ünïcödé — text ✓", "x " * 60, " ", "<extra_id_0>"]


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "t5"])
def test_encode_texts_equals_the_tokenizer_call(family_tokenizers, family):
    """The Rust fast path gives the ids of tokenizer(texts, add_special_tokens=False), also after a call that
    left truncation and padding set on the backend."""
    tk = family_tokenizers[family]
    want = tk(ENCODE_TEXTS, add_special_tokens=False)["input_ids"]
    assert _plain_backend(tk) is not None
    assert encode_texts(tk, ENCODE_TEXTS) == want
    tk(ENCODE_TEXTS[:3], truncation=True, max_length=4, padding="max_length" if tk.pad_token else False)
    assert tk._tokenizer.truncation is not None
    assert encode_texts(tk, ENCODE_TEXTS) == want and encode_texts(tk, []) == []


def test_encode_texts_falls_back_to_the_tokenizer_call(tok):
    """A tokenizer with its own __call__ (or no Rust backend) is called as is."""
    class Shouting(type(tok)):
        def __call__(self, text, **kw):
            return super().__call__(text.upper() if isinstance(text, str) else [t.upper() for t in text], **kw)

    loud = Shouting.from_pretrained(tok.name_or_path)
    assert _plain_backend(loud) is None
    assert encode_texts(loud, ["a cat"]) == [tok.convert_tokens_to_ids(["a", "cat"])]  # lower-cased by BERT
    batch = ManualTemplate(SENT, loud).tokenize([InputExample("a cat")])
    assert unpadded(batch, 0) == ManualTemplate(SENT, tok).tokenize([InputExample("a cat")])["input_ids"][0].tolist()


FAMILY_END = {"bert": ".", "roberta": ".", "gpt2": "", "t5": " ."}
EXAMPLES_MIXED = [InputExample("Paris is big.", text_b="Is it", label=1), InputExample(LONG, label=0),
                  InputExample("x", text_b=LONG, label=1), InputExample("", text_b="", label=0),
                  InputExample("It was wonderful! It was good fun", label=1)]


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "t5"])
@pytest.mark.parametrize("kind", ["manual", "mixed"])
def test_batched_tokenize_equals_per_example_on_every_family(family_tokenizers, encoder_backbone, family, kind):
    """Every output of one batched call (ids, mask and soft positions, labels) equals the per-example calls'
    (truncated rows, a missing text_b, empty texts included); the template-word cache does not change them."""
    import copy

    tk = family_tokenizers[family]
    if kind == "manual":
        t = ManualTemplate(PAIR.replace(" {\"mask\"}.", " {\"mask\"}" + FAMILY_END[family]), tk)
    else:
        emb = torch.nn.Embedding(len(tk), 8)
        t = MixedTemplate('{"placeholder":"text_a"} {"soft":"Question:"} {"placeholder":"text_b"} so {"soft"} '
                          '{"mask"}' + FAMILY_END[family], tk, emb)
    cold = copy.deepcopy(t)                                   # no cached template words yet
    batch = t.tokenize(EXAMPLES_MIXED, max_length=24)
    assert t._text_ids and batch["input_ids"].shape[1] == 24
    for i, ex in enumerate(EXAMPLES_MIXED):
        alone = cold.tokenize([ex], max_length=24) if i == 0 else t.tokenize([ex], max_length=24)
        assert unpadded(batch, i) == alone["input_ids"][0].tolist()
        for key in ("mask_pos", "soft_pos", "soft_ids", "labels"):
            if key in batch:
                assert batch[key][i].tolist() == alone[key][0].tolist(), key
        n = len(unpadded(batch, i))
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (24 - n)
        assert batch["input_ids"][i, n:].eq(tk.pad_token_id or 0).all()
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert ("soft_pos" in batch) == (kind == "mixed")


@pytest.mark.parametrize("len_a, len_b", [(80, 3), (3, 80), (60, 60), (25, 30)])
def test_truncation_cuts_only_shortenable_pieces_from_their_end(tok, len_a, len_b):
    words = [f"w{i}" for i in range(200)]
    a, b = " ".join(words[:len_a]), " ".join(words[:len_b])
    ids_a = tok(a, add_special_tokens=False)["input_ids"]
    ids_b = tok(b, add_special_tokens=False)["input_ids"]
    t = ManualTemplate(PAIR, tok)
    fixed = len(t.tokenize([InputExample("", text_b="")])["input_ids"][0])   # template + specials
    max_length = 48
    row = t.tokenize([InputExample(a, text_b=b)], max_length=max_length)["input_ids"][0].tolist()
    assert len(row) == min(max_length, fixed + len(ids_a) + len(ids_b))
    # template words and the mask are intact, and both texts are a prefix of their tokens
    assert contains(row, tok("Question:", add_special_tokens=False)["input_ids"])
    assert contains(row, tok("? Answer: [MASK].", add_special_tokens=False)["input_ids"])
    q_at = row.index(tok.convert_tokens_to_ids("question"))
    kept_a = row[1:q_at]
    kept_b = row[q_at + 2: row.index(tok.convert_tokens_to_ids("?"), q_at + 2)]
    assert kept_a == ids_a[:len(kept_a)] and kept_b == ids_b[:len(kept_b)]
    # the longer piece is cut first: a piece is only cut below the other's length when they are balanced
    if len(kept_a) < len(ids_a) and len(kept_b) < len(ids_b):
        assert abs(len(kept_a) - len(kept_b)) <= 1
    elif len(kept_a) < len(ids_a):
        assert len(kept_a) >= len(ids_b) and kept_b == ids_b


def test_truncation_error_names_max_length_and_the_minimum(tok):
    t = ManualTemplate(SENT, tok)
    minimum = len(t.tokenize([InputExample("")])["input_ids"][0])                # [CLS] it was [MASK] . [SEP]
    row = t.tokenize([InputExample(LONG)], max_length=minimum)["input_ids"][0]
    assert row.tolist() == tok("It was [MASK].")["input_ids"]
    with pytest.raises(TemplateError) as err:
        t.tokenize([InputExample(LONG)], max_length=minimum - 1)
    assert f"max_length={minimum - 1}" in str(err.value) and f"at least {minimum}" in str(err.value)


def test_meta_post_processing_and_special_pieces(tok):
    text = ('{"placeholder":"text_a","post_processing":"strip_period"} {"special":"<sep>"} '
            '{"meta":"who","post_processing":"lambda x: x.upper()"} said {"mask"}.')
    t = ManualTemplate(text, tok, post_processing={"lambda x: x.upper()": str.upper})
    ex = InputExample("It rains...", meta={"who": "bob"})
    assert [s for s, _ in t.wrap(ex)] == ["It rains", "[SEP]", " BOB", " said", "[MASK]", "."]
    assert t.tokenize([ex])["input_ids"][0].tolist() == tok("It rains [SEP] BOB said [MASK].")["input_ids"]


def test_process_embeds_is_identity(tok):
    x = torch.randn(2, 5, 8)
    assert ManualTemplate(SENT, tok).process_embeds(x, {}) is x


@pytest.mark.parametrize("template, ex, fix", [
    (SENT, SimpleNamespace(guid="g0"), "has no text; fill it in"),
    ('{"meta":"entity"} {"mask"}', InputExample("x", meta={"other": 1}, guid="g1"), "add meta={'entity'"),
])
def test_missing_example_fields_name_the_field(tok, template, ex, fix):
    with pytest.raises(TemplateError) as err:
        ManualTemplate(template, tok).tokenize([ex])
    assert fix in str(err.value)


@pytest.mark.parametrize("template, post, fix", [
    ('{"soft"} {"placeholder":"text_a"} {"mask"}', None, "plain text instead"),
    ('{"placeholder":"text_a","post_processing":"lambda x: x[:3]"} {"mask"}', None, "post_processing={"),
    ('{"placeholder":"text_a"} {"special":"<nope>"} {"mask"}', None, "<sep>"),
])
def test_construction_errors(tok, template, post, fix):
    with pytest.raises(TemplateError) as err:
        ManualTemplate(template, tok, post_processing=post)
    assert fix in str(err.value)


def test_bad_tokenize_arguments(tok):
    t = ManualTemplate(SENT, tok)
    with pytest.raises(TemplateError, match="positive int"):
        t.tokenize([InputExample("x")], max_length=0)
    with pytest.raises(TemplateError, match="non-empty list"):
        t.tokenize([])
    with pytest.raises(TemplateError, match="pass tokenizer="):
        ManualTemplate(SENT, None)


def test_from_file_choice_and_errors(tok, tmp_path):
    path = tmp_path / "manual.txt"
    path.write_text(SENT + "\n\n" + PAIR + "\n")
    assert ManualTemplate.from_file(path, choice=1, tokenizer=tok).text == PAIR
    assert ManualTemplate.from_file(str(path), tokenizer=tok).text == SENT
    with pytest.raises(TemplateError, match=r"choice in 0\.\.1"):
        ManualTemplate.from_file(path, choice=2, tokenizer=tok)
    with pytest.raises(MissingFileError, match="check the path"):
        ManualTemplate.from_file(tmp_path / "nope.txt", tokenizer=tok)
    path.write_bytes(SENT.encode() + b" \xe9t\xe9\n")                             # Latin-1, not UTF-8
    with pytest.raises(TemplateError, match=r"manual\.txt' is not UTF-8 text \(byte 0xe9 at offset"):
        ManualTemplate.from_file(path, tokenizer=tok)


def test_example_set_is_accepted(tok):
    exs = ExampleSet([InputExample("a", label=0), InputExample("b", label=1)], classes=["n", "p"])
    assert ManualTemplate(SENT, tok).tokenize(exs)["labels"].tolist() == [0, 1]


@pytest.fixture(scope="module")
def bpe_tok():
    """A tiny byte-level BPE tokenizer framed like RoBERTa (<s> ... </s>, <mask> eats the space before it)."""
    return roberta_tokenizer(["A fine film. It was great.", "Question: is it bad? Answer: the movie was awful"])


@pytest.mark.parametrize("template, ex, expected", [
    (SENT, InputExample("A fine film"), "A fine film It was <mask>."),
    (PAIR, InputExample("A film.", text_b="is it bad"), "A film. Question: is it bad? Answer: <mask>."),
])
def test_bpe_spacing_matches_running_text(bpe_tok, template, ex, expected):
    batch = ManualTemplate(template, bpe_tok).tokenize([ex])
    assert batch["input_ids"][0].tolist() == bpe_tok(expected)["input_ids"]
    assert batch["input_ids"][0, 0] == bpe_tok.cls_token_id and batch["input_ids"][0, -1] == bpe_tok.sep_token_id
