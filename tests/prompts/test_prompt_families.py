"""PromptForClassification on every backbone kind: BERT/RoBERTa (mlm), GPT-2 (clm), T5 (seq2seq).

Tiny random models sized to tiny tokenizers trained offline here; multi-token label scoring is checked
against a log-likelihood computed by hand, one unpadded (prompt + word) sequence at a time.
"""

import pytest
import torch
import torch.nn.functional as F
from prompt_helpers import gpt2_tokenizer, roberta_tokenizer, t5_tokenizer, tiny_backbone

from promptdelta.data.examples import InputExample
from promptdelta.deltas import attach
from promptdelta.errors import TemplateError, VerbalizerError
from promptdelta.prompts import ManualTemplate, ManualVerbalizer, PromptForClassification, SoftVerbalizer

CLM_TEMPLATE = '{"placeholder":"text_a"} It was {"mask"}'
T5_TEMPLATE = '{"placeholder":"text_a"} It was {"mask"} .'
CLASSES = ["neg", "pos"]
WORDS = [["terrible", "horrible"], ["wonderful", "good", "fun"]]   # 1 to 5 tokens; 2 vs 3 words per class
EXAMPLES = [InputExample("the movie was great", label=1), InputExample("awful", label=0),
            InputExample("I hated the acting, the plot was thin and the film too long", label=0)]
TRAIN = [InputExample(t, label=y) for t, y in [("great good fun", 1), ("awful terrible film", 0),
                                               ("good and great", 1), ("terrible and awful", 0)]]


@pytest.fixture(scope="module")
def gtok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def ttok():
    return t5_tokenizer()


@pytest.fixture(scope="module")
def gpt2(gtok):
    return tiny_backbone("gpt2", len(gtok))


@pytest.fixture(scope="module")
def t5(ttok):
    return tiny_backbone("t5", len(ttok))


def clf_for(tok, backbone, template, words=WORDS, soft=False, **kw):
    verb = (SoftVerbalizer(tok, CLASSES, words, backbone) if soft else ManualVerbalizer(tok, CLASSES, words))
    return PromptForClassification(backbone, ManualTemplate(template, tok), verb, max_length=48, **kw).eval()


# --- templates -----------------------------------------------------------------------------------------

def test_kind_is_inferred_from_the_tokenizer(tok, gtok, ttok):
    assert ManualTemplate(CLM_TEMPLATE, gtok).kind == "clm"
    assert ManualTemplate(T5_TEMPLATE, ttok).kind == "seq2seq"
    assert ManualTemplate(T5_TEMPLATE, tok).kind == "mlm"


@pytest.mark.parametrize("text", ['{"placeholder":"text_a"} It was {"mask"}.',
                                  '{"mask"} {"placeholder":"text_a"} {"mask"}'])
def test_clm_mask_must_end_the_template(gtok, text):
    with pytest.raises(TemplateError, match="must be the last piece; move the text after the mask"):
        ManualTemplate(text, gtok)


def test_clm_needs_a_token_before_the_mask(gtok):
    with pytest.raises(TemplateError, match="put text or a placeholder before"):
        ManualTemplate('{"mask"}', gtok).tokenize([InputExample("x")])


@pytest.mark.parametrize("kind, fix", [("mlm", "pass kind='clm'"), ("seq2seq", "use the T5 tokenizer"),
                                       ("bert", "use one of mlm, clm, seq2seq")])
def test_bad_kind_names_the_fix(gtok, kind, fix):
    with pytest.raises(TemplateError, match=fix):
        ManualTemplate(CLM_TEMPLATE, gtok, kind=kind)


def test_template_for_another_kind_is_refused(tok, gpt2):
    template = ManualTemplate(T5_TEMPLATE, tok)
    with pytest.raises(TemplateError, match="pass kind='clm' to it"):
        PromptForClassification(gpt2, template, ManualVerbalizer(tok, CLASSES, WORDS))


