"""AutoPrompt on the built-in demo task: search trigger tokens, write them as a manual template file, and
compare the zero-shot dev accuracy of the initial and the found template.

    python examples/autoprompt.py                          # all-MiniLM-L6-v2 (the embedded backbone)
    python examples/autoprompt.py --backbone DIR --iters 2 # any local checkpoint folder

MiniLM has no MLM head: the label words are scored through its input embeddings (hidden @ E^T) and the
verbalizer reads the mean of the hidden states (readout "mean"); a backbone with an MLM head reads the mask.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import promptdelta as pd
from promptdelta.prompts.autoprompt import AutoPrompt
from promptdelta.prompts.lmbff import accuracy

TEMPLATE = '{"placeholder":"text_a","shortenable":true} [T] [T] [T] {"mask"}.'


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--iters", type=int, default=9)
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--out", default=None, help="folder for autoprompt.txt (default: a new temp folder)")
    args = ap.parse_args(argv)
    model, tok = pd.load_backbone(args.backbone)
    train, dev, _ = pd.data.load("builtin:demo", shots=args.shots, seed=13)
    verbalizer = pd.ManualVerbalizer(tok, classes=train.classes, label_words=[["bad"], ["good"]])
    readout = "mask" if model.has_lm_head else "mean"
    search = AutoPrompt(model, tok, verbalizer, TEMPLATE, num_candidates=args.candidates, max_length=64,
                        readout=readout)
    result = search.search(train, iters=args.iters, batch_size=16, seed=13)
    path = result.save(Path(args.out or tempfile.mkdtemp(prefix="promptdelta-")) / "autoprompt.txt")
    accs = {}
    for name, text in (("initial", search.render(["the"] * search.n_triggers)), ("found", result.template)):
        clf = pd.PromptForClassification(model, pd.ManualTemplate(text, tokenizer=tok), verbalizer, max_length=64,
                                         readout=readout)
        accs[name] = accuracy(clf, list(dev))
    print(f"triggers {result.trigger_tokens}: train loss {result.initial_loss:.4f} -> {result.final_loss:.4f}")
    print(f"zero-shot dev accuracy: initial {accs['initial']:.3f}, found {accs['found']:.3f}")
    print(f"template written to {path}: {result.template}")
    return {"path": str(path), "initial_loss": result.initial_loss, "final_loss": result.final_loss, **accs}


if __name__ == "__main__":
    main()
