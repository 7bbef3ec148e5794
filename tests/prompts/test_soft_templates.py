"""Soft templates (Mixed, Soft = prompt tuning, P-tuning) and the soft parts of the DSL, on a tiny BERT.

Invariants: soft slots land where the template puts them; a text-initialised soft piece reproduces the
manual template exactly; training with a frozen backbone changes only the template's parameters and lowers
the loss; save/load round-trips; every bad input raises a TemplateError/CheckpointError naming the fix.
"""

import json

import pytest
import torch
import transformers
from prompt_helpers import unpadded
from safetensors.torch import save_file

from promptdelta.backbones import load_backbone
from promptdelta.data.examples import InputExample
from promptdelta.errors import CheckpointError, MissingFileError, TemplateError
from promptdelta.prompts import (POST_PROCESSING, ManualTemplate, ManualVerbalizer, MixedTemplate,
                                 PromptForClassification, PtuningTemplate, SoftTemplate, parse_template)
from promptdelta.utils.io import atomic_save_safetensors

EXS = [InputExample("a good movie", label=1), InputExample("a truly bad and boring movie", label=0)]


@pytest.fixture(scope="module")
def bb():
    """A private, frozen tiny MLM BERT (vocab of the MiniLM tokenizer). initializer_range=0.3: at the usual
    0.02 a 2-layer random BERT's mask output hardly depends on the input, so no prompt could fit a task."""
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=128, initializer_range=0.3)
    torch.manual_seed(0)
    model, _ = load_backbone(transformers.BertForMaskedLM(cfg))
    return model.requires_grad_(False)


def make(cls, tok, bb, **kw):
    torch.manual_seed(0)
    if cls is SoftTemplate:
        return SoftTemplate('{"placeholder":"text_a"} It was {"mask"}.', tok, bb, num_tokens=3, **kw)
    if cls is PtuningTemplate:
        return PtuningTemplate('{"placeholder":"text_a"} {"soft"} {"soft":"was"} {"mask"}.', tok, bb, **kw)
    return MixedTemplate('{"placeholder":"text_a"} {"soft":"It was"} {"soft"} {"mask"}.', tok, bb, **kw)


# ---- slots, init and process_embeds ------------------------------------------------------------------