def test_clm_truncation_keeps_template_and_mask(gtok):
    template = ManualTemplate(CLM_TEMPLATE, gtok)
    long = InputExample(" ".join(["the movie was great and good fun"] * 10))
    batch = template.tokenize([long, InputExample("awful")], max_length=20)
    tail = gtok(" It was", add_special_tokens=False)["input_ids"]
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == 20 and lengths[0] == 20
    for i in range(2):
        row = batch["input_ids"][i, :lengths[i]].tolist()
        assert row[-len(tail):] == tail                                 # the template words survive the cut
        assert batch["mask_pos"][i, 0] == lengths[i] - 1                # label read at the last real token


def test_seq2seq_template_writes_the_sentinel(ttok):
    batch = ManualTemplate(T5_TEMPLATE, ttok).tokenize(EXAMPLES)
    sentinel = ttok.convert_tokens_to_ids("<extra_id_0>")
    for i in range(len(EXAMPLES)):
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, batch["mask_pos"][i, 0]] == sentinel
        assert (batch["input_ids"][i] == sentinel).sum() == 1 and batch["input_ids"][i, n - 1] == ttok.eos_token_id


# --- gathering at the label position -----------------------------------------------------------------

def test_clm_reads_the_last_real_token_and_padding_does_not_matter(gtok, gpt2):
    clf = clf_for(gtok, gpt2, CLM_TEMPLATE, words=["it", "good"])     # one token each
    batch = clf.collate(EXAMPLES)
    seen = {}
    clf.verbalizer.process = lambda h, lg, b: seen.update(h=h, l=lg) or h[:, :2]
    clf(batch)
    del clf.verbalizer.process
    for i in range(len(EXAMPLES)):
        n = int(batch["attention_mask"][i].sum())
        out = gpt2(input_ids=batch["input_ids"][i:i + 1, :n])
        torch.testing.assert_close(seen["h"][i], out.last_hidden_state[0, -1])
        torch.testing.assert_close(seen["l"][i], out.logits[0, -1])
    together = clf(batch)
    alone = torch.cat([clf(clf.collate([e])) for e in EXAMPLES])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_t5_reads_the_decoder_after_the_sentinel(ttok, t5):
    clf = clf_for(ttok, t5, T5_TEMPLATE, soft=True)
    batch = clf.collate(EXAMPLES)
    seen = {}
    process = clf.verbalizer.process
    clf.verbalizer.process = lambda h, lg, b: seen.update(h=h) or process(h, lg, b)
    clf(batch)
    sentinel = ttok.convert_tokens_to_ids("<extra_id_0>")
    for i in range(len(EXAMPLES)):
        n = int(batch["attention_mask"][i].sum())
        out = t5(input_ids=batch["input_ids"][i:i + 1, :n], decoder_input_ids=torch.tensor([[0, sentinel]]))
        torch.testing.assert_close(seen["h"][i], out.last_hidden_state[0, 1], atol=1e-5, rtol=1e-5)


# --- multi-token label words: full sequence log-likelihood ------------------------------------------

def _direct_clm(model, prompt, word):
    ids = torch.tensor([prompt + word])
    lp = model(input_ids=ids).logits[0].log_softmax(-1)               # (T, V)
    return sum(lp[len(prompt) - 1 + j, w] for j, w in enumerate(word))


def _direct_t5(model, enc, sentinel, word):
    dec = torch.tensor([[0, sentinel] + word[:-1]])
    lp = model(input_ids=torch.tensor([enc]), decoder_input_ids=dec).logits[0].log_softmax(-1)
    return sum(lp[1 + j, w] for j, w in enumerate(word))


