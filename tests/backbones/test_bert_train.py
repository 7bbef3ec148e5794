"""Native BERT/RoBERTa in train mode (dropout on). Hidden dropouts are ``FastDropout`` and the attention-probability
dropout runs in ``kernels.attention_cpu.attention``: the same torch seed gives the same outputs and gradients;
the model equals a reference whose attention applies the op's own mask (``dropout(ones, p)``, drawn at the same
RNG state) by hand; the fused q/k/v product and grouped packed attention stay on in training and equal the
plain paths under the same masks; packed and padded layouts (different mask shapes) agree in expectation over
many seeds; ``use_torch_dropout()`` restores torch's dropout, and then matches transformers in train mode bit
for bit in its random draws. Tiny models (2 layers x 32)."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from promptdelta.backbones import bert as bert_mod
from promptdelta.backbones import load_backbone
from promptdelta.kernels import attention_cpu
from promptdelta.kernels.dropout import FastDropout, dropout
from test_bert_fused_qkv import spy_fused, with_lora   # a sibling test module: pytest puts tests/backbones on sys.path

ATOL = 1e-5
FUSED_ATOL = 1e-4   # as test_bert_fused_qkv: one (3H, H) GEMM sums in another order than three (H, H) ones


def pair(family: str = "bert", dropout_p: float = 0.1):
    kw = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=66, initializer_range=0.3, hidden_dropout_prob=dropout_p,
              attention_probs_dropout_prob=dropout_p)
    torch.manual_seed(0)
    if family == "bert":
        cfg = transformers.BertConfig(**kw)
        cfg._attn_implementation = "sdpa"
        hf = transformers.BertModel(cfg, add_pooling_layer=False)
    else:
        cfg = transformers.RobertaConfig(**kw, pad_token_id=1)
        cfg._attn_implementation = "sdpa"
        hf = transformers.RobertaModel(cfg, add_pooling_layer=False)
    return hf.train(), load_backbone(hf)[0].train()


def batch(padded: bool, pad_id: int = 0):
    """(ids, mask) of 5 rows x 10; padded: lengths 10, 10, 3, 9, 8 (attention groups (0-1), (2), (3-4))."""
    ids = torch.randint(2, 99, (5, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(5, 10, dtype=torch.long)
    if padded:
        mask[2, 3:], mask[3, 9:], mask[4, 8:] = 0, 0, 0
    return ids.masked_fill(mask == 0, pad_id), mask


def step(model, ids, mask, seed: int = 7):
    """Output and gradients of every trainable parameter for a fixed output gradient, under torch seed ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = model(input_ids=ids, attention_mask=mask).last_hidden_state
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)) * mask[..., None]
    y.backward(g)
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def reference_attention(q, k, v, bias, scale, p, training):
    """Eager attention applying the op's own mask, drawn as ``dropout(ones, p)`` at the same RNG state; BERT's
    scale 1/sqrt(hd) whatever the caller passed."""
    m = dropout(torch.ones(q.shape[:-1] + (k.shape[-2],), dtype=q.dtype), p, training)   # (n, nh, Tq, Tk)
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + (0.0 if bias is None else bias)
    return (torch.softmax(s, dim=-1) * m) @ v


def spy_attention(monkeypatch):
    calls, real = [], attention_cpu.attention

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(attention_cpu, "attention", spy)
    return calls


def assert_close(a, b, atol):
    """Outputs within atol, gradients within atol relative to their largest entry (LoRA grads reach ~1e2)."""
    ya, ga = a
    yb, gb = b
    assert (ya - yb).abs().max() <= atol
    assert ga.keys() == gb.keys()
    for n in ga:
        assert (ga[n] - gb[n]).abs().max() <= atol * max(1.0, float(gb[n].abs().max())), n


def test_modules_and_state_dict():
    """FastDropout replaces the hidden dropouts; the state_dict and the key table round trip are unchanged."""
    hf, ours = pair()
    kinds = {type(m) for m in ours.modules() if isinstance(m, nn.Dropout)}
    assert kinds == {FastDropout}
    keys = set(ours.state_dict())
    ours.use_torch_dropout()
    assert {type(m) for m in ours.modules() if isinstance(m, nn.Dropout)} == {nn.Dropout}
    assert set(ours.state_dict()) == keys
    assert all(layer.attn.torch_dropout for layer in ours.layers)
    ours.use_torch_dropout(False)
    assert {type(m) for m in ours.modules() if isinstance(m, nn.Dropout)} == {FastDropout}
    back = ours.to_hf()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in hf.state_dict().items())


