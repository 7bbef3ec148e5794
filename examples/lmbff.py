"""LM-BFF's automatic prompts on the built-in demo task: search label words on the backbone, generate
templates with an encoder-decoder, re-rank them on dev, and write both as OpenPrompt files.

    python examples/lmbff.py                     # all-MiniLM-L6-v2 for the label words and the re-ranking
    python examples/lmbff.py --backbone DIR      # any local checkpoint folder

No pretrained T5 weights are available here, so the templates come from a TINY RANDOM T5 (with a BPE tokenizer
trained on the demo texts on the fly): the pipeline runs end to end, but its spans are noise. Pass a real
T5 with --t5 DIR (a local t5-base folder, as in the paper) for meaningful templates.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

import promptdelta as pd
from promptdelta.prompts.lmbff import generate_templates, rank_templates, save_templates, search_label_words

TEMPLATE = '{"placeholder":"text_a","shortenable":true} It was {"mask"}.'


def tiny_t5(texts: list[str]) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerFast]:
    """A random 2-layer T5 (d_model 32) and a T5-style BPE tokenizer (pad 0, eos 1, sentinels) fit on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    sentinels = [f"<extra_id_{i}>" for i in range(3)]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>",
                                                                                      *sentinels], show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                               unk_token="<unk>", additional_special_tokens=sentinels)
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return pd.load_backbone(transformers.T5ForConditionalGeneration(cfg).eval())[0], tok


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--t5", default=None, help="a local T5 checkpoint folder (default: a tiny random T5)")
    ap.add_argument("--k", type=int, default=10, help="candidate label words per class")
    ap.add_argument("--beam", type=int, default=6)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--out", default=None, help="folder for the files (default: a new temp folder)")
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="promptdelta-"))
    model, tok = pd.load_backbone(args.backbone)
    train, dev, _ = pd.data.load("builtin:demo", shots=args.shots, seed=13)

    readout = "mask" if model.has_lm_head else "mean"                   # MiniLM: no MLM head, mean pooling
    words = search_label_words(model, tok, pd.ManualTemplate(TEMPLATE, tokenizer=tok), train, dev, train.classes,
                               k=args.k, n_best=3, readout=readout)
    words_path = words.save(out / "label_words.json")
    print("candidates per class:", dict(zip(train.classes, words.candidates)))
    print("best label words:", [f"{c} (dev {a:.3f})" for c, a in zip(words.combos, words.dev_accuracy)])

    t5, t5_tok = pd.load_backbone(args.t5) if args.t5 else tiny_t5([e.text for e in train])
    best = words.combos[0]
    generated = generate_templates(t5, t5_tok, train, best, beam_size=args.beam, max_tokens=6)
    verbalizer = pd.ManualVerbalizer(tok, classes=train.classes, label_words=[[w] for w in best])
    ranked = rank_templates([g.template for g in generated], model, tok, verbalizer, list(dev), readout=readout)
    templates_path = save_templates(out / "templates.txt", [t for t, _ in ranked])
    for text, acc in ranked:
        print(f"  dev {acc:.3f}  {text}")
    print(f"wrote {words_path} and {templates_path}")
    return {"label_words": words.combos[0], "dev_accuracy": words.dev_accuracy[0], "templates": ranked,
            "words_path": str(words_path), "templates_path": str(templates_path)}


if __name__ == "__main__":
    main()
