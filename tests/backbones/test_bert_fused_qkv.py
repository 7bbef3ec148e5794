"""Native BERT's fast attention paths against the plain ones: the fused q/k/v projection (one GEMM over the
concatenated weight, LoRA terms as one block low-rank update) equals three separate projections in values and
in the gradients of every trainable parameter; hooks or a non-fused LoRA turn it off (active LoRA dropout no longer does); a
weight written after a forward is seen by the next one. Packed attention per group of rows
(each padded to its longest row only) equals attention in the (B, T) layout and transformers."""

import pytest
import torch
import transformers

from promptdelta.backbones import bert as bert_mod
from promptdelta.backbones import bert_fast
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


def batch(padded: bool, layout: str = "right"):
    """(ids, mask) of 5 rows x 10: lengths 10, 10, 3, 9, 8 when padded (attention groups (0-1), (2), (3-4)
    with padding inside); "left" flips the padding, "holes" masks positions inside rows 2 and 3 instead."""
    ids = torch.randint(2, 99, (5, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(5, 10, dtype=torch.long)
    if padded:
        mask[2, 3:], mask[3, 9:], mask[4, 8:] = 0, 0, 0
        if layout == "left":
            mask = mask.flip(1)
        elif layout == "holes":
            mask[3] = mask[3].roll(1)   # real tokens at 1..9
            mask[2, :] = 0
            mask[2, [0, 5]] = 1         # two real tokens, four padding positions between them
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
    dropping.train()   # LoRA dropout on: still fused (each LoRA's own mask, test_bert_train.py)
    assert bert_mod.fused_qkv(dropping.layers[0].attn, torch.zeros(2, 32)) is not None
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


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
@pytest.mark.parametrize("groups", [8, 1])
def test_packed_attention_per_group_and_padded_match_transformers(monkeypatch, groups, layout):
    hf, ours = pair()
    for m in (hf, ours):
        with_lora(m)
    monkeypatch.setattr(bert_fast, "MAX_GROUPS", groups)   # 1: the batch's 3 groups take the (B, T) layout
    ids, mask = batch(True, layout)
    packed = bert_fast.Packing.of(mask)
    if groups == 1:
        assert packed.groups is None
    else:
        assert [(g.first, g.rows, g.length, g.dest is None) for g in packed.groups] == \
            [(0, 2, 10, True), (2, 1, 2 if layout == "holes" else 3, True), (3, 2, 9, False)]
    keep = mask.bool()
    (y, g), (y_hf, g_hf) = step(ours, ids, mask), step(hf, ids, mask)
    # FUSED_ATOL: with LoRA on both sides, the fused (3H, H) layer's GEMM and the three (H, H) ones sum in
    # different orders (the native GEMM of csrc/lora_gemm.h blocks by N as well)
    assert (y - y_hf)[keep].abs().max() <= FUSED_ATOL and y[~keep].abs().max() == 0
    assert len(g) == len(g_hf) > 0
    for a, b in zip(g.values(), g_hf.values()):      # same module order on both sides
        torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=0)


def test_attention_groups_skip_empty_rows_and_bound_padding(monkeypatch):
    monkeypatch.setattr(bert_fast, "MAX_GROUPS", 8)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 1], [1, 1, 1]])
    p = bert_fast.Packing.of(mask)
    assert [(g.first, g.rows, g.length, g.tokens) for g in p.groups] == [(0, 2, 2, 4), (3, 1, 2, 2), (4, 1, 3, 3)]
    assert p.sizes == [4, 2, 3] and p.index.numel() == 9
    assert bert_fast.Packing.of(torch.zeros(2, 3)) is None
    lengths = torch.tensor([128 - 4 * i for i in range(16)])          # the bench batch: 16 distinct lengths
    mask = (torch.arange(128)[None] < lengths[:, None]).long()
    groups = bert_fast.Packing.of(mask).groups
    work = sum(g.rows * g.length ** 2 for g in groups)
    assert len(groups) <= bert_fast.MAX_GROUPS and work <= bert_fast.GROUP_SLACK * int((lengths ** 2).sum())
    for g in groups:                                                  # dest puts each token at its position
        if g.dest is not None:
            grid = torch.zeros(g.rows * g.length, dtype=torch.bool)
            grid[g.dest] = True
            assert torch.equal(grid.view(g.rows, g.length), g.keep)
            part = torch.randn(g.tokens, 3)
            out = g.grid(part)                                        # (rows, length, 3), zeros at padding
            assert torch.equal(out[g.keep], part) and out[~g.keep].abs().max() == 0


def test_segments_keep_native_kernel_ranks():
    """LoRA ranks of (q, k, v) -> fused products: one when the rank sum suits the native kernel, else a split."""
    assert bert_fast._segments([8, 0, 8]) == [(0, 3)] and bert_fast._segments([0, 0, 0]) == [(0, 3)]
    assert bert_fast._segments([8, 8, 8]) == [(0, 2), (2, 3)]      # 24 -> 16 | 8 (all-linear r=8)
    assert bert_fast._segments([4, 8, 8]) == [(0, 1), (1, 3)]      # 20 -> 4 | 16
    assert bert_fast._segments([3, 3, 3]) == [(0, 3)]              # nothing fits: one product (torch ops)


def test_attention_groups_env(monkeypatch):
    """PROMPTDELTA_ATTENTION_GROUPS bounds the groups (0: the (B, T) layout); a bad value is one ConfigError."""
    from promptdelta.errors import ConfigError

    monkeypatch.setenv(bert_fast.GROUPS_ENV, "0")
    assert bert_fast._max_groups() == 0
    monkeypatch.delenv(bert_fast.GROUPS_ENV)
    assert bert_fast._max_groups() == 8                               # on by default
    monkeypatch.setenv(bert_fast.GROUPS_ENV, "8")
    assert bert_fast._max_groups() == 8
    monkeypatch.setenv(bert_fast.GROUPS_ENV, "many")
    with pytest.raises(ConfigError, match="PROMPTDELTA_ATTENTION_GROUPS='many' is not a count"):
        bert_fast._max_groups()
