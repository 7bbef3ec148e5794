"""Native BERT's fast attention paths against the plain ones: the fused q/k/v projection (one GEMM over the
concatenated weight, LoRA terms as one block low-rank update) equals three separate projections in values and
in the gradients of every trainable parameter; hooks, active LoRA dropout or a non-fused LoRA turn it off; a
weight written after a forward is seen by the next one. Packed attention per run of equal-length rows
(varlen) equals attention in the padded layout and transformers."""

import pytest
import torch
import transformers

from promptdelta.backbones import bert as bert_mod
from promptdelta.backbones import load_backbone
from promptdelta.deltas import attach

ATOL = 1e-5
FUSED_ATOL = 1e-4   # one (3H, H) GEMM and a rank-R kernel sum in another order than three (H, H) ones


def pair():
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=66, initializer_range=0.3)
    torch.manual_seed(0)
    hf = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    return hf, load_backbone(hf)[0].eval()


def batch(padded: bool):
    """(ids, mask) of 5 rows x 10: lengths 10, 10, 7, 7, 2 (runs of equal length) when padded."""
    ids = torch.randint(2, 99, (5, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(5, 10, dtype=torch.long)
    if padded:
        mask[2:4, 7:], mask[4, 2:] = 0, 0
    return ids.masked_fill(mask == 0, 0), mask


def with_lora(model, **kw):
    torch.manual_seed(3)
    attach(model, "lora", r=4, **kw)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)   # B is zero at init: make every LoRA term count
    return model


def step(model, ids, mask):
    """Output and the gradient of every trainable parameter (by name) for a fixed output gradient."""
    model.zero_grad(set_to_none=True)
    y = model(input_ids=ids, attention_mask=mask).last_hidden_state
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)) * mask[..., None]
    y.backward(g)
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def spy_fused(monkeypatch):
    """Record whether fused_qkv fused (True) or declined (False) on each call."""
    calls, real = [], bert_mod.fused_qkv

    def spy(attn, x):
        out = real(attn, x)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(bert_mod, "fused_qkv", spy)
    return calls


def unfused(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(bert_mod, "fused_qkv", lambda attn, x: None)
        return fn()


def assert_same(a, b):
    (ya, ga), (yb, gb) = a, b
    assert (ya - yb).abs().max() <= FUSED_ATOL
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=FUSED_ATOL * max(gb[n].abs().max().item(), 1.0), rtol=0, msg=n)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj"], ["k_proj"], "all-linear"])
def test_fused_qkv_equals_separate_projections(monkeypatch, padded, targets):
    _, ours = pair()
    if targets is not None:      # None: no delta, every weight trainable (the concatenation is differentiable)
        with_lora(ours, targets=targets)
    ids, mask = batch(padded)
    calls = spy_fused(monkeypatch)
    fused = step(ours, ids, mask)
    assert calls and all(calls)                            # the fused projection ran in every layer
    assert_same(fused, unfused(monkeypatch, lambda: step(ours, ids, mask)))


def test_lora_with_different_scales_on_q_and_v(monkeypatch):
    _, ours = pair()
    with_lora(ours, targets=["q_proj"], alpha=4)
    torch.manual_seed(4)
    attach(ours, "lora", name="second", r=2, alpha=16, targets=["v_proj"])
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    ids, mask = batch(True)
    calls = spy_fused(monkeypatch)
    fused = step(ours, ids, mask)
    assert all(calls)
    assert_same(fused, unfused(monkeypatch, lambda: step(ours, ids, mask)))


def test_hook_dropout_or_plain_lora_turn_the_fusion_off(monkeypatch):
    _, ours = pair()
    with_lora(ours)
    ids, mask = batch(True)
    calls = spy_fused(monkeypatch)
    seen = []
    hook = ours.layers[0].attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        hooked = ours(ids, attention_mask=mask).last_hidden_state
    hook.remove()
    assert seen == [(5, 10, 32)] and calls == [False, True]   # the hook ran (layer 0 not fused), layer 1 fused
    with torch.no_grad():
        plain = ours(ids, attention_mask=mask).last_hidden_state
    assert (hooked - plain).abs().max() <= FUSED_ATOL

    _, dropping = pair()
    with_lora(dropping, dropout=0.1)
    assert bert_mod.fused_qkv(dropping.layers[0].attn, torch.zeros(2, 32)) is not None   # eval: no dropout
    dropping.train()
    assert bert_mod.fused_qkv(dropping.layers[0].attn, torch.zeros(2, 32)) is None
    _, plain_impl = pair()
    with_lora(plain_impl, impl="plain")
    assert bert_mod.fused_qkv(plain_impl.layers[0].attn, torch.zeros(2, 32)) is None


def test_weights_written_after_a_forward_are_used(monkeypatch):
    _, ours = pair()
    with_lora(ours)
    ids, mask = batch(True)
    with torch.no_grad():
        before = ours(ids, attention_mask=mask).last_hidden_state
        ours.layers[0].attn.k_proj.weight.data.copy_(torch.randn(32, 32))   # bypasses the version counter
        ours.layers[1].attn.q_proj.base.bias.add_(1.0)
        after = ours(ids, attention_mask=mask).last_hidden_state
    reference = unfused(monkeypatch, lambda: ours(ids, attention_mask=mask).last_hidden_state.detach())
    assert (after - before).abs().max() > 1e-2
    assert (after - reference).abs().max() <= FUSED_ATOL


@pytest.mark.parametrize("runs", [bert_mod.VARLEN_MAX_RUNS, 1])
def test_packed_attention_per_run_and_padded_match_transformers(monkeypatch, runs):
    hf, ours = pair()
    for m in (hf, ours):
        with_lora(m)
    monkeypatch.setattr(bert_mod, "VARLEN_MAX_RUNS", runs)   # 1: the batch's 3 runs take the padded layout
    ids, mask = batch(True)
    assert (bert_mod.Packing.of(mask).runs is None) == (runs == 1)
    assert bert_mod.Packing.of(mask).runs in (None, [(0, 2, 10), (2, 2, 7), (4, 1, 2)])
    keep = mask.bool()
    (y, g), (y_hf, g_hf) = step(ours, ids, mask), step(hf, ids, mask)
    assert (y - y_hf)[keep].abs().max() <= ATOL and y[~keep].abs().max() == 0
    assert len(g) == len(g_hf) > 0
    for a, b in zip(g.values(), g_hf.values()):      # same module order on both sides
        torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=0)


def test_packing_runs_skip_empty_rows():
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 1]])
    p = bert_mod.Packing.of(mask)
    assert p.runs == [(0, 2, 2), (3, 1, 2)] and p.sizes == [4, 2] and p.index.numel() == 6
    assert bert_mod.Packing.of(torch.zeros(2, 3)) is None
