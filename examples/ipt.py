"""Intrinsic prompt tuning (IPT): prefix prompts for three source tasks, a 2-dim subspace fit over them, then
a new task tuned by moving only the 2 numbers z of that subspace.

    python examples/ipt.py                            # all-MiniLM-L6-v2 (the embedded backbone)
    python examples/ipt.py --backbone DIR --steps 3   # any local checkpoint folder

Source tasks: the built-in demo task (review sentiment) and two synthetic word-topic tasks; the new task is a
third synthetic one. MiniLM has no MLM head: the verbalizer scores label words through the input embeddings
of the mean hidden state (readout "mean").
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

import promptdelta as pd
from promptdelta.data import InputExample
from promptdelta.deltas.ipt import fit_subspace, prompt_layout, prompt_vector

TEMPLATE = '{"placeholder":"text_a","shortenable":true} It was {"mask"}.'
NUM_TOKENS = 4


def word_task(a: list[str], b: list[str], n: int, seed: int) -> list[InputExample]:
    """Class 0: a sentence about a word of ``a``; class 1: of ``b``."""
    rng = random.Random(seed)
    return [InputExample(f"the note mentions the {rng.choice((a, b)[i % 2])} twice", label=i % 2) for i in range(n)]


def fit(model, tok, train, dev, words, steps: int, **trainer) -> float:
    verbalizer = pd.ManualVerbalizer(tok, classes=["a", "b"], label_words=words)
    readout = "mask" if model.has_lm_head else "mean"
    clf = pd.PromptForClassification(model, pd.ManualTemplate(TEMPLATE, tokenizer=tok), verbalizer, max_length=64,
                                     readout=readout)
    t = pd.Trainer(clf, lr=trainer.get("lr", 1e-2), max_steps=steps, batch_size=8, progress=False, seed=13)
    return t.fit(train, dev).evaluate(dev)["accuracy"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dim", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder for the subspace and the delta (default: a temp folder)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out or tempfile.mkdtemp(prefix="promptdelta-"))
    model, tok = pd.load_backbone(args.backbone)
    demo_train, demo_dev, _ = pd.data.load("builtin:demo", shots=8, seed=13)
    sources = [(list(demo_train), list(demo_dev), [["bad"], ["good"]]),
               (word_task(["pizza", "soup"], ["phone", "laptop"], 16, 0), word_task(["bread"], ["screen"], 8, 1),
                [["food"], ["computer"]]),
               (word_task(["dog", "cat"], ["car", "train"], 16, 2), word_task(["horse"], ["bus"], 8, 3),
                [["animal"], ["vehicle"]])]
    prompts = []
    for train, dev, words in sources:                                  # one prefix prompt per source task
        h = pd.attach(model, "prefix", num_tokens=NUM_TOKENS, reparam=False, init_std=0.1)
        acc = fit(model, tok, train, dev, words, args.steps)
        prompts.append(prompt_vector(h))
        print(f"source task {words}: dev accuracy {acc:.3f}")
        h.detach()
    subspace, z = fit_subspace(torch.stack(prompts), prompt_layout(model, NUM_TOKENS), dim=args.dim)
    folder = subspace.save(out / "subspace")
    print(f"subspace: d={args.dim} over {len(prompts)} prompts of {subspace.prompt_size} numbers; "
          f"tasks' z = {[[round(v, 3) for v in row] for row in z.tolist()]}")

    new_train, new_dev = word_task(["red", "blue"], ["big", "small"], 16, 4), word_task(["green"], ["tiny"], 8, 5)
    handle = pd.attach(model, "ipt", subspace=str(folder))
    print(handle.summary())
    acc = fit(model, tok, new_train, new_dev, [["color"], ["size"]], args.steps, lr=1e-1)
    path = handle.save(out / "ipt")
    trainable = handle.num_parameters()
    print(f"new task, only z trained ({trainable} numbers): dev accuracy {acc:.3f}; delta in {path}")
    handle.detach()
    return {"trainable": trainable, "accuracy": acc, "path": str(path)}


if __name__ == "__main__":
    main()
