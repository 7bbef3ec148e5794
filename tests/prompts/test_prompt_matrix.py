"""Every template x every verbalizer x every backbone family, on tiny random models (peft's
``test_custom_models`` pattern: one matrix, the same invariants for each cell).

Templates: manual, mixed, soft (prompt tuning), P-tuning with an LSTM and with an MLP encoder. Verbalizers:
manual, soft (WARP), proto (ProtoVerb), knowledgeable (KPT), multi-mask (two masks; masked LMs only: a causal
LM predicts one next token and T5 reads one sentinel, which test_prompt_families checks are refused).
Families: BERT, RoBERTa (mlm), GPT-2 (clm), T5 (seq2seq).

With the backbone frozen, in each cell:
  * the trainable parameters are the template's and the verbalizer's, and training changes nothing else;
  * the loss on a 4-example task falls within 12 Adam steps (by a fifth; see the one exception in the test);
  * the prompt state (``template.*`` + ``verbalizer.*`` in one safetensors file, as a run saves it) loads into a
    freshly initialised model, which then gives the same logits.
A manual template with a manual or multi-mask verbalizer has no parameter of its own: those cells train a
LoRA delta instead (the same invariants, the delta in place of the prompt state, saved with handle.save).
"""

import copy

import pytest
import torch
from prompt_helpers import FAMILIES, gpt2_tokenizer, roberta_tokenizer, t5_tokenizer, tiny_backbone

from promptdelta.data.examples import InputExample
from promptdelta.deltas import attach, load_delta
from promptdelta.prompts import (KnowledgeableVerbalizer, ManualTemplate, ManualVerbalizer, MixedTemplate,
                                 MultiMaskVerbalizer, PromptForClassification, ProtoVerbalizer, PtuningTemplate,
                                 SoftTemplate, SoftVerbalizer)
from promptdelta.utils.io import atomic_save_safetensors

TEMPLATES = ("manual", "mixed", "soft", "ptuning-lstm", "ptuning-mlp")
VERBALIZERS = ("manual", "soft", "proto", "kpt", "multi-mask")
CLASSES = ["neg", "pos"]
WORDS = [["terrible"], ["wonderful"]]
KPT_WORDS = [["terrible", "awful", "bad", "horrible", "hated"], ["wonderful", "good", "great", "fun", "loved"]]
SECOND_MASK_WORDS = [["bad"], ["good"]]
TRAIN = [InputExample(t, label=y) for t, y in [("great good fun", 1), ("awful terrible film", 0),
                                               ("good and great", 1), ("terrible and awful", 0)]]
# text of each template kind; the mask ends the template on GPT-2 and T5 adds " ." after it (see
# test_prompt_families); a multi-mask cell appends a second mask
BODY = {"manual": '{"placeholder":"text_a"} It was {"mask"}', "soft": '{"placeholder":"text_a"} It was {"mask"}',
        "mixed": '{"placeholder":"text_a"} {"soft":"It was"} {"mask"}',
        "ptuning": '{"placeholder":"text_a"} {"soft"} {"soft":"was"} {"mask"}'}
END = {"bert": ".", "roberta": ".", "gpt2": "", "t5": " ."}
SECOND_MASK = ' All in all {"mask"}.'
STEPS = 12
LR = {"prompt": 0.1, "lora": 5e-2}


def cells():
    return [(f, t, v) for f in FAMILIES for t in TEMPLATES for v in VERBALIZERS
            if v != "multi-mask" or f in ("bert", "roberta")]


@pytest.fixture(scope="module")
def families(tok):
    """family -> (tokenizer, frozen tiny backbone). BERT, RoBERTa, GPT-2: initializer_range 0.3, so that the
    random model's mask output depends on the input enough for a prompt to fit the task (see
    test_soft_templates); T5's default init already does."""
    out = {}
    for family in FAMILIES:
        tk = {"bert": lambda: tok, "roberta": roberta_tokenizer, "gpt2": gpt2_tokenizer, "t5": t5_tokenizer}[family]()
        init = {} if family == "t5" else {"initializer_range": 0.3}
        out[family] = tk, tiny_backbone(family, len(tk), **init).requires_grad_(False)
    return out