@pytest.mark.parametrize("padded", [False, True])
def test_same_seed_same_output_and_grads_and_dropout_active(padded):
    _, ours = pair()
    with_lora(ours)
    ids, mask = batch(padded)
    a, b, c = step(ours, ids, mask), step(ours, ids, mask), step(ours, ids, mask, seed=8)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][n], b[1][n]) for n in a[1])
    real = mask.bool()
    assert (a[0] - c[0])[real].abs().max() > 1e-2      # another seed: other masks
    ours.eval()
    assert (a[0] - step(ours, ids, mask)[0])[real].abs().max() > 1e-2   # dropout was on in train mode


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("padded", [False, True])
def test_equals_reference_built_from_the_ops_mask(monkeypatch, family, padded):
    """The fused attention dropout (and its gradients) equals eager attention with dropout(ones, p)'s mask."""
    _, ours = pair(family)
    with_lora(ours, targets="all-linear")
    ids, mask = batch(padded, pad_id=1 if family == "roberta" else 0)
    calls = spy_attention(monkeypatch)
    fused = step(ours, ids, mask)
    assert calls, "train mode did not reach kernels.attention_cpu.attention"
    monkeypatch.setattr(attention_cpu, "attention", reference_attention)
    assert_close(fused, step(ours, ids, mask), ATOL)


@pytest.mark.parametrize("padded", [False, True])
def test_prefix_and_keep_positions_equal_the_reference(monkeypatch, padded):
    """Keys longer than queries (a prefix of 3 keys/values per layer; the last layer's queries at 2 kept
    positions only) through the fused op equal the reference, values and prefix gradients."""
    _, ours = pair()
    for p in ours.parameters():
        p.requires_grad_(False)
    ids, mask = batch(padded)
    prefix = [tuple(torch.randn(1, 4, 3, 8, generator=torch.Generator().manual_seed(i + j), requires_grad=True)
                    for j in (0, 10)) for i in range(2)]
    keep = torch.tensor([[0, 1]] * 5)

    def run():
        for kv in prefix:
            for t in kv:
                t.grad = None
        torch.manual_seed(5)
        y = ours(input_ids=ids, attention_mask=mask, prefix_kv=prefix, keep_positions=keep).last_hidden_state
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
        return y.detach(), {f"{i}.{j}": t.grad.clone() for i, kv in enumerate(prefix) for j, t in enumerate(kv)}
    calls = spy_attention(monkeypatch)
    fused = run()
    assert fused[0].shape == (5, 2, 32) and any(s[2] == 2 for s in calls)   # the last layer: 2 queries
    monkeypatch.setattr(attention_cpu, "attention", reference_attention)
    assert_close(fused, run(), ATOL)


@pytest.mark.parametrize("padded,lora_dropout", [(False, 0.0), (True, 0.0), (True, 0.3)])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_fused_qkv_on_in_training_and_equal_to_unfused(monkeypatch, padded, lora_dropout, targets):
    """The fused q/k/v product stays on in training and equals three projections under one seed: it draws no
    random numbers of its own, and with LoRA dropout it draws each LoRA's mask in q, k, v order, as the
    separate LoRALinear calls do (that LoRA dropout is really on is checked at the end)."""
    _, ours = pair()
    with_lora(ours, targets=targets, dropout=lora_dropout)
    ids, mask = batch(padded)
    calls = spy_fused(monkeypatch)
    fused = step(ours, ids, mask)
    assert calls and all(calls)
    monkeypatch.setattr(bert_mod, "fused_qkv", lambda attn, x: None)
    assert_close(fused, step(ours, ids, mask), FUSED_ATOL)
    if lora_dropout:
        for m in ours.modules():
            if hasattr(m, "lora_A"):
                m.dropout.p = 0.0
        assert (step(ours, ids, mask)[0] - fused[0])[mask.bool()].abs().max() > 1e-3


def test_grouped_attention_runs_per_group_in_training(monkeypatch):
    """Packed rows attend per group (3 groups x 2 layers), each call with its own mask, in train mode."""
    _, ours = pair()
    with_lora(ours)
    ids, mask = batch(True)
    calls = spy_attention(monkeypatch)
    step(ours, ids, mask)
    if bert_mod.Packing.of(mask).groups is None:
        pytest.skip("grouped attention is off (PROMPTDELTA_ATTENTION_GROUPS=0)")
    assert [s[0] for s in calls] == [2, 1, 2] * 2


def test_gradients_reach_every_lora_parameter_and_no_frozen_one():
    _, ours = pair()
    with_lora(ours, targets="all-linear")
    ids, mask = batch(True)
    _, grads = step(ours, ids, mask)
    lora = {n for n, p in ours.named_parameters() if "lora_" in n}
    assert set(grads) == lora and all(grads[n].abs().sum() > 0 for n in lora)
    assert all(p.grad is None for n, p in ours.named_parameters() if n not in lora)


