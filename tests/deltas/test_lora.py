"""LoRA-specific behaviour: the formula, merge semantics, Conv1D, config validation."""

from __future__ import annotations

import pytest
import torch
import transformers
from delta_helpers import hf_bert, perturb
from torch import nn

from promptdelta.deltas import LoRAConfig, LoRALinear, attach, load_delta
from promptdelta.errors import ConfigError, DeltaError


def _lora(r=4, alpha=8.0, dropout=0.0, seed=0, bias=True, impl="fused") -> LoRALinear:
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(6, 5, bias=bias), r=r, alpha=alpha, dropout=dropout, impl=impl)
    perturb([layer.lora_B], scale=0.5)
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_formula(bias):
    layer = _lora(bias=bias)
    x = torch.randn(2, 3, 6)                                                   # (B, T, in)
    w0, b = layer.base.weight, layer.base.bias
    expected = x @ w0.T + (b if bias else 0) + (8.0 / 4) * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)
    assert layer.lora_A.shape == (4, 6) and layer.lora_B.shape == (5, 4)


def test_fresh_layer_equals_base_and_a_is_not_zero():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=3)
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert layer.lora_A.abs().max() <= 1 / 6 ** 0.5 + 1e-6   # kaiming-uniform(a=sqrt 5) bound = 1/sqrt(fan_in)


def test_merged_forward_uses_only_the_base_weight():
    layer = _lora()
    x = torch.randn(3, 6)
    y = layer(x)
    layer.merge()
    with torch.no_grad():
        layer.lora_A.fill_(float("nan"))
    torch.testing.assert_close(layer(x), y, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.base(x), y, atol=1e-6, rtol=1e-6)


def test_unmerge_restores_the_exact_weight():
    layer = _lora()
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    assert not torch.equal(layer.base.weight, w0)
    torch.testing.assert_close(layer.base.weight - w0, layer.delta_weight().detach())
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0) and not layer.merged


def test_gradients_reach_a_and_b_but_not_the_base():
    layer = _lora()
    layer.base.requires_grad_(False)
    layer(torch.randn(3, 6)).sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert layer.base.weight.grad is None


def test_dropout_only_touches_the_lora_branch():
    layer = _lora(dropout=0.5).train()
    x = torch.randn(8, 6)
    outs = [layer(x) - layer.base(x) for _ in range(2)]
    assert not torch.allclose(outs[0], outs[1])               # the LoRA branch is random in train mode
    layer.eval()
    torch.testing.assert_close(layer(x) - layer.base(x), layer._lora_forward(x))


def test_plain_forward_goes_through_the_seam(monkeypatch):
    layer = _lora(impl="plain")
    x = torch.randn(2, 6)
    monkeypatch.setattr(LoRALinear, "_lora_forward", lambda self, x: torch.zeros(x.shape[0], 5))
    torch.testing.assert_close(layer(x), layer.base(x))


def test_fused_forward_calls_the_kernel_and_equals_plain(monkeypatch):
    import promptdelta.deltas.lora as lora_mod

    fused, plain = _lora(impl="fused"), _lora(impl="plain")
    x = torch.randn(3, 7, 6, requires_grad=True)
    y_f, y_p = fused(x), plain(x)
    torch.testing.assert_close(y_f, y_p, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y_f)
    gf = torch.autograd.grad(y_f, [x, fused.lora_A, fused.lora_B], g)
    gp = torch.autograd.grad(y_p, [x, plain.lora_A, plain.lora_B], g)
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    calls = []
    monkeypatch.setattr(lora_mod, "lora_linear", lambda *a, **k: calls.append(k) or torch.zeros(3, 7, 5))
    fused(x)
    assert calls and calls[0]["impl"] == "fused"


def test_state_dict_names_are_recognisable():
    model = hf_bert()
    attach(model, "lora", targets=["query"])
    keys = set(model.state_dict())
    q = "bert.encoder.layer.0.attention.self.query"
    assert {f"{q}.base.weight", f"{q}.base.bias", f"{q}.lora_A", f"{q}.lora_B"} <= keys
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, LoRALinear)


