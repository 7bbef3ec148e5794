"""PromptForGeneration on tiny GPT-2 and T5: teacher-forced loss parity with transformers, generate() through
the template (parity with the backbone's own generate, padding invariance, learns one example), errors."""

import pytest
import torch
from prompt_helpers import NO_DROPOUT, gpt2_tokenizer, hf_model, t5_tokenizer

from promptdelta.backbones import load_backbone
from promptdelta.data.examples import InputExample
from promptdelta.errors import DataError, TemplateError
from promptdelta.prompts import ManualTemplate, PromptForGeneration

CORPUS = ["the movie was great and good fun.", "a terrible and awful film.", "It was wonderful!",
          "Question: was it good? Answer: yes it was great", "Answer: no", "Summary: a fine film"]
CLM_TEMPLATE = 'Question: {"placeholder":"text_a"} Answer: {"mask"}'
T5_TEMPLATE = 'Question: {"placeholder":"text_a"} Answer: {"mask"} .'
EXAMPLES = [InputExample("was it good?", meta={"target": "yes it was great"}),
            InputExample("was the film terrible and awful?", meta={"target": "no"})]


def _parts(family):
    """(tokenizer, HF model, native backbone) with the same random weights."""
    tok = (gpt2_tokenizer if family == "gpt2" else t5_tokenizer)(CORPUS)
    hf = hf_model(family, len(tok), **NO_DROPOUT[family])
    return tok, hf, load_backbone(hf)[0]


@pytest.fixture(scope="module")
def gpt2_parts():
    return _parts("gpt2")


@pytest.fixture(scope="module")
def t5_parts():
    return _parts("t5")


def gen_model(parts, family, **kw):
    tok, _, backbone = parts
    text = CLM_TEMPLATE if family == "gpt2" else T5_TEMPLATE
    return PromptForGeneration(backbone, ManualTemplate(text, tok), max_length=40, **kw).eval()


def test_clm_batch_puts_the_target_after_the_prompt(gpt2_parts):
    tok, _, _ = gpt2_parts
    model = gen_model(gpt2_parts, "gpt2")
    batch = model.collate(EXAMPLES)
    for i, ex in enumerate(EXAMPLES):
        n = int(batch["attention_mask"][i].sum())
        target = tok(" " + ex.meta["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert batch["input_ids"][i, n - len(target):n].tolist() == target
        kept = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert kept == target and (batch["labels"][i, :n - len(target)] == -100).all()
        assert batch["mask_pos"][i, 0] == n - len(target) - 1          # last prompt token predicts the target


def test_clm_loss_equals_transformers_loss_with_labels(gpt2_parts):
    _, hf, _ = gpt2_parts
    model = gen_model(gpt2_parts, "gpt2")
    batch = model.collate(EXAMPLES)
    with torch.no_grad():
        loss, logits = model.loss(batch)
        want = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    real = batch["attention_mask"].bool()                              # padding positions may differ
    torch.testing.assert_close(logits[real], want.logits[real], atol=1e-5, rtol=1e-5)
    assert (batch["labels"][~real] == -100).all()
    torch.testing.assert_close(loss, want.loss, atol=1e-5, rtol=1e-5)


def test_t5_loss_equals_the_backbones_and_transformers_loss(t5_parts):
    tok, hf, backbone = t5_parts
    model = gen_model(t5_parts, "t5")
    batch = model.collate(EXAMPLES)
    sentinel = tok.convert_tokens_to_ids("<extra_id_0>")
    assert (batch["labels"][:, 0] == sentinel).all()                   # <extra_id_0> target </s>
    with torch.no_grad():
        loss, _ = model.loss(batch)
        native = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(loss, native, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


def test_clm_generate_matches_the_backbones_generate(gpt2_parts):
    tok, _, backbone = gpt2_parts
    model = gen_model(gpt2_parts, "gpt2")
    for ex in EXAMPLES:
        prompt = model.prompt_batch([ex])["input_ids"]
        want = backbone.generate(prompt, max_new_tokens=6, eos_token_id=tok.eos_token_id)[0, prompt.shape[1]:]
        got = model.generate_ids(model.prompt_batch([ex]), model_config(tok))[0]
        assert got.tolist() == want.tolist()


def model_config(tok):
    from promptdelta.backbones.generation import GenerationConfig

    return GenerationConfig(max_new_tokens=6, eos_token_id=tok.eos_token_id)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_batched_generation_equals_one_by_one(family, gpt2_parts, t5_parts):
    parts = gpt2_parts if family == "gpt2" else t5_parts
    model = gen_model(parts, family)
    cfg = model_config(parts[0])
    together = model.generate_ids(model.prompt_batch(EXAMPLES), cfg)
    for i, ex in enumerate(EXAMPLES):
        alone = model.generate_ids(model.prompt_batch([ex]), cfg)[0]
        assert together[i, :len(alone)].tolist() == alone.tolist()


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_generate_returns_the_target_after_training_on_it(family, gpt2_parts, t5_parts):
    tok, hf, _ = gpt2_parts if family == "gpt2" else t5_parts
    torch.manual_seed(0)
    backbone = load_backbone(hf)[0]                                   # a fresh copy: training changes it
    text = CLM_TEMPLATE if family == "gpt2" else T5_TEMPLATE
    model = PromptForGeneration(backbone, ManualTemplate(text, tok), max_length=40).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = model.collate(EXAMPLES[:1])
    for _ in range(40):
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    assert model.generate(EXAMPLES[:1], max_new_tokens=10) == [EXAMPLES[0].meta["target"]]
    assert model.training                                              # mode restored


def test_errors_name_the_fix(tok, mlm_backbone, gpt2_parts):
    with pytest.raises(TemplateError, match="use GPT-2 or T5"):
        PromptForGeneration(mlm_backbone, ManualTemplate('{"placeholder":"text_a"} {"mask"}', tok))
    model = gen_model(gpt2_parts, "gpt2")
    with pytest.raises(DataError, match=r"put it in meta=\{'target'"):
        model.collate([InputExample("no target here")])
    with pytest.raises(DataError, match="build it with collate"):
        model.loss(model.prompt_batch(EXAMPLES))
    assert gen_model(gpt2_parts, "gpt2", target_key="answer").target_text(
        InputExample("q", meta={"answer": " 42 "})) == "42"