def test_soft_slots_sharing_duplicate_and_same(tok, bb):
    t = MixedTemplate('{"soft":"It was"} {"soft","soft_id":1} {"placeholder":"text_a"} {"mask"} '
                      '{"soft_id":1} {"soft":null,"duplicate":2} {"soft":null,"duplicate":3,"same":true}.',
                      tok, bb)
    assert t.num_soft_tokens == 2 + 1 + 2 + 1                      # it, was | id 1 | two | one shared
    batch = t.tokenize(EXS)
    n_a = [len(tok(e.text, add_special_tokens=False)["input_ids"]) for e in EXS]
    assert batch["soft_ids"].tolist() == [[0, 1, 2, 2, 3, 4, 5, 5, 5]] * 2
    for i, n in enumerate(n_a):
        assert batch["soft_pos"][i].tolist() == [1, 2, 3] + [5 + n + k for k in range(6)]
        assert batch["mask_pos"][i].tolist() == [4 + n]
    assert (batch["input_ids"] >= 0).all()
    emb = bb.input_embeddings().weight
    ids = tok(" It was", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(t.soft_embeds[:2].detach(), emb[ids])


def test_text_initialised_soft_piece_reproduces_the_manual_template(tok, bb):
    """{"soft": "It was"} starts as the embeddings of "It was": same inputs, same logits at the mask."""
    mixed = MixedTemplate('{"placeholder":"text_a"} {"soft":"It was"} {"mask"}.', tok, bb)
    manual = ManualTemplate('{"placeholder":"text_a"} It was {"mask"}.', tok)
    bm, bt = mixed.tokenize(EXS), manual.tokenize(EXS)
    assert bm["input_ids"].shape == bt["input_ids"].shape and torch.equal(bm["mask_pos"], bt["mask_pos"])
    out = mixed.process_embeds(bb.input_embeddings()(bm["input_ids"]), bm)
    torch.testing.assert_close(out, bb.input_embeddings()(bt["input_ids"]), rtol=0, atol=0)
    keep = torch.ones_like(bm["input_ids"], dtype=torch.bool)
    keep[torch.arange(2).unsqueeze(1), bm["soft_pos"]] = False
    assert torch.equal(bm["input_ids"][keep], bt["input_ids"][keep])


@pytest.mark.parametrize("cls", [MixedTemplate, SoftTemplate, PtuningTemplate])
def test_process_embeds_writes_soft_vectors_only_at_soft_positions(tok, bb, cls):
    t = make(cls, tok, bb)
    batch = t.tokenize(EXS)
    x = torch.randn(*batch["input_ids"].shape, bb.config.hidden_size)
    out = t.process_embeds(x, batch)
    rows = torch.arange(2).unsqueeze(1)
    soft = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    soft[rows, batch["soft_pos"]] = True
    assert torch.equal(out[~soft], x[~soft])
    torch.testing.assert_close(out[rows, batch["soft_pos"]], t.soft_vectors()[batch["soft_ids"]])
    out.sum().backward()
    assert t.soft_embeds.grad is not None and t.soft_embeds.grad.abs().sum() > 0


def test_soft_template_prepends_num_tokens_after_cls(tok, bb):
    t = SoftTemplate('{"placeholder":"text_a"} It was {"mask"}.', tok, bb, num_tokens=4)
    batch = t.tokenize(EXS)
    assert batch["soft_pos"].tolist() == [[1, 2, 3, 4]] * 2 and batch["soft_ids"].tolist() == [[0, 1, 2, 3]] * 2
    plain = ManualTemplate('{"placeholder":"text_a"} It was {"mask"}.', tok).tokenize(EXS)
    for i in range(2):
        row = unpadded(batch, i)
        assert row[:1] + row[5:] == unpadded(plain, i)
    assert t.num_soft_tokens == 4 and list(t.state_dict()) == ["soft_embeds"]


def test_soft_template_inits(tok, bb):
    emb = bb.input_embeddings().weight
    t = SoftTemplate(tokenizer=tok, backbone=bb, num_tokens=5, init_text="great movie")
    ids = tok("great movie", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(t.soft_embeds.detach(), emb[[ids[i % len(ids)] for i in range(5)]])
    torch.manual_seed(1)
    v = SoftTemplate(tokenizer=tok, backbone=bb, num_tokens=64, init="vocab").soft_embeds.detach()
    hits = torch.cdist(v, emb).argmin(1)                                  # every row is a vocabulary row
    assert torch.equal(v, emb[hits])
    assert not set(hits.tolist()) & set(tok.all_special_ids)
    assert all(not t.startswith("[") for t in tok.convert_ids_to_tokens(hits.tolist()))
    r = SoftTemplate(tokenizer=tok, backbone=bb, num_tokens=2000, init="random").soft_embeds.detach()
    assert abs(r.std().item() / emb.std().item() - 1) < 0.05 and abs(r.mean().item()) < 0.01


def test_ptuning_lstm_couples_tokens_mlp_does_not(tok, bb):
    text = '{"placeholder":"text_a"} {"soft"} {"soft"} {"soft"} {"mask"}.'
    for encoder, coupled in [("lstm", True), ("mlp", False)]:
        torch.manual_seed(0)
        t = PtuningTemplate(text, tok, bb, prompt_encoder=encoder)
        before = t.soft_vectors().detach().clone()
        with torch.no_grad():
            t.soft_embeds[0] += 1.0
        after = t.soft_vectors().detach()
        assert not torch.allclose(before[0], after[0])
        assert torch.allclose(before[2], after[2]) != coupled
        assert after.shape == (3, bb.config.hidden_size)


# ---- training: loss falls, only the template changes --------------------------------------------------

TASK = [InputExample(t, label=y) for t, y in [
    ("great fun", 1), ("a wonderful film", 1), ("i loved it", 1), ("superb acting", 1),
    ("dull and slow", 0), ("a boring mess", 0), ("i hated it", 0), ("awful script", 0)]]


@pytest.mark.parametrize("cls", [MixedTemplate, SoftTemplate, PtuningTemplate])
def test_training_with_a_frozen_backbone_changes_only_the_template(tok, bb, cls):
    template = make(cls, tok, bb)
    verbalizer = ManualVerbalizer(tok, classes=["neg", "pos"], label_words=["bad", "good"])
    clf = PromptForClassification(bb, template, verbalizer, max_length=32)
    frozen = {k: v.clone() for k, v in bb.state_dict().items()}
    start = {k: v.detach().clone() for k, v in template.state_dict().items()}
    trainable = [p for p in clf.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in template.parameters()}
    opt = torch.optim.Adam(trainable, lr=0.05)
    batch = clf.collate(TASK)
    first = clf.loss(batch)[0].item()
    for _ in range(25):
        opt.zero_grad()
        loss = clf.loss(batch)[0]
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert all(torch.equal(v, frozen[k]) for k, v in bb.state_dict().items())
    assert all(not torch.equal(v, start[k]) for k, v in template.state_dict().items() if v.numel())


# ---- save / load -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [MixedTemplate, SoftTemplate, PtuningTemplate])
def test_save_load_round_trip(tok, bb, cls, tmp_path):
    a = make(cls, tok, bb)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p))
    path = a.save(tmp_path / "run")
    assert path == tmp_path / "run" / "prompt.safetensors" and path.is_file()
    torch.manual_seed(123)
    b = make(cls, tok, bb)
    assert not torch.equal(a.soft_vectors(), b.soft_vectors())
    assert b.load(path) is b
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    batch = a.tokenize(EXS)
    x = bb.input_embeddings()(batch["input_ids"])
    assert torch.equal(a.process_embeds(x, batch), b.process_embeds(x, batch))