def test_bf16_base_gets_bf16_lora():
    model = hf_bert().to(torch.bfloat16)
    h = attach(model, "lora", targets=["query", "value"], r=2)
    assert all(p.dtype == torch.bfloat16 for p in h.parameters())
    out = model(input_ids=torch.randint(1, 99, (2, 5))).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("impl", ["fused", "plain"])
def test_fp32_model_under_bf16_autocast_trains(impl):
    """precision='bf16' in the Trainer: an fp32 model with LoRA runs under CPU autocast, every path."""
    torch.manual_seed(0)
    model = hf_bert()
    h = attach(model, "lora", targets=["query", "value"], r=2, impl=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=torch.randint(1, 99, (2, 5))).logits
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in h.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_scaling_follows_alpha_over_r():
    model = hf_bert()
    h = attach(model, "lora", targets=["value"], r=4, alpha=2)
    assert {w.scaling for w in model.modules() if isinstance(w, LoRALinear)} == {0.5}
    assert h.config == LoRAConfig(r=4, alpha=2, targets=["value"])


# ----------------------------------------------------------------------------------------- GPT-2 Conv1D
def _gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2Model(cfg).eval()


def test_conv1d_targets_are_supported(tmp_path):
    model = _gpt2()
    ids = torch.randint(0, 99, (2, 6))
    base = model(ids).last_hidden_state
    h = attach(model, "lora", targets=["c_attn"], r=2)
    conv_lora = model.h[0].attn.c_attn
    assert conv_lora.fan_in_fan_out and (conv_lora.in_features, conv_lora.out_features) == (32, 96)
    assert torch.equal(model(ids).last_hidden_state, base)
    perturb(h.parameters())
    x = torch.randn(3, 32)
    manual = conv_lora.base(x) + conv_lora.scaling * (x @ conv_lora.lora_A.T @ conv_lora.lora_B.T)
    torch.testing.assert_close(conv_lora(x), manual)
    tuned = model(ids).last_hidden_state
    h.merge()
    torch.testing.assert_close(model(ids).last_hidden_state, tuned, atol=1e-5, rtol=1e-5)
    h.unmerge()
    h.save(tmp_path / "g")
    fresh = _gpt2()
    load_delta(fresh, tmp_path / "g")
    assert torch.equal(fresh(ids).last_hidden_state, tuned)


def test_fan_in_fan_out_on_nn_linear_is_refused():
    with pytest.raises(DeltaError, match="drop fan_in_fan_out"):
        attach(hf_bert(), "lora", targets=["query"], fan_in_fan_out=True)


# ----------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kw, key", [({"r": 0}, "r=8"), ({"r": 2.5}, "r=8"), ({"alpha": -1}, "alpha=16"),
                                     ({"dropout": 1.0}, "dropout=0.1"), ({"fan_in_fan_out": "yes"}, "True or False")])
def test_bad_config_values_name_the_fix(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        attach(hf_bert(), "lora", targets=["query"], **kw)


def test_non_linear_targets_are_refused():
    model = hf_bert()
    with pytest.raises(DeltaError, match="only linear layers") as err:
        attach(model, "lora", targets=["query", "LayerNorm"])
    assert "LayerNorm" in str(err.value) and "narrower" in str(err.value)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_wrapped_layers_still_expose_the_base_attributes():
    """transformers T5's FFN reads ``wo.weight.dtype``: a LoRA-wrapped ``wo`` must answer through its base."""
    from delta_helpers import FAMILIES

    model = FAMILIES["hf_t5"].build()
    attach(model, "lora", targets=["mlp.fc2"], r=2)
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, LoRALinear) and wo.weight is wo.base.weight and wo.in_features == 37
    ids = torch.randint(3, 99, (2, 5))
    assert model(input_ids=ids, decoder_input_ids=ids[:, :2]).logits.shape == (2, 2, 99)