@pytest.mark.parametrize("family", ["gpt2", "t5"])
@pytest.mark.parametrize("normalise", [False, True])
def test_multi_token_scores_match_a_direct_log_likelihood(family, normalise, gtok, ttok, gpt2, t5):
    tok, model, text = (gtok, gpt2, CLM_TEMPLATE) if family == "gpt2" else (ttok, t5, T5_TEMPLATE)
    clf = clf_for(tok, model, text, length_normalize=normalise)
    assert clf.uses_sequence_scoring
    lengths = clf.verbalizer.token_mask.sum(-1)
    assert lengths.max() > 1 and lengths[clf.verbalizer.word_mask].min() < lengths.max()   # mixed lengths
    batch = clf.collate(EXAMPLES)
    with torch.no_grad():
        got = clf.label_word_scores(batch)                             # (B, C, W)
        for i in range(len(EXAMPLES)):
            n = int(batch["attention_mask"][i].sum())
            prompt = batch["input_ids"][i, :n].tolist()
            sentinel = prompt[int(batch["mask_pos"][i, 0])]
            for c, ws in enumerate(WORDS):
                for w, word in enumerate(ws):
                    ids = tok(" " + word, add_special_tokens=False)["input_ids"]
                    want = (_direct_clm(model, prompt, ids) if family == "gpt2"
                            else _direct_t5(model, prompt, sentinel, ids))
                    want = want / len(ids) if normalise else want
                    torch.testing.assert_close(got[i, c, w], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_label_logits_are_the_normalised_sequence_scores(family, gtok, ttok, gpt2, t5):
    tok, model, text = (gtok, gpt2, CLM_TEMPLATE) if family == "gpt2" else (ttok, t5, T5_TEMPLATE)
    clf = clf_for(tok, model, text, words=["terrible", "wonderful"])   # one word per class
    batch = clf.collate(EXAMPLES)
    with torch.no_grad():
        scores = clf.label_word_scores(batch)[..., 0]                  # (B, C)
        torch.testing.assert_close(clf(batch), scores.log_softmax(-1))


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_single_token_words_take_the_cheap_path_with_the_same_result(family, gtok, ttok, gpt2, t5):
    tok, model, text = (gtok, gpt2, CLM_TEMPLATE) if family == "gpt2" else (ttok, t5, T5_TEMPLATE)
    words = [[w] for w in ("it", "good")]                              # one token in both tokenizers
    clf = clf_for(tok, model, text, words=words)
    assert clf.verbalizer.token_ids.shape[-1] == 1 and not clf.uses_sequence_scoring
    batch = clf.collate(EXAMPLES)
    v = clf.verbalizer
    with torch.no_grad():
        via_scores = v.aggregate(v.calibrate(v.normalise(clf.label_word_scores(batch))))
        torch.testing.assert_close(clf(batch), via_scores, atol=1e-5, rtol=1e-5)


def test_verbalizer_scoring_option_uses_the_first_token_only(gtok, gpt2):
    seq = clf_for(gtok, gpt2, CLM_TEMPLATE)
    first = clf_for(gtok, gpt2, CLM_TEMPLATE, scoring="verbalizer")
    assert not first.uses_sequence_scoring
    with torch.no_grad():
        assert not torch.allclose(seq(seq.collate(EXAMPLES)), first(first.collate(EXAMPLES)))
    with pytest.raises(VerbalizerError, match="use one of sequence, verbalizer"):
        clf_for(gtok, gpt2, CLM_TEMPLATE, scoring="sum")


def test_label_word_scores_refuses_masked_lms(tok, mlm_backbone):
    clf = clf_for(tok, mlm_backbone, T5_TEMPLATE)
    with pytest.raises(VerbalizerError, match="use the verbalizer's multi_token_handler"):
        clf.label_word_scores(clf.collate(EXAMPLES))


def test_clm_collate_leaves_room_for_the_label_tokens(gtok, gpt2):
    clf = clf_for(gtok, gpt2, CLM_TEMPLATE)
    clf.max_length = 16
    batch = clf.collate([InputExample(" ".join(["the movie was great"] * 10))])
    assert batch["input_ids"].shape[1] == 16 - (clf.verbalizer.token_ids.shape[-1] - 1)


# --- training on every family ------------------------------------------------------------------------

def _family(name, tok, gtok, ttok):
    if name == "bert":
        return tok, tiny_backbone("bert", 30522), '{"placeholder":"text_a"} It was {"mask"}.'
    if name == "roberta":
        rtok = roberta_tokenizer()
        return rtok, tiny_backbone("roberta", len(rtok)), '{"placeholder":"text_a"} It was {"mask"}.'
    if name == "gpt2":
        return gtok, tiny_backbone("gpt2", len(gtok)), CLM_TEMPLATE
    return ttok, tiny_backbone("t5", len(ttok)), T5_TEMPLATE


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("name", ["bert", "roberta", "gpt2", "t5"])
def test_loss_falls_with_lora_on_every_family(name, soft, tok, gtok, ttok):
    """30 Adam steps of LoRA on a 4-example task. A ManualVerbalizer on a random tiny model cannot reach 0
    (a frozen final LayerNorm and std-0.02 embeddings bound the logit gaps), so it must halve the loss;
    the SoftVerbalizer must fit the task."""
    tk, model, text = _family(name, tok, gtok, ttok)
    attach(model, "lora", targets=["q_proj", "k_proj", "v_proj", "o_proj", "fc1"], r=4, alpha=16)
    clf = clf_for(tk, model, text, words=[["terrible"], ["wonderful"]], soft=soft).train()
    opt = torch.optim.Adam([p for p in clf.parameters() if p.requires_grad], lr=2e-2)
    batch = clf.collate(TRAIN)
    torch.manual_seed(0)
    losses = []
    for _ in range(30):
        loss, _ = clf.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    if soft:
        assert losses[-1] < 0.05 and clf.predict(TRAIN).tolist() == [e.label for e in TRAIN]


# --- hooks for the other verbalizers: several masks, an extra loss ----------------------------------

def test_several_masks_reach_a_multi_mask_verbalizer(tok, mlm_backbone):
    from promptdelta.prompts import MultiMaskVerbalizer

    verb = MultiMaskVerbalizer.from_label_words(tok, CLASSES, [["bad", "good"], ["no", "yes"]])
    template = ManualTemplate('{"placeholder":"text_a"} It was {"mask"}. Good? {"mask"}.', tok)
    clf = PromptForClassification(mlm_backbone, template, verb, max_length=32).eval()
    batch = clf.collate(EXAMPLES)
    with torch.no_grad():
        out = mlm_backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        rows = torch.arange(len(EXAMPLES))[:, None]
        want = verb.process(None, out.logits[rows, batch["mask_pos"]], mlm_backbone)     # (B, 2, V) in
        torch.testing.assert_close(clf(batch), want)
    one_mask = PromptForClassification(mlm_backbone, template, ManualVerbalizer(tok, CLASSES, ["bad", "good"]))
    with pytest.raises(VerbalizerError, match="MultiMaskVerbalizer"):
        one_mask(batch)


def test_t5_refuses_several_masks(ttok, t5):
    template = ManualTemplate('{"placeholder":"text_a"} {"mask"} and {"mask"} .', ttok)
    clf = PromptForClassification(t5, template, ManualVerbalizer(ttok, CLASSES, ["it", "good"]))
    with pytest.raises(TemplateError, match="use a template with one"):
        clf(clf.collate(EXAMPLES))


def test_loss_adds_the_verbalizers_extra_loss(gtok, gpt2):
    from promptdelta.prompts import ProtoVerbalizer

    verb = ProtoVerbalizer(CLASSES, hidden_size=gpt2.config.hidden_size, proto_dim=8, temperature=0.5)
    clf = PromptForClassification(gpt2, ManualTemplate(CLM_TEMPLATE, gtok), verb, max_length=48).eval()
    batch = clf.collate(EXAMPLES)
    loss, logits = clf.loss(batch)
    hidden = gpt2(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    hidden = hidden[torch.arange(len(EXAMPLES)), batch["mask_pos"][:, 0]]          # last real token
    want = F.cross_entropy(logits, batch["labels"]) + verb.extra_loss(hidden, batch["labels"])
    torch.testing.assert_close(loss, want)
    assert verb.extra_loss(hidden, batch["labels"]) > 0