def build(family, template, verbalizer, tk, backbone, seed=0):
    """The cell's PromptForClassification; ``seed`` sets the initial values of its own parameters."""
    torch.manual_seed(seed)
    text = BODY[template.split("-")[0]] + END[family] + (SECOND_MASK if verbalizer == "multi-mask" else "")
    if template == "manual":
        tmpl = ManualTemplate(text, tk)
    elif template == "mixed":
        tmpl = MixedTemplate(text, tk, backbone)
    elif template == "soft":
        tmpl = SoftTemplate(text, tk, backbone, num_tokens=3)
    else:
        tmpl = PtuningTemplate(text, tk, backbone, prompt_encoder=template.split("-")[1])
    if verbalizer == "manual":
        verb = ManualVerbalizer(tk, CLASSES, WORDS)
    elif verbalizer == "soft":
        verb = SoftVerbalizer(tk, CLASSES, WORDS, backbone)
    elif verbalizer == "proto":
        verb = ProtoVerbalizer(CLASSES, backbone.config.hidden_size, proto_dim=8, seed=seed)
    elif verbalizer == "kpt":
        verb = KnowledgeableVerbalizer(tk, CLASSES, KPT_WORDS)
        with torch.no_grad():
            verb.label_word_weights.normal_()
    else:
        verb = MultiMaskVerbalizer.from_label_words(tk, CLASSES, [WORDS, SECOND_MASK_WORDS])
    return PromptForClassification(backbone, tmpl, verb, max_length=40).eval()       # no dropout anyway


def prompt_state(clf):
    """The prompt's own tensors as a run saves them (``template.*``, ``verbalizer.*``)."""
    state = {f"template.{k}": v for k, v in clf.template.state_dict().items()}
    state.update({f"verbalizer.{k}": v for k, v in clf.verbalizer.state_dict().items()})
    return state


def train(clf, params, batch, lr):
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(STEPS):
        loss, _ = clf.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("family, template, verbalizer", cells(), ids=["-".join(c) for c in cells()])
def test_cell(families, family, template, verbalizer, tmp_path):
    tk, frozen = families[family]
    delta = template == "manual" and verbalizer in ("manual", "multi-mask")      # no prompt parameters
    backbone = copy.deepcopy(frozen) if delta else frozen
    clf = build(family, template, verbalizer, tk, backbone)
    handle = attach(backbone, "lora", targets=["q_proj", "v_proj"], r=4, alpha=16) if delta else None
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    own = {n for n in trainable if n.startswith(("template.", "verbalizer."))}
    assert trainable and (trainable == own) != delta, trainable
    before = {n: p.detach().clone() for n, p in clf.named_parameters()}
    batch = clf.collate(TRAIN)
    with torch.no_grad():
        start = clf.loss(batch)[0].item()
    train(clf, [p for p in clf.parameters() if p.requires_grad], batch, LR["lora" if delta else "prompt"])
    with torch.no_grad():
        end, logits = clf.loss(batch)
    # a manual template with KPT learns only per-word weights, which just move each class's score among its
    # fixed words' log-probs: a smaller fall there (measured 0.91-0.92 of the start on BERT/RoBERTa, <= 0.73
    # in every other cell)
    assert end.item() < (0.95 if (template, verbalizer) == ("manual", "kpt") else 0.8) * start, (start, end.item())
    changed = {n for n, p in clf.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable, changed - trainable

    # save / load into a freshly initialised model
    if delta:
        handle.save(tmp_path / "delta")
        fresh_backbone = copy.deepcopy(frozen)
        load_delta(fresh_backbone, tmp_path / "delta")
        fresh = build(family, template, verbalizer, tk, fresh_backbone, seed=1)
        assert not prompt_state(clf)
    else:
        atomic_save_safetensors(tmp_path / "prompt.safetensors", prompt_state(clf))
        fresh = build(family, template, verbalizer, tk, frozen, seed=1)
        if prompt_state(fresh):
            assert any(not torch.equal(v, prompt_state(clf)[k]) for k, v in prompt_state(fresh).items())
        _load_prompt(fresh, tmp_path / "prompt.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), logits, rtol=0, atol=1e-6)


def _load_prompt(clf, path):
    from safetensors.torch import load_file

    state = load_file(str(path))
    if any(k.startswith("template.") for k in state):
        clf.template.load(path)                   # MixedTemplate.load reads a run's template.* keys
    verb = {k[len("verbalizer."):]: v for k, v in state.items() if k.startswith("verbalizer.")}
    clf.verbalizer.load_state_dict(verb, strict=True)
