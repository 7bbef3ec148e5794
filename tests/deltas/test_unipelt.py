"""UniPELT: gated LoRA + adapter + prefix as one delta: a fresh delta without prefix is the identity, closed
gates switch a submodule off, gates get gradients and train, save/load and detach round trips, and the
LoRA + adapter form works on a transformers model."""

import pytest
import torch
from delta_helpers import hf_bert, native_bert

import promptdelta as pd
from promptdelta.deltas.base import base_named_parameters
from promptdelta.errors import ConfigError, DeltaError


def _ids():
    return torch.randint(1, 99, (3, 7), generator=torch.Generator().manual_seed(1))


def _hidden(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def _perturb(handle, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in handle.named_parameters():
            if k.endswith(("lora_B", "up.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("make", [native_bert, hf_bert], ids=["native", "hf"])
def test_fresh_delta_without_prefix_is_identity_and_closed_gates_switch_off(make):
    model, ids = make(), _ids()
    base = _hidden(model, ids)
    h = pd.attach(model, "unipelt", num_tokens=0)
    torch.testing.assert_close(_hidden(model, ids), base, atol=0, rtol=0)         # B = 0, up = 0
    _perturb(h)
    assert not torch.allclose(_hidden(model, ids), base, atol=1e-4)
    with torch.no_grad():                                                          # close every gate
        for k, p in h.named_parameters():
            if k.endswith(("lora_gate.bias", "adapter_gate.bias")):
                p.fill_(-1e4)
    torch.testing.assert_close(_hidden(model, ids), base, atol=1e-5, rtol=0)
    h.detach()
    torch.testing.assert_close(_hidden(model, ids), base, atol=0, rtol=0)


def test_all_three_parts_train_through_their_gates(tmp_path):
    model, ids = native_bert(), _ids()
    base_out = _hidden(model, ids)
    base = {k: v.detach().clone() for k, v in base_named_parameters(model)}
    h = pd.attach(model, "unipelt", num_tokens=3, r=2, bottleneck=4)
    names = [k for k, _ in h.named_parameters()]
    for part in ("lora_gate.weight", "adapter_gate.weight", "prefix.layers.gate", "prefix.layers.keys", "lora_A",
                 "adapter.up.weight"):
        assert any(n.endswith(part) for n in names), part
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if any(p is q for q in h.parameters())}
    with h.disabled():
        torch.testing.assert_close(_hidden(model, ids), base_out)
    opt = torch.optim.Adam(h.parameters(), lr=1e-2)
    before = {k: p.detach().clone() for k, p in h.named_parameters()}
    for _ in range(3):
        loss = model(input_ids=ids).last_hidden_state.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = {k for k, p in h.named_parameters() if not torch.equal(p, before[k])}
    assert any(k.endswith("prefix.layers.gate") for k in moved)
    assert any(k.endswith("lora_gate.weight") for k in moved) and any(k.endswith("adapter_gate.weight") for k in moved)
    after = dict(base_named_parameters(model))
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)   # base untouched
    out = _hidden(model, ids)
    h.save(tmp_path / "u")
    h.detach()
    torch.testing.assert_close(_hidden(model, ids), base_out)
    h2 = pd.load_delta(model, tmp_path / "u")
    torch.testing.assert_close(_hidden(model, ids), out)
    with pytest.raises(DeltaError, match="cannot be merged"):
        h2.merge()


def test_gated_prefix_on_a_transformers_encoder():
    """On a transformers BERT the prefix goes in through its cache (prefix_hf.py), with the gates applied."""
    model, ids = hf_bert(), _ids()
    base = model(input_ids=ids).logits
    h = pd.attach(model, "unipelt", num_tokens=2, r=2, bottleneck=4)
    with h.disabled():
        torch.testing.assert_close(model(input_ids=ids).logits, base, atol=0, rtol=0)
    out = model(input_ids=ids).logits
    assert not torch.allclose(out, base)
    gates = [p for n, p in h.named_parameters() if n.endswith(".gate")]
    assert gates
    before = out.detach().clone()
    with torch.no_grad():
        for g in gates:
            g.fill_(-30.0)                                                          # prefix values closed
    assert not torch.allclose(model(input_ids=ids).logits, before)                # the gates reach the cache
    out = model(input_ids=ids).logits
    out.sum().backward()
    assert all(g.grad is not None for g in gates)
    h.detach()
    torch.testing.assert_close(model(input_ids=ids).logits, base, atol=0, rtol=0)


def test_named_errors():
    with pytest.raises(ConfigError, match="num_tokens"):
        pd.attach(native_bert(), "unipelt", num_tokens=-1)
    with pytest.raises(DeltaError, match="nn.Linear"):
        pd.attach(native_bert(), "unipelt", lora_targets=["attn_norm"], num_tokens=0)


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5", "t5v11", "hf_roberta", "hf_t5"])
def test_lora_adapter_form_is_identity_at_init_on_every_family(family, ids):
    from delta_helpers import FAMILIES

    fam = FAMILIES[family]
    model = fam.build()
    base = fam.out(model, ids)
    h = pd.attach(model, "unipelt", num_tokens=0, r=2, bottleneck=4)
    assert h.num_parameters() > 0
    torch.testing.assert_close(fam.out(model, ids), base, atol=0, rtol=0)
    h.detach()
    if fam.native:                                                                 # with the gated prefix
        h = pd.attach(model, "unipelt", num_tokens=2, r=2, bottleneck=4)
        with h.disabled():
            torch.testing.assert_close(fam.out(model, ids), base, atol=0, rtol=0)
        assert not torch.allclose(fam.out(model, ids), base)
        h.detach()
