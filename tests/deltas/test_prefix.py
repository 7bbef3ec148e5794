"""Prefix tuning on every native family: parity with keys/values prepended by hand, gradients, MLP folding,
detach, save/load, refusals."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from delta_helpers import FAMILIES, NATIVE, Family, perturb, snapshot
from safetensors.torch import load_file

from promptdelta.deltas import attach, deltas_of, load_delta, prefix_kv
from promptdelta.deltas.prefix import PrefixDict, PrefixList
from promptdelta.errors import ConfigError, DeltaError


@pytest.fixture(params=NATIVE, ids=[f.id for f in NATIVE])
def family(request) -> Family:
    return request.param


def _attach(model, reparam: bool = True, **kw):
    return attach(model, "prefix", num_tokens=3, reparam=reparam, reparam_hidden=16, **kw)


def _by_hand(family: Family, handle) -> list | dict:
    """prefix_kv built from the checkpoint tensors (L, nh, P, hd): what a user would pass by hand."""
    sd = handle.state_dict()

    def pairs(part: str) -> list:
        k, v = sd[f"prefix.{part}.keys"], sd[f"prefix.{part}.values"]
        return [(k[i][None], v[i][None]) for i in range(k.shape[0])]   # (1, nh, P, hd) per layer
    return {p: pairs(p) for p in ("encoder", "decoder", "cross")} if family.seq2seq else pairs("layers")


# --------------------------------------------------------------------------------------------- parity
def test_outputs_equal_keys_values_prepended_by_hand(family, ids):
    """A prefix cannot leave outputs unchanged; instead it must equal the backbone's own prefix_kv path."""
    model = family.build()
    base = family.out(model, ids)
    handle = _attach(model, reparam=False)
    tuned = family.out(model, ids)
    assert not torch.allclose(tuned, base)
    manual = _by_hand(family, handle)
    handle.detach()
    assert torch.equal(family.out(model, ids), base)
    assert torch.equal(family.out(model, ids, prefix_kv=manual), tuned)


def test_prefix_shapes_per_attention(family):
    model = family.build()
    handle = _attach(model, reparam=False)
    c = model.config
    shapes = {k: tuple(v.shape) for k, v in handle.state_dict().items()}
    if family.seq2seq:   # encoder self, decoder self and cross attention
        n_enc, n_dec = c.num_layers, c.num_decoder_layers
        assert len(handle.targets) == n_enc + 2 * n_dec
        assert handle.targets[-1] == f"decoder.layers.{n_dec - 1}.cross_attn"
        assert shapes["prefix.encoder.keys"] == (n_enc, c.num_heads, 3, c.d_kv)
        assert shapes["prefix.decoder.values"] == shapes["prefix.cross.values"] == (n_dec, c.num_heads, 3, c.d_kv)
        assert isinstance(prefix_kv(handle), PrefixDict)
    else:
        assert handle.targets == ["layers.0.attn", "layers.1.attn"]
        kv_heads = getattr(c, "num_kv_heads", None) or c.num_heads      # grouped-query attention: k/v heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_heads
        assert shapes["prefix.layers.keys"] == (2, kv_heads, 3, head_dim)
        assert isinstance(prefix_kv(handle), PrefixList)


def test_every_t5_part_matters(ids):
    fam = FAMILIES["t5v11"]
    model = fam.build()
    handle = _attach(model, reparam=False)
    tuned = fam.out(model, ids)
    full = _by_hand(fam, handle)
    handle.detach()
    for part in ("encoder", "decoder", "cross"):
        partial = {p: v for p, v in full.items() if p != part}
        assert not torch.allclose(fam.out(model, ids, prefix_kv=partial), tuned), part


