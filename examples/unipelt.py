"""UniPELT on the built-in demo task: gated LoRA + gated adapter + gated prefix as one delta; train, report the
gates, save, load back.

    python examples/unipelt.py                            # all-MiniLM-L6-v2 (the embedded backbone)
    python examples/unipelt.py --backbone DIR --steps 3   # any local checkpoint folder

MiniLM has no MLM head: the verbalizer scores label words through the input embeddings of the mean hidden
state (readout "mean").
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import promptdelta as pd

TEMPLATE = '{"placeholder":"text_a","shortenable":true} It was {"mask"}.'


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=None, help="folder for the delta (default: a new temp folder)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = pd.load_backbone(args.backbone)
    train, dev, test = pd.data.load("builtin:demo", shots=16, seed=13)
    verbalizer = pd.ManualVerbalizer(tok, classes=train.classes, label_words=[["bad"], ["good"]])
    clf = pd.PromptForClassification(model, pd.ManualTemplate(TEMPLATE, tokenizer=tok), verbalizer, max_length=64,
                                     readout="mask" if model.has_lm_head else "mean")
    delta = pd.attach(model, "unipelt", r=4, bottleneck=16, num_tokens=4, init_std=0.1)
    print(delta.summary().splitlines()[-1])
    trainer = pd.Trainer(clf, lr=3e-3, max_steps=args.steps, batch_size=8, progress=False, seed=13)
    acc = trainer.fit(train, dev).evaluate(test)["accuracy"]
    state = delta.state_dict()
    prefix_gates = torch.sigmoid(state["prefix.layers.gate"]).tolist()
    print(f"test accuracy {acc:.3f}; prefix gates per layer {[round(g, 3) for g in prefix_gates]}")
    path = delta.save(Path(args.out or tempfile.mkdtemp(prefix="promptdelta-")) / "unipelt")
    delta.detach()
    again = pd.load_delta(model, path)
    same = all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    print(f"saved to {path}; loaded back identical: {same}")
    again.detach()
    return {"accuracy": acc, "path": str(path), "reloaded": same, "trainable": sum(v.numel() for v in state.values())}


if __name__ == "__main__":
    main()
