"""Adapters (houlsby / pfeiffer / parallel): placements on every family, the formula, default targets, bad
input; plus the BitFit zero-bias extension for bias-free models (T5), which lives in bitfit.py. The invariants
(only adapter parameters train, detach, merge refused, checkpoints, disabled) are in test_families.py."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from delta_helpers import FAMILIES, HF, NATIVE, Family, assert_same_state, hf_bert, perturb, snapshot
from torch import nn

from promptdelta.deltas import AdapterWrapper, AddedBias, attach, load_delta, model_fingerprint
from promptdelta.deltas.adapter import AdapterConfig, Bottleneck
from promptdelta.errors import ConfigError, DeltaError

HF_PARALLEL = {"hf_bert": ["attention.output.dense"], "hf_roberta": ["attention.output.dense"]}   # no FFN module
PLACEMENTS = ["houlsby", "pfeiffer", "parallel"]
FAMILY_LIST = NATIVE + HF


@pytest.fixture(params=FAMILY_LIST, ids=[f.id for f in FAMILY_LIST])
def family(request) -> Family:
    return request.param


def _attach(family: Family, model: nn.Module, placement: str = "houlsby", **kw):
    if placement == "parallel" and family.id in HF_PARALLEL:
        kw.setdefault("targets", HF_PARALLEL[family.id])
    return attach(model, "adapter", placement=placement, **kw)


def _trained(family: Family, placement: str = "houlsby", seed: int = 0):
    model = family.build(seed)
    handle = _attach(family, model, placement, bottleneck=4)
    perturb(handle.parameters())
    return model, handle


# --------------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_fresh_adapter_is_exactly_the_identity(family, placement, ids):
    model = family.build()
    before = family.out(model, ids)
    handle = _attach(family, model, placement)
    assert handle.targets and handle.num_parameters() > 0
    assert sum(isinstance(m, AdapterWrapper) for m in model.modules()) == len(handle.targets)
    assert torch.equal(family.out(model, ids), before)
    perturb(handle.parameters())                          # the adapters are in the forward path
    assert not torch.allclose(family.out(model, ids), before)


def test_near_identity_init_is_close_but_not_equal(ids):
    fam = FAMILIES["bert"]
    model = fam.build()
    before = fam.out(model, ids)
    attach(model, "adapter", init_scale=1e-4)
    after = fam.out(model, ids)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, before, atol=1e-2, rtol=0)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_save_load_onto_fresh_backbone_reproduces_outputs(family, placement, ids, tmp_path):
    model, handle = _trained(family, placement)
    expected = family.out(model, ids)
    handle.save(tmp_path / "a")
    fresh = family.build()
    loaded = load_delta(fresh, tmp_path / "a")
    assert torch.equal(family.out(fresh, ids), expected)
    assert loaded.config == handle.config and loaded.targets == handle.targets


# --------------------------------------------------------------------------------------------- formula
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_sequential_and_parallel_match_the_formula(activation):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    for placement in ("houlsby", "parallel"):
        model = nn.Sequential(nn.Linear(8, 6))
        base = model[0]
        h = attach(model, "adapter", targets="0", placement=placement, bottleneck=3, activation=activation,
                   scaling=2.0)
        perturb(h.parameters())
        a = model[0].adapter
        src = base(x) if placement == "houlsby" else x
        act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation]
        want = base(x) + 2.0 * F.linear(act(F.linear(src, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-6)


def test_default_targets_per_placement():
    t5 = FAMILIES["t5v11"].build()
    h = attach(t5, "adapter")                                  # houlsby: self-attention output + FFN output
    assert len(h.targets) == 2 * (2 + 3) and all(t.endswith((".attn.o_proj", ".mlp.fc2")) for t in h.targets)
    h.detach()
    assert attach(t5, "adapter", placement="pfeiffer").targets == [f"{s}.layers.{i}.mlp.fc2" for s, n in
                                                                   (("encoder", 2), ("decoder", 3)) for i in range(n)]
    bert = FAMILIES["bert"].build()
    h = attach(bert, "adapter", placement="parallel", reduction_factor=8)
    assert h.targets == ["layers.0.mlp", "layers.1.mlp"]
    assert h.config.targets == ["mlp"] and all(w.adapter.down.out_features == 4 for w in bert.modules()
                                               if isinstance(w, AdapterWrapper))


def test_bottleneck_from_reduction_factor():
    assert AdapterConfig().bottleneck_for(768) == 48
    assert AdapterConfig(reduction_factor=2).bottleneck_for(32) == 16
    assert AdapterConfig(bottleneck=5).bottleneck_for(32) == 5
    assert AdapterConfig(reduction_factor=1000).bottleneck_for(32) == 1


def test_parallel_adapter_on_an_attention_that_returns_a_tuple(ids):
    fam = FAMILIES["gpt2"]                                            # GPT-2 attention returns (out, present)
    model = fam.build()
    before = fam.out(model, ids)
    h = attach(model, "adapter", placement="parallel", targets="attn", bottleneck=4)
    assert torch.equal(fam.out(model, ids), before)
    perturb(h.parameters())
    tuned = fam.out(model, ids)
    assert not torch.allclose(tuned, before)
    out = model(input_ids=ids, use_cache=True)
    assert out.past_key_values is not None and len(out.past_key_values) == 2


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, fix", [
    (dict(placement="serial"), "use one of"),
    (dict(bottleneck=8, reduction_factor=4), "only one of"),
    (dict(bottleneck=0), "integer >= 1"),
    (dict(reduction_factor=-2), "positive number"),
    (dict(activation="swishy"), "use one of"),
    (dict(dropout=1.5), "[0, 1)"),
    (dict(init_scale=-1.0), "non-negative"),
])
def test_bad_config_is_refused(kw, fix):
    with pytest.raises(ConfigError) as err:
        attach(FAMILIES["bert"].build(), "adapter", **kw)
    assert fix in str(err.value)


@pytest.mark.parametrize("fam, wrapped", [("hf_gpt2", "transformer.h.{}.mlp"),
                                          ("hf_t5", "encoder.block.{}.layer.1.DenseReluDense")])
def test_parallel_default_finds_the_ffn_module_of_transformers_models(fam, wrapped, ids):
    model = FAMILIES[fam].build()
    h = attach(model, "adapter", placement="parallel")
    assert all(wrapped.format(i) in h.targets for i in range(2))


def test_parallel_default_on_a_split_ffn_says_what_to_pass():
    with pytest.raises(DeltaError, match="match no module") as err:   # BERT: intermediate + output (with LN)
        attach(hf_bert(), "adapter", placement="parallel")
    assert "last components" in str(err.value)
    assert attach(hf_bert(), "adapter").targets[:2] == ["bert.encoder.layer.0.attention.output.dense",
                                                        "bert.encoder.layer.0.output.dense"]   # houlsby works


def test_nested_and_unsized_targets_are_refused():
    with pytest.raises(DeltaError, match="narrow the targets"):
        attach(FAMILIES["bert"].build(), "adapter", targets=["mlp", "fc2"])
    with pytest.raises(DeltaError, match="target linear layers"):   # no linear inside, no hidden_size
        attach(nn.Sequential(nn.Sequential(nn.LayerNorm(4))), "adapter", targets="re:0")
    h = attach(nn.Sequential(nn.Sequential(nn.Linear(4, 6))), "adapter", targets="re:0")   # sized by its linear
    assert h._method.sites[0][1].adapter.up.out_features == 6


def test_adapter_output_size_mismatch_is_explained(ids):
    model = FAMILIES["bert"].build()
    h = attach(model, "adapter", placement="parallel", targets=r"re:layers\.\d+\.mlp\.fc1")   # linear 32 -> 37
    perturb(h.parameters())
    assert FAMILIES["bert"].out(model, ids).shape == (3, 7, 99)
    other = FAMILIES["bert"].build()
    attach(other, "adapter", targets="lm_head")                 # a sublayer sized by its linears: (H, V)
    assert FAMILIES["bert"].out(other, ids).shape == (3, 7, 99)
    odd = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.Unflatten(-1, (2, 4))))   # outputs 4, not its linear's 8
    attach(odd, "adapter", targets="re:0")
    with pytest.raises(DeltaError, match=r"maps 8 -> 8 features but its module \(Sequential\) reads 4 and outputs 4.*keeps the hidden size"):
        odd(torch.randn(3, 4))


def test_bottleneck_module_is_exact_identity_when_up_is_zero():
    b = Bottleneck(8, 8, 2)
    x = torch.randn(2, 8)
    assert torch.equal(b(x), torch.zeros(2, 8))


# --------------------------------------------------------------------------------------------- BitFit on T5
def test_bitfit_adds_zero_biases_to_t5_and_detach_removes_them(ids, caplog):
    fam = FAMILIES["t5v11"]
    model = fam.build()
    snap, out0, fp = snapshot(model), fam.out(model, ids), model_fingerprint(model)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    with caplog.at_level(logging.INFO, logger="promptdelta.deltas.bitfit"):
        h = attach(model, "bitfit")
    assert "adding zero-initialised biases" in caplog.text
    assert len(h.targets) == n_linear and all(k.endswith(".bias") for k in h.state_dict())
    assert torch.equal(fam.out(model, ids), out0) and model_fingerprint(model) == fp
    opt = torch.optim.SGD(h.parameters(), lr=0.5)
    fam.out(model, ids, grad=True).square().mean().backward()
    opt.step()
    assert not torch.equal(fam.out(model, ids), out0)
    h.detach()
    assert_same_state(model, snap)
    assert torch.equal(fam.out(model, ids), out0)
    assert not any(isinstance(m, AddedBias) for m in model.modules())
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))


def test_bitfit_t5_save_load_reproduces_outputs(ids, tmp_path):
    fam = FAMILIES["t5v11"]
    model = fam.build()
    h = attach(model, "bitfit", targets=["q_proj", "v_proj"])
    perturb(h.parameters())
    expected = fam.out(model, ids)
    h.save(tmp_path / "b")
    fresh = fam.build()
    load_delta(fresh, tmp_path / "b")
    assert torch.equal(fam.out(fresh, ids), expected)


def test_bitfit_add_biases_switch():
    plain = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    h = attach(plain, "bitfit", add_biases=True)
    assert h.targets == ["0", "1"] and isinstance(plain[0], AddedBias)
    h.detach()
    assert plain[0].bias is None and type(plain[0]) is nn.Linear
    with pytest.raises(DeltaError, match="add_biases=True"):
        attach(FAMILIES["t5v11"].build(), "bitfit", add_biases=False)
    with pytest.raises(ConfigError, match="None \\(auto\\), True or False"):
        attach(plain, "bitfit", add_biases="yes")
    assert attach(FAMILIES["bert"].build(), "bitfit").num_parameters() > 0   # BERT has biases: none added
    bert = FAMILIES["bert"].build()
    attach(bert, "bitfit")
    assert not any(isinstance(m, AddedBias) for m in bert.modules())


def test_bitfit_does_not_add_biases_inside_another_delta():
    model = FAMILIES["t5v11"].build()
    attach(model, "lora", targets=["q_proj"])
    with pytest.raises(DeltaError, match="already wraps"):
        attach(model, "bitfit", targets=["q_proj"])


def test_transformers_gpt2_conv1d_targets(ids):
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=99, n_positions=32, n_embd=32, n_layer=2,
                                                                 n_head=4)).eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    h = attach(model, "adapter", targets=["attn.c_proj", "mlp.c_proj"], bottleneck=4)   # Conv1D: weight (in, out)
    assert len(h.targets) == 4
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    wrapped = model.transformer.h[0].mlp.c_proj
    assert wrapped.adapter.down.in_features == 32 and wrapped.adapter.up.out_features == 32
