"""Helpers for the prompt tests: tiny tokenizers trained offline for the BPE families (GPT-2, T5, RoBERTa) and
tiny random models of every family (BERT, RoBERTa, GPT-2, T5), seeded so that each builder gives the same
weights every time."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from promptdelta.backbones import load_backbone

CORPUS = ["the movie was great and good fun.", "a terrible and awful film.", "It was wonderful!",
          "It was horrible?", "I loved the plot, it was good", "I hated the acting, it was bad",
          "Answer: yes", "Answer: no"]
FAMILIES = ("bert", "roberta", "gpt2", "t5")
NO_DROPOUT = {"bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
              "roberta": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
              "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
              "t5": {"dropout_rate": 0.0}}


def unpadded(batch: dict[str, torch.Tensor], i: int) -> list[int]:
    """Row i's input ids without its padding."""
    return batch["input_ids"][i, : int(batch["attention_mask"][i].sum())].tolist()


def _bpe(corpus: list[str], pre: Any, dec: Any, specials: list[str], size: int) -> Tokenizer:
    tk = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in specials else None))
    tk.pre_tokenizer, tk.decoder = pre, dec
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre, pre_tokenizers.ByteLevel) else []
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=size, special_tokens=specials,
                                                       initial_alphabet=alphabet, show_progress=False))
    return tk


def gpt2_tokenizer(corpus: list[str] = CORPUS) -> transformers.PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE: no mask, no pad, <|endoftext|> = BOS = EOS."""
    tk = _bpe(corpus, pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), ["<|endoftext|>"],
              300)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>", unk_token="<|endoftext|>")


def t5_tokenizer(corpus: list[str] = CORPUS) -> transformers.PreTrainedTokenizerFast:
    """T5 style: <pad>=0, </s>=1, <unk>=2, sentinels <extra_id_i>, '$A </s>' post-processing."""
    sentinels = [f"<extra_id_{i}>" for i in range(3)]
    tk = _bpe(corpus, pre_tokenizers.Metaspace(), decoders.Metaspace(), ["<pad>", "</s>", "<unk>", *sentinels], 200)
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>", additional_special_tokens=sentinels)


def roberta_tokenizer(corpus: list[str] = CORPUS) -> transformers.PreTrainedTokenizerFast:
    """RoBERTa style: <s> ... </s>, <mask> eats the space before it (so it is added by transformers, with
    lstrip, not trained as a plain special token)."""
    tk = _bpe(corpus, pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
              ["<s>", "<pad>", "</s>", "<unk>"], 300)
    tk.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        pad_token="<pad>", unk_token="<unk>", mask_token=AddedToken("<mask>", lstrip=True, special=True))


def hf_model(family: str, vocab: int, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random transformers model of the family with a head (hidden 32, 2 layers, 4 heads)."""
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=37, max_position_embeddings=128, **overrides)
        cls = transformers.BertForMaskedLM
    elif family == "roberta":
        cfg = transformers.RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=37, max_position_embeddings=80,
                                         pad_token_id=1, **overrides)
        cls = transformers.RobertaForMaskedLM
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0, **overrides)
        cls = transformers.GPT2LMHeadModel
    else:
        cfg = transformers.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **overrides)
        cls = transformers.T5ForConditionalGeneration
    torch.manual_seed(seed)
    return cls(cfg).eval()


def tiny_backbone(family: str, vocab: int, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The native promptdelta backbone of ``hf_model(family, vocab, seed)``, dropout off."""
    return load_backbone(hf_model(family, vocab, seed, **{**NO_DROPOUT[family], **overrides}))[0]