# --------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("reparam", [True, False])
def test_gradients_reach_only_the_prefix_parameters(family, reparam, ids):
    model = family.build()
    snap = snapshot(model)
    handle = _attach(model, reparam=reparam)
    delta = {id(p) for p in handle.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == delta
    before = {k: v.clone() for k, v in handle.state_dict().items()}
    family.out(model, ids, grad=True).square().mean().backward()
    assert all(p.grad is None for p in model.parameters() if id(p) not in delta)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in handle.parameters())
    torch.optim.SGD(handle.parameters(), lr=0.5).step()
    assert all(not torch.equal(v, before[k]) for k, v in handle.state_dict().items())
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in snap[0].items())   # every base tensor unchanged


def test_prefix_parameters_live_in_the_model_and_follow_it(ids):
    fam = FAMILIES["bert"]
    model = fam.build()
    handle = _attach(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in handle.parameters()}              # what the Trainer optimises
    out = fam.out(model, ids)
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in handle.parameters())
    torch.testing.assert_close(fam.out(model, ids).float(), out, atol=1e-5, rtol=1e-5)
    model.train()
    assert model.prefix_prefix.training


# --------------------------------------------------------------------------------------------- merge
def test_merge_folds_the_mlp_exactly_and_twice_is_a_no_op(family, ids):
    model = family.build()
    handle = _attach(model, reparam=True)
    perturb(handle.parameters())
    assert any(".mlp." in k for k in handle.state_dict())
    unmerged = family.out(model, ids)
    handle.merge()
    assert handle.merged and handle.config.reparam is False
    assert all(k.endswith((".keys", ".values")) for k in handle.state_dict())
    assert torch.equal(family.out(model, ids), unmerged)
    sd = {k: v.clone() for k, v in handle.state_dict().items()}
    handle.merge()
    assert handle.state_dict().keys() == sd.keys()
    assert all(torch.equal(v, sd[k]) for k, v in handle.state_dict().items())
    assert torch.equal(family.out(model, ids), unmerged)
    handle.unmerge()                                          # folding changed nothing to undo
    assert torch.equal(family.out(model, ids), unmerged)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_a_checkpoint_holds_the_folded_plain_prefixes_only(family, merge, ids, tmp_path):
    model = family.build()
    handle = _attach(model)
    perturb(handle.parameters())
    expected = family.out(model, ids)
    if merge:
        handle.merge()
    handle.save(tmp_path / "p")
    tensors = load_file(tmp_path / "p" / "delta.safetensors")
    meta = json.loads((tmp_path / "p" / "delta.json").read_text())
    parts = ("encoder", "decoder", "cross") if family.seq2seq else ("layers",)
    assert meta["config"]["reparam"] is False
    assert sorted(tensors) == sorted(f"prefix.{p}.{kv}" for p in parts for kv in ("keys", "values"))
    by_hand = {f"prefix.{p}.{kv}": t for p in parts
               for kv, t in zip(("keys", "values"), handle._method.sets[p].key_values())}
    assert all(torch.equal(tensors[k], by_hand[k]) for k in tensors)       # the MLP's output, evaluated once
    if not merge:
        assert handle.config.reparam and any(".mlp." in k for k in handle.state_dict())   # training goes on
    fresh = family.build()
    loaded = load_delta(fresh, tmp_path / "p")
    assert torch.equal(family.out(fresh, ids), expected)
    assert loaded.targets == handle.targets and not loaded.config.reparam


def test_inference_reuses_the_folded_prefixes_until_the_mlp_changes(ids):
    fam = FAMILIES["bert"]
    model = fam.build()
    handle = _attach(model)
    sets = handle._method.sets["layers"]
    calls = []
    sets.mlp.register_forward_hook(lambda *a: calls.append(1))
    first = fam.out(model, ids)
    assert torch.equal(fam.out(model, ids), first) and len(calls) == 1     # no grad: MLP evaluated once
    fam.out(model, ids, grad=True).square().mean().backward()              # training: every forward runs it
    assert len(calls) == 2
    torch.optim.SGD(handle.parameters(), lr=0.5).step()
    stepped = fam.out(model, ids)
    assert len(calls) == 3 and not torch.equal(stepped, first)             # a step invalidates the fold
    assert torch.equal(fam.out(model, ids), stepped) and len(calls) == 3


