"""Multi-task prompts: structured templates share keys and one soft prompt; the mixing sampler follows
n^(1/T); multi-task training of one delta + the soft prompt lowers both tasks' losses (built-in demo task
and a synthetic second task) and touches nothing else; a new task transfers."""

import random

import pytest
import torch

import promptdelta as pd
from promptdelta.data import InputExample
from promptdelta.deltas.base import base_named_parameters
from promptdelta.errors import ConfigError, TemplateError
from promptdelta.prompts.multitask import (MultiTaskPrompt, TaskSampler, TaskSpec, mixing_weights,
                                           structured_text)


@pytest.fixture(scope="module")
def mlm():
    """A tiny random BERT MLM, dropout off, init std 0.2 (the default 0.02 gives near-uniform label scores that
    a few steps barely move)."""
    import transformers

    from promptdelta.backbones import load_backbone

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=128, initializer_range=0.2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return load_backbone(transformers.BertForMaskedLM(cfg))[0]


def _synthetic(words_a, words_b, n, seed):
    """A two-class task: a sentence about one of words_a (class 0) or words_b (class 1)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        word = rng.choice(words_a if label == 0 else words_b)
        out.append(InputExample(f"this one is about the {word} really", label=label))
    return out


def _tasks():
    train, dev, _ = pd.data.load("builtin:demo", shots=8, seed=13)
    demo = TaskSpec("sentiment", list(train), ["negative", "positive"], [["bad"], ["good"]], dev=list(dev),
                    fields={"format": "review"})
    food, tech = ["pizza", "bread", "soup", "cake"], ["laptop", "phone", "screen", "battery"]
    topic = TaskSpec("topic", _synthetic(food, tech, 24, 0), ["food", "tech"], [["food"], ["computer"]],
                     dev=_synthetic(food, tech, 12, 1), fields={"format": "sentence"})
    return demo, topic


def test_structured_text_shares_keys():
    a = structured_text({"task": "sentiment", "format": "review", "labels": "bad, good"})
    b = structured_text({"task": "topic", "format": "sentence", "labels": "food, computer"})
    assert a.startswith("Task: sentiment. Format: review. Labels: bad, good.") and '{"mask"}' in a
    assert [s.split(":")[0] for s in a.split(". ")[:3]] == [s.split(":")[0] for s in b.split(". ")[:3]]
    with pytest.raises(TemplateError, match="format"):
        structured_text({"task": "x", "labels": "y"})
    with pytest.raises(TemplateError, match="brace"):
        structured_text({"task": "{x}", "format": "f", "labels": "y"})


def test_mixing_sampler_follows_temperature():
    sizes = {"big": 900, "small": 100}
    assert mixing_weights(sizes, 1.0) == pytest.approx({"big": 0.9, "small": 0.1})
    assert mixing_weights(sizes, 2.0) == pytest.approx({"big": 30 / 40, "small": 10 / 40})
    assert mixing_weights(sizes, 1e6)["small"] == pytest.approx(0.5, abs=1e-4)
    s = TaskSampler(sizes, 2.0, seed=0)
    draws = [s.sample() for _ in range(4000)]
    assert draws.count("small") / 4000 == pytest.approx(0.25, abs=0.03)
    with pytest.raises(ConfigError, match="temperature"):
        mixing_weights(sizes, 0)


def test_multitask_training_and_transfer(mlm, tok):
    torch.manual_seed(0)
    model = mlm
    base = {k: v.detach().clone() for k, v in base_named_parameters(model)}
    delta = pd.attach(model, "lora", r=4, alpha=8, impl="plain", name="mt_lora")
    try:
        demo, topic = _tasks()
        mt = MultiTaskPrompt(model, tok, [demo, topic], num_soft_tokens=4, max_length=48)
        t_demo, t_topic = (mt.models[t].template for t in ("sentiment", "topic"))
        assert t_demo.soft_embeds is t_topic.soft_embeds is mt.soft_prompt        # one shared soft prompt
        assert "Task: topic. Format: sentence. Labels: food, computer." in t_topic.text
        before = {t: mt.task_loss(t) for t in mt.models}
        soft0, lora0 = mt.soft_prompt.detach().clone(), [p.detach().clone() for p in delta.parameters()]
        hist = mt.train_steps(20, lr=1e-2, batch_size=8, temperature=1.0, seed=0)
        assert {t for t, _ in hist} == {"sentiment", "topic"}
        after = {t: mt.task_loss(t) for t in mt.models}
        assert all(after[t] < before[t] for t in before), (before, after)
        assert not torch.equal(mt.soft_prompt, soft0)
        assert any(not torch.equal(p, q) for p, q in zip(delta.parameters(), lora0))
        assert all(torch.equal(v, base[k]) for k, v in base_named_parameters(model))   # backbone untouched
        acc = mt.evaluate("dev")
        assert set(acc) == {"sentiment", "topic"} and all(0.0 <= a <= 1.0 for a in acc.values())

        new = TaskSpec("colour", _synthetic(["red", "blue"], ["big", "small"], 16, 2), ["colour", "size"],
                       [["color"], ["size"]], dev=_synthetic(["red", "blue"], ["big", "small"], 8, 3),
                       fields={"format": "sentence"})
        clf = mt.add_task(new)
        assert clf.template.soft_embeds is mt.soft_prompt                          # transfer: same prompt
        start = mt.task_loss("colour")
        mt.train_steps(10, lr=1e-2, tasks=["colour"], seed=1)
        assert mt.task_loss("colour") < start
        with pytest.raises(ConfigError, match="already added"):
            mt.add_task(new)
    finally:
        delta.detach()