def test_load_accepts_a_run_prompt_file_with_template_prefix(tok, bb, tmp_path):
    a = make(MixedTemplate, tok, bb)
    atomic_save_safetensors(tmp_path / "prompt.safetensors",
                            {f"template.{k}": v + 1 for k, v in a.state_dict().items()})
    b = make(MixedTemplate, tok, bb).load(tmp_path)
    assert torch.equal(b.soft_embeds, a.soft_embeds + 1)


def test_checkpoint_errors(tok, bb, tmp_path):
    a = make(MixedTemplate, tok, bb)
    path = a.save(tmp_path / "p.safetensors")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        a.save(path)
    assert a.save(path, overwrite=True) == path
    bigger = MixedTemplate('{"placeholder":"text_a"} {"soft":null,"duplicate":7} {"mask"}.', tok, bb)
    with pytest.raises(CheckpointError, match="same template text"):
        bigger.load(path)
    with pytest.raises(CheckpointError, match="same class"):
        make(PtuningTemplate, tok, bb).load(path)
    with pytest.raises(MissingFileError, match="template.save"):
        a.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="save it again"):
        a.load(tmp_path / "junk.safetensors")
    save_file({"other": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        a.load(tmp_path / "other.safetensors")


# ---- files and errors --------------------------------------------------------------------------------------

def test_from_file(tok, bb, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text('{"placeholder":"text_a"} {"mask"}\n\n{"soft":"A"} {"mask"}: {"placeholder":"text_a"}\n')
    t = MixedTemplate.from_file(f, choice=1, tokenizer=tok, backbone=bb)
    assert t.num_soft_tokens == 1
    s = SoftTemplate.from_file(f, choice=0, tokenizer=tok, backbone=bb, num_tokens=2)
    assert s.num_soft_tokens == 2
    with pytest.raises(TemplateError, match=r"choice in 0\.\.1"):
        MixedTemplate.from_file(f, choice=2, tokenizer=tok, backbone=bb)
    with pytest.raises(MissingFileError, match="check the path"):
        PtuningTemplate.from_file(tmp_path / "missing.txt", tokenizer=tok, backbone=bb)


@pytest.mark.parametrize("build, fix", [
    (lambda tok, bb: MixedTemplate('{"soft","soft_id":1} {"soft":"x","soft_id":1} {"mask"}', tok, bb),
     "already defined at column 1"),
    (lambda tok, bb: MixedTemplate('{"placeholder":"text_a"} {"mask"}', tok, None), "pass backbone=model"),
    (lambda tok, bb: SoftTemplate(tokenizer=tok, backbone=bb, num_tokens=0), "num_tokens=20"),
    (lambda tok, bb: SoftTemplate(tokenizer=tok, backbone=bb, init="zeros"), "init_text="),
    (lambda tok, bb: SoftTemplate(tokenizer=tok, backbone=bb, init_text="  "), "init_text=None"),
    (lambda tok, bb: SoftTemplate(tokenizer=None, backbone=bb), "pass tokenizer="),
    (lambda tok, bb: PtuningTemplate('{"placeholder":"text_a"} {"mask"}', tok, bb), 'add {"soft"} pieces'),
    (lambda tok, bb: PtuningTemplate('{"soft"} {"mask"}', tok, bb, prompt_encoder="gru"), "lstm, mlp"),
    (lambda tok, bb: ManualTemplate('{"soft"} {"mask"}', tok), "MixedTemplate"),
])
def test_construction_errors_name_the_fix(tok, bb, build, fix):
    with pytest.raises(TemplateError) as err:
        build(tok, bb)
    assert fix in str(err.value)


def test_process_embeds_needs_a_batch_from_the_template(tok, bb):
    t = make(MixedTemplate, tok, bb)
    manual_batch = ManualTemplate('{"placeholder":"text_a"} {"mask"}', tok).tokenize(EXS)
    x = torch.zeros(2, manual_batch["input_ids"].shape[1], bb.config.hidden_size)
    with pytest.raises(TemplateError, match="build the batch with this template"):
        t.process_embeds(x, manual_batch)
    bad = dict(t.tokenize(EXS), soft_ids=torch.full((2, 3), 9))
    with pytest.raises(TemplateError, match="tokenize the batch with this template"):
        t.process_embeds(torch.zeros(2, bad["input_ids"].shape[1], 32), bad)
    plain = MixedTemplate('{"placeholder":"text_a"} {"mask"}', tok, bb)         # no soft pieces: identity
    assert plain.num_soft_tokens == 0 and plain.process_embeds(x, manual_batch) is x


# ---- the DSL: soft options, OpenPrompt literals, post_processing ------------------------------------------

def test_dsl_reads_openprompt_python_literals_and_prefix_space():
    pieces = parse_template('{"placeholder": "text_a", "shortenable": True} {"soft": None, "duplicate": 2} '
                            '{"mask", "add_prefix_space": ""} {"text": "True None", "add_prefix_space": " "}')
    assert [(p.kind, p.value) for p in pieces] == [("placeholder", "text_a"), ("soft", None), ("mask", None),
                                                   ("text", "True None")]
    assert pieces[0].shortenable and pieces[1].duplicate == 2
    assert [p.space_before for p in pieces] == [False, True, False, True]


@pytest.mark.parametrize("name, expected", [
    ("lambda x: x.strip('.')", "strip_period"), ('lambda s:s.strip(".")', "strip_period"),
    ("lambda x: x[0].lower() + x[1:]", "lower_first"), ("lambda t: t.lower()", "lower"),
    ("lambda x: x.strip('. ')", "lambda x: x.strip('. ')"), ("lower", "lower"),
])
def test_openprompt_lambdas_map_to_named_operations(name, expected):
    piece = parse_template('{"placeholder":"text_a","post_processing":' + json.dumps(name) + '} {"mask"}')[0]
    assert piece.post_processing == expected


@pytest.mark.parametrize("op, text, expected", [
    ("strip_period", "..It rains.", "It rains"), ("rstrip_period", ".Hi..", ".Hi"),
    ("rstrip_punct", "Is it? ", "Is it"), ("lower_first", "The Cat", "the Cat"),
    ("upper_first", "the cat", "The cat"), ("add_period", "Done", "Done."), ("add_period", "Done!", "Done!"),
    ("capitalize", "tHE cat", "The cat"), ("strip", "  x ", "x"), ("lower", "AbC", "abc"), ("upper", "a", "A"),
])
def test_post_processing_operations(op, text, expected):
    assert POST_PROCESSING[op](text) == expected


def test_post_processing_is_applied_and_unknown_names_list_the_known_ones(tok):
    t = ManualTemplate('{"placeholder":"text_b","post_processing":"lambda x: x[0].lower()+x[1:]"} {"mask"}', tok)
    assert t.wrap(InputExample("a", text_b="The Cat"))[0][0] == "the Cat"
    with pytest.raises(TemplateError) as err:
        ManualTemplate('{"placeholder":"text_a","post_processing":"shout"} {"mask"}', tok)
    assert all(name in str(err.value) for name in POST_PROCESSING)


@pytest.mark.parametrize("text, column, fix", [
    ('{"mask"} {"text":"x","duplicate":2}', "column 10", "only applies to soft pieces"),
    ('{"mask"} {"soft","duplicate":0}', "column 10", "positive integer"),
    ('{"mask"} {"soft_id":true}', "column 10", "positive integer"),
    ('{"mask"} {"soft","same":true}', "column 10", '"duplicate": 3'),
    ('{"mask"} {"soft","duplicate":2,"same":"yes"}', "column 10", "true or false"),
    ('{"mask"} {"soft":"It was","duplicate":2}', "column 10", "remove 'duplicate'"),
    ('{"mask"} {"soft":3}', "column 10", '{"soft": "It was"}'),
    ('{"mask", "add_prefix_space": "  "}', "column 1", '"add_prefix_space": " "'),
    ('{"mask", "post_processing": 3}', "column 1", "strip_period"),
])
def test_soft_option_errors_name_column_and_fix(text, column, fix):
    with pytest.raises(TemplateError) as err:
        parse_template(text)
    assert column in str(err.value) and fix in str(err.value)