def _mean_output(model, ids, mask, seeds, layer: int = -1):
    """Mean and variance over seeds of the train-mode hidden state ``layer`` (-1: the output; 0: the
    embeddings after their dropout), no grad."""
    with torch.no_grad():
        ys = []
        for s in seeds:
            torch.manual_seed(s)
            ys.append(model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer])
    ys = torch.stack(ys)
    return ys.mean(0), ys.var(0)


def test_packed_and_padded_layouts_agree_in_expectation():
    """Packed (N, H) rows and grouped attention draw masks of other shapes than the padded (B, T) layout, so
    they cannot match draw for draw: their means over 300 seeds agree within 5 standard errors."""
    _, ours = pair()
    ids, mask = batch(True)
    packed_mean, packed_var = _mean_output(ours, ids, mask, range(300))
    handles = [layer.register_forward_hook(lambda *a: None) for layer in ours.layers]   # forces (B, T, H)
    padded_mean, padded_var = _mean_output(ours, ids, mask, range(1000, 1300))
    for h in handles:
        h.remove()
    real = mask.bool()
    se = ((packed_var + padded_var) / 300).sqrt()[real]
    assert ((packed_mean - padded_mean)[real].abs() <= 5 * se + 1e-6).all()
    assert packed_mean[~real].abs().max() == 0


def test_train_mean_approaches_eval():
    """Dropout keeps the expectation: after one dropout (the embeddings) the mean over 300 seeds is the eval
    value within 5 standard errors; at the output (nonlinear in the masks) the mean is much nearer the eval
    output than a single draw is."""
    _, ours = pair()
    ids, mask = batch(True)
    real = mask.bool()
    emb_mean, emb_var = _mean_output(ours, ids, mask, range(300), layer=0)
    out_mean, _ = _mean_output(ours, ids, mask, range(300))
    torch.manual_seed(0)
    with torch.no_grad():
        one = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        ours.eval()
        ref = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert ((emb_mean - ref.hidden_states[0]).abs() <= 5 * (emb_var / 300).sqrt() + 1e-6).all()
    err = lambda y: (y - ref.last_hidden_state)[real].abs().mean()   # noqa: E731
    assert err(out_mean) < 0.6 * err(one)


def test_fused_and_torch_dropout_agree_in_expectation():
    _, ours = pair()
    ids, mask = batch(False)
    seeds = range(300)
    fused_mean, fused_var = _mean_output(ours, ids, mask, seeds)
    ours.use_torch_dropout()
    torch_mean, torch_var = _mean_output(ours, ids, mask, seeds)
    se = ((fused_var + torch_var) / len(seeds)).sqrt()
    assert ((fused_mean - torch_mean).abs() <= 5 * se + 1e-6).all()


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_torch_dropout_matches_transformers_in_train_mode(monkeypatch, family):
    """With torch's dropout the native model draws the same masks as transformers (same order and shapes, no
    padding): train-mode outputs and gradients equal; the fused attention op is not called."""
    hf, ours = pair(family)
    ours.use_torch_dropout()
    ids, mask = batch(False, pad_id=1 if family == "roberta" else 0)
    calls = spy_attention(monkeypatch)
    torch.manual_seed(11)
    a = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.manual_seed(11)
    b = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not calls
    assert (a - b).abs().max() <= ATOL
    a.sum().backward()
    b.sum().backward()
    word = "embeddings.word_embeddings.weight"
    assert (hf.get_parameter(word).grad - ours.get_parameter(word).grad).abs().max() <= 1e-4


def test_switch_keeps_p_and_leaves_other_dropout_classes_alone():
    """use_torch_dropout swaps FastDropout <-> nn.Dropout keeping p; a dropout of another class stays."""
    class MyDropout(nn.Dropout):
        pass

    _, ours = pair()
    ours.layers[0].dropout = MyDropout(0.3)
    ours.layers[1].dropout = FastDropout(0.25)
    ours.use_torch_dropout()
    assert type(ours.layers[0].dropout) is MyDropout
    assert type(ours.layers[1].dropout) is nn.Dropout and ours.layers[1].dropout.p == 0.25
    ours.use_torch_dropout(False)
    assert type(ours.layers[1].dropout) is FastDropout and ours.layers[1].dropout.p == 0.25


def test_p_zero_train_equals_eval(monkeypatch):
    """p = 0: train mode is eval mode (no attention op call, no dropout)."""
    _, ours = pair(dropout_p=0.0)
    ids, mask = batch(True)
    calls = spy_attention(monkeypatch)
    y_train = step(ours, ids, mask)[0]
    ours.eval()
    assert torch.equal(y_train, step(ours, ids, mask)[0]) and not calls
