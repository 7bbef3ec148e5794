"""Few-shot prompt-based classification with the Python API, end to end.

    python examples/fewshot_classification.py --data ../shared/data/sst2 --shots 16 --seed 13
    python examples/fewshot_classification.py            # built-in demo task on MiniLM

Loads a backbone, attaches LoRA, builds a manual template and a soft verbalizer, trains with dev
selection, evaluates on the test split, saves the delta and detaches it again.
"""

from __future__ import annotations

import argparse
import tempfile

import promptdelta as pd


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--data", default="builtin:demo")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--out", default=None, help="folder for the delta checkpoint (default: a temp folder)")
    args = ap.parse_args(argv)

    model, tok = pd.load_backbone(args.backbone)
    train, dev, test = pd.data.load(args.data, shots=args.shots, seed=args.seed)
    delta = pd.attach(model, "lora", targets=["q_proj", "v_proj"], r=8, alpha=16)
    print(delta.summary())

    template = pd.ManualTemplate('{"placeholder":"text_a","shortenable":true} It was {"mask"}.', tokenizer=tok)
    words = [[c.lower()] for c in train.classes]
    verbalizer = pd.SoftVerbalizer(tok, classes=train.classes, label_words=words, backbone=model)
    clf = pd.PromptForClassification(model, template, verbalizer)

    trainer = pd.Trainer(clf, lr=1e-3, epochs=args.epochs, batch_size=8, seed=args.seed)
    result = trainer.fit(train, dev).evaluate(test)
    print(f"test accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}")

    out = args.out or tempfile.mkdtemp(prefix="promptdelta-")
    delta.save(f"{out}/delta")
    delta.detach()                       # the backbone is exactly the original again
    print(f"saved the delta to {out}/delta")
    return result


if __name__ == "__main__":
    main()
