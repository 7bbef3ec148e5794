"""S3Delta on the built-in demo task: search which (module, method) deltas to tune under a parameter budget,
write the plan, then attach it as plain deltas, train and save them as usual.

    python examples/s3delta.py                             # all-MiniLM-L6-v2 (the embedded backbone)
    python examples/s3delta.py --backbone DIR --steps 3    # any local checkpoint folder

Candidates: LoRA (r 4), a sequential adapter (bottleneck 8) and BitFit at every attention and FFN linear
layer. MiniLM has no MLM head: the verbalizer scores label words through the input embeddings of the mean
hidden state (readout "mean"), so the search trains nothing but the candidates and their gates.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

import promptdelta as pd
from promptdelta.deltas.s3delta import apply_plan, candidates, emit_plan, search

TEMPLATE = '{"placeholder":"text_a","shortenable":true} It was {"mask"}.'


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--steps", type=int, default=40, help="search steps (the final training takes as many)")
    ap.add_argument("--budget", type=float, default=0.001, help="trainable parameters, as a share of the model")
    ap.add_argument("--out", default=None, help="folder for plan.json and the deltas (default: a temp folder)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out or tempfile.mkdtemp(prefix="promptdelta-"))
    model, tok = pd.load_backbone(args.backbone)
    train, dev, _ = pd.data.load("builtin:demo", shots=16, seed=13)
    verbalizer = pd.ManualVerbalizer(tok, classes=train.classes, label_words=[["bad"], ["good"]])
    clf = pd.PromptForClassification(model, pd.ManualTemplate(TEMPLATE, tokenizer=tok), verbalizer, max_length=64,
                                     readout="mask" if model.has_lm_head else "mean")
    budget = max(1, int(args.budget * sum(p.numel() for p in model.parameters())))

    supernet = pd.attach(model, "s3delta", r=4, bottleneck=8)
    rng = random.Random(13)
    batches = [clf.collate(rng.sample(list(train), 8)) for _ in range(args.steps)]
    hist = search(supernet, lambda b: clf.loss(b)[0], batches, budget=budget, lr=1e-3, gate_lr=5e-2)
    top = candidates(supernet)[:5]
    print(f"search loss {hist[0]:.4f} -> {hist[-1]:.4f}; top gates: "
          + ", ".join(f"{c.site}:{c.method}={c.gate:.3f}" for c in top))
    plan = emit_plan(supernet, budget)
    supernet.detach()
    plan_path = plan.save(out / "plan.json")
    print(f"plan ({plan.cost:,} of {budget:,} parameters) written to {plan_path}:")
    for call in plan.calls:
        print(f"  attach(model, {call['method']!r}, targets={len(call['targets'])} modules)")

    handles = apply_plan(model, plan)
    trainer = pd.Trainer(clf, lr=1e-3, max_steps=args.steps, batch_size=8, progress=False, seed=13)
    acc = trainer.fit(train, dev).evaluate(dev)["accuracy"]
    for h in handles:
        h.save(out / h.name)
        h.detach()
    print(f"dev accuracy with the searched deltas: {acc:.3f}; deltas saved under {out}")
    return {"cost": plan.cost, "budget": budget, "accuracy": acc, "plan": str(plan_path)}


if __name__ == "__main__":
    main()