# --------------------------------------------------------------------------------------------- prefix_kv
def test_a_given_prefix_kv_is_combined_and_our_own_is_not_doubled(family, ids):
    model = family.build()
    extra_handle = _attach(model, reparam=False, name="extra")
    extra = _by_hand(family, extra_handle)
    extra_handle.detach()
    handle = _attach(model, reparam=False)
    tuned = family.out(model, ids)
    assert torch.equal(family.out(model, ids, prefix_kv=prefix_kv(handle)), tuned)   # no double prefix
    combined = family.out(model, ids, prefix_kv=extra)
    ours = _by_hand(family, handle)
    handle.detach()
    if family.seq2seq:
        both = {p: [(torch.cat([b[0], a[0]], 2), torch.cat([b[1], a[1]], 2)) for a, b in zip(ours[p], extra[p])]
                for p in ours}
    else:
        both = [(torch.cat([b[0], a[0]], 2), torch.cat([b[1], a[1]], 2)) for a, b in zip(ours, extra)]
    assert torch.equal(family.out(model, ids, prefix_kv=both), combined)


def test_two_prefix_deltas_stack(ids):
    fam = FAMILIES["bert"]
    model = fam.build()
    a = _attach(model, reparam=False, name="a")
    b = _attach(model, reparam=False, name="b")
    both = fam.out(model, ids)
    ka, kb = _by_hand(fam, a), _by_hand(fam, b)
    a.detach()
    b.detach()
    by_hand = [(torch.cat([x[0], y[0]], 2), torch.cat([x[1], y[1]], 2)) for x, y in zip(ka, kb)]
    assert torch.equal(fam.out(model, ids, prefix_kv=by_hand), both)


@pytest.mark.parametrize("fam", [FAMILIES["gpt2"], FAMILIES["t5v11"]], ids=["gpt2", "t5"])
def test_generate_with_the_handles_prefix_matches_forward(fam, ids):
    model = fam.build()
    handle = _attach(model)
    perturb(handle.parameters())
    out = model.generate(ids, max_new_tokens=2, prefix_kv=prefix_kv(handle))
    with torch.no_grad():   # forward goes through the hook; T5 decodes from the start token by default
        first = model(input_ids=ids).logits[:, -1].argmax(-1)   # (B,)
    assert torch.equal(out[:, 1 if fam.seq2seq else ids.shape[1]], first)


# --------------------------------------------------------------------------------------------- refusals
def test_transformers_models_are_refused_with_the_reason():
    model = transformers.DistilBertModel(transformers.DistilBertConfig(   # BERT takes one: test_prefix_hf_encoders
        vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37))
    with pytest.raises(DeltaError, match="prefix_kv") as err:
        attach(model, "prefix")
    assert "load_backbone" in str(err.value) and "'adapter'" in str(err.value)
    assert deltas_of(model) == {} and not model._forward_pre_hooks


@pytest.mark.parametrize("kw, fix", [
    (dict(num_tokens=0), "integer >= 1"),
    (dict(reparam_hidden=-3), "integer >= 1"),
    (dict(reparam="yes"), "True or False"),
    (dict(init_std=0.0), "positive number"),
    (dict(targets=["q_proj"]), "valid keys"),
])
def test_bad_config_is_refused(kw, fix):
    with pytest.raises(ConfigError) as err:
        attach(FAMILIES["bert"].build(), "prefix", **kw)
    assert fix in str(err.value)


def test_prefix_kv_of_another_method_is_refused():
    h = attach(FAMILIES["bert"].build(), "bitfit")
    with pytest.raises(DeltaError, match="not 'prefix'"):
        prefix_kv(h)
