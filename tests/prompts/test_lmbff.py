"""LM-BFF: label-word search recovers words planted in a tiny MLM; T5 template generation gives well-formed
templates (input placeholder + mask) that load as manual templates; files round-trip."""

import pytest
import torch
import transformers
from prompt_helpers import t5_tokenizer, tiny_backbone

from promptdelta.backbones import load_backbone
from promptdelta.data import InputExample
from promptdelta.errors import CheckpointError, ConfigError, DataError, TemplateError
from promptdelta.prompts import ManualTemplate, ManualVerbalizer
from promptdelta.prompts.dsl import parse_template
from promptdelta.prompts.lmbff import (generate_templates, mask_log_probs, rank_templates, save_templates,
                                       search_label_words)

TEMPLATE = '{"placeholder":"text_a"} It was {"mask"}.'
FILLERS = ["movie", "film", "story", "plot", "day", "song"]


def _planted_mlm(tok):
    """A tiny BERT MLM that answers the mask with "bad" when "cheap" fills the input and "good" for "gold".

    Attention is uniform (q, k = 0) and its output is 10x the mean of the inputs, the MLPs are off, and the
    head is the identity + GELU + LN before the tied embeddings: the mask reads the mean input. "cheap" and
    "bad" point along dims 0-7, "gold" and "good" along dims 8-15; the label words are twice as long, so they
    outscore the input words themselves."""
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = load_backbone(transformers.BertForMaskedLM(cfg))[0]
    sd = model.state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", "mlp.fc", "bias")) and "norm" not in name:
                p.zero_()
        for i in range(2):
            sd[f"layers.{i}.attn.v_proj.weight"].copy_(torch.eye(32))
            sd[f"layers.{i}.attn.o_proj.weight"].copy_(10 * torch.eye(32))
        sd["lm_head.dense.weight"].copy_(torch.eye(32))
        emb = model.input_embeddings().weight
        u0, u1 = torch.zeros(32), torch.zeros(32)
        u0[:8], u1[8:16] = 1.0, 1.0
        for word, vec in (("cheap", 10 * u0), ("bad", 20 * u0), ("gold", 10 * u1), ("good", 20 * u1)):
            emb[tok.convert_tokens_to_ids(word)] = vec
    return model.eval()


def _planted_examples(seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for label, word in ((0, "cheap"), (1, "gold")):
        for _ in range(4):
            filler = FILLERS[int(torch.randint(len(FILLERS), (1,), generator=g))]
            out.append(InputExample(f"{word} {word} {word} {filler}", label=label))
    return out


def test_label_word_search_recovers_planted_words(tok, tmp_path):
    model = _planted_mlm(tok)
    template = ManualTemplate(TEMPLATE, tokenizer=tok)
    train, dev = _planted_examples(0), _planted_examples(1)
    lp = mask_log_probs(model, template, train)
    assert lp.shape == (8, 30522)
    result = search_label_words(model, tok, template, train, dev, ["negative", "positive"], k=3, n_best=2)
    assert [c[0] for c in result.candidates] == ["bad", "good"]
    assert result.combos[0] == ["bad", "good"] and result.dev_accuracy[0] == 1.0
    path = result.save(tmp_path / "words.json")
    verb = ManualVerbalizer.from_file(path, tokenizer=tok)
    assert verb.classes == ["negative", "positive"] and verb.label_words == [["bad"], ["good"]]
    with pytest.raises(CheckpointError, match="already exists"):
        result.save(path)


def test_label_word_search_checks_inputs(tok, mlm_backbone):
    template = ManualTemplate(TEMPLATE, tokenizer=tok)
    with pytest.raises(DataError, match="no label"):
        search_label_words(mlm_backbone, tok, template, [InputExample("x")], [InputExample("y", label=0)], ["a", "b"])
    with pytest.raises(ConfigError, match="combinations"):
        search_label_words(mlm_backbone, tok, template, _planted_examples(0), _planted_examples(1), ["a", "b"],
                           k=200)


def test_t5_template_generation_is_well_formed(tok, tmp_path):
    t5tok = t5_tokenizer()
    t5 = tiny_backbone("t5", len(t5tok))
    train = [InputExample("the movie was great", label=1), InputExample("a terrible film", label=0),
             InputExample("I loved the plot", label=1)]
    gens = generate_templates(t5, t5tok, train, ["bad", "good"], beam_size=4, max_tokens=4)
    assert len(gens) == 4 and [g.score for g in gens] == sorted((g.score for g in gens), reverse=True)
    for g in gens:
        kinds = [p.kind for p in parse_template(g.template)]
        assert kinds.count("placeholder") == 1 and kinds.count("mask") == 1
        assert kinds.index("placeholder") < kinds.index("mask")          # "{x} <span> {label} <span>"
        ManualTemplate(g.template, tokenizer=tok)                         # usable on the MLM
    before = generate_templates(t5, t5tok, train, ["bad", "good"], fmt="<extra_id_0> {label} <extra_id_1> {x}",
                                beam_size=2, max_tokens=3)
    assert all(g.template.index('{"mask"}') < g.template.index("text_a") for g in before)
    path = save_templates(tmp_path / "t.txt", [g.template for g in gens])
    assert ManualTemplate.from_file(path, choice=3, tokenizer=tok).text == gens[3].template
    with pytest.raises(TemplateError, match="sentinels"):
        generate_templates(t5, t5tok, train, ["bad", "good"], fmt="{x} <extra_id_1> {label}")


def test_rank_templates_by_dev_accuracy(tok):
    model = _planted_mlm(tok)
    verb = ManualVerbalizer(tok, classes=["negative", "positive"], label_words=[["bad"], ["good"]])
    ranked = rank_templates([TEMPLATE, '{"placeholder":"text_a"} {"mask"}.'], model, tok, verb, _planted_examples(2))
    assert [acc for _, acc in ranked] == sorted((acc for _, acc in ranked), reverse=True)
    assert ranked[0][1] == 1.0
