"""Multi-task prompts: one LoRA delta and one soft prompt trained over two tasks with structured templates
(Task / Format / Labels fields), per-task evaluation, then transfer to a new task.

    python examples/multitask.py                            # all-MiniLM-L6-v2 (the embedded backbone)
    python examples/multitask.py --backbone DIR --steps 3   # any local checkpoint folder

Tasks: the built-in demo task (review sentiment) and a synthetic topic task (food or tech words); the new task
is a synthetic colour-or-size task. MiniLM has no MLM head: label words are scored through the input
embeddings of the mean hidden state (readout "mean").
"""

from __future__ import annotations

import argparse
import random

import torch

import promptdelta as pd
from promptdelta.data import InputExample
from promptdelta.prompts.multitask import MultiTaskPrompt, TaskSpec


def topic_task(a: list[str], b: list[str], n: int, seed: int) -> list[InputExample]:
    """Class 0 when the sentence names a word of ``a``, class 1 for ``b``."""
    rng = random.Random(seed)
    return [InputExample(f"my friend keeps talking about the {rng.choice((a, b)[i % 2])}", label=i % 2)
            for i in range(n)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--temperature", type=float, default=2.0, help="task mixing: P(t) ~ n_t^(1/T)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = pd.load_backbone(args.backbone)
    demo_train, demo_dev, _ = pd.data.load("builtin:demo", shots=16, seed=13)
    food, tech = ["pizza", "bread", "soup", "cake"], ["laptop", "phone", "screen", "battery"]
    tasks = [TaskSpec("sentiment", list(demo_train), demo_train.classes, [["bad"], ["good"]], dev=list(demo_dev),
                      fields={"format": "review"}),
             TaskSpec("topic", topic_task(food, tech, 32, 0), ["food", "tech"], [["food"], ["computer"]],
                      dev=topic_task(food, tech, 16, 1), fields={"format": "sentence"})]
    delta = pd.attach(model, "lora", r=4, alpha=8, name="multitask")
    mt = MultiTaskPrompt(model, tok, tasks, num_soft_tokens=4, max_length=64,
                         readout="mask" if model.has_lm_head else "mean")
    print("structured template of 'topic':", mt.models["topic"].template.text)
    before = mt.evaluate("dev")
    hist = mt.train_steps(args.steps, lr=3e-3, batch_size=8, temperature=args.temperature, seed=13)
    after = mt.evaluate("dev")
    drawn = {t: sum(1 for s, _ in hist if s == t) for t in mt.models}
    print(f"steps per task {drawn}; dev accuracy before {before} -> after {after}")

    colour, size = ["red", "blue", "green"], ["big", "small", "tiny"]
    new = TaskSpec("attribute", topic_task(colour, size, 16, 2), ["colour", "size"], [["color"], ["size"]],
                   dev=topic_task(colour, size, 16, 3), fields={"format": "sentence"})
    mt.add_task(new)
    zero = mt.evaluate("dev", tasks=["attribute"])["attribute"]
    mt.train_steps(max(1, args.steps // 3), lr=3e-3, tasks=["attribute"], seed=14)
    tuned = mt.evaluate("dev", tasks=["attribute"])["attribute"]
    print(f"transfer to 'attribute': dev accuracy {zero:.3f} with the shared prompt and delta as they were, "
          f"{tuned:.3f} after {max(1, args.steps // 3)} steps on it")
    delta.detach()
    return {"before": before, "after": after, "transfer": {"start": zero, "tuned": tuned}}


if __name__ == "__main__":
    main()
