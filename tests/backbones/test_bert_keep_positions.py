"""keep_positions (row pruning of the last layer) on native BERT/RoBERTa: equal to the full forward's rows."""

import pytest
import torch

from promptdelta.backbones import BertConfig, BertModel, RobertaConfig, RobertaModel
from promptdelta.deltas import attach
from promptdelta.errors import BackboneError

SIZE = dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
            max_position_embeddings=64)


def tiny(family, head=True):
    torch.manual_seed(0)
    if family == "bert":
        return BertModel(BertConfig(**SIZE, has_lm_head=head)).eval()
    return RobertaModel(RobertaConfig(**SIZE, has_lm_head=head)).eval()


def padded_batch(pad, B=3, T=11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 99, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids.masked_fill(mask == 0, pad), mask


def rows_of(t, rows):
    return t.gather(1, rows[:, :, None].expand(-1, -1, t.shape[-1]))


KEEP = torch.tensor([[0, 5, 10], [6, 6, 1], [3, 0, 9]])  # repeats, out of order, a padded position (2, 9)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("lora", [False, True])
def test_pruned_rows_equal_full_forward(family, lora):
    model = tiny(family)
    if lora:
        handle = attach(model, "lora", r=4, targets=["q_proj", "v_proj", "o_proj", "fc1"])
        with torch.no_grad():  # a non-zero update, so the LoRA path matters
            for name, p in model.named_parameters():
                if "lora" in name:
                    p.normal_(0, 0.3)
        assert handle is not None
    ids, mask = padded_batch(model.config.pad_token_id)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, output_hidden_states=True)
        part = model(ids, attention_mask=mask, output_hidden_states=True, keep_positions=KEEP)
    assert part.last_hidden_state.shape == (3, 3, 32) and part.logits.shape == (3, 3, 99)
    torch.testing.assert_close(part.last_hidden_state, rows_of(full.last_hidden_state, KEEP), atol=1e-5, rtol=0)
    torch.testing.assert_close(part.logits, rows_of(full.logits, KEEP), atol=1e-5, rtol=0)
    torch.testing.assert_close(part.hidden_states[-1], rows_of(full.hidden_states[-1], KEEP), atol=1e-5, rtol=0)
    for a, b in zip(part.hidden_states[:-1], full.hidden_states[:-1]):  # the layers below run in full
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert part.pooler_output is None and full.pooler_output is not None


def test_pruned_rows_with_prefix_and_gradients():
    model = tiny("bert", head=False)
    ids, mask = padded_batch(0)
    torch.manual_seed(2)
    prefix = [(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)) for _ in range(2)]
    emb = model.input_embeddings()(ids).detach().requires_grad_(True)
    full = model(inputs_embeds=emb, attention_mask=mask, prefix_kv=prefix).last_hidden_state
    g_full, = torch.autograd.grad(rows_of(full, KEEP).sum(), emb)
    part = model(inputs_embeds=emb, attention_mask=mask, prefix_kv=prefix, keep_positions=KEEP).last_hidden_state
    g_part, = torch.autograd.grad(part.sum(), emb)
    torch.testing.assert_close(part, rows_of(full, KEEP), atol=1e-5, rtol=0)
    torch.testing.assert_close(g_part, g_full, atol=1e-5, rtol=0)


def test_pruned_rows_under_gradient_checkpointing():
    model = tiny("bert").train()
    model.gradient_checkpointing_enable()
    for m in model.modules():  # no dropout: compare values
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for layer in model.layers:
        layer.attn.dropout_p = 0.0
    ids, mask = padded_batch(0)
    part = model(ids, attention_mask=mask, keep_positions=KEEP).last_hidden_state
    part.sum().backward()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(part, rows_of(full, KEEP), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([0, 1, 2]), "shape"),                  # 1-D
    (torch.zeros(2, 1, dtype=torch.long), "batch=3"),    # wrong batch
    (torch.zeros(3, 0, dtype=torch.long), "k >= 1"),     # no rows
    (torch.zeros(3, 1), "LongTensor"),                   # float
    (torch.full((3, 1), 11), r"\[0, 11\)"),              # out of range
    (torch.full((3, 1), -1), r"\[0, 11\)"),
])
def test_bad_keep_positions(bad, match):
    model = tiny("roberta")
    ids, mask = padded_batch(1)
    with pytest.raises(BackboneError, match=match):
        model(ids, attention_mask=mask, keep_positions=bad)
