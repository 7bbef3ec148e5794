"""Adapters (houlsby / pfeiffer / parallel) on every native family and a tiny transformers BERT; plus the
BitFit zero-bias extension for bias-free models (T5), which lives in bitfit.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from delta_helpers import assert_same_state, hf_bert, perturb, snapshot
from torch import nn

from promptdelta.backbones.bert import BertConfig, BertModel
from promptdelta.backbones.gpt import GPT2Config, GPT2Model
from promptdelta.backbones.roberta import RobertaConfig, RobertaModel
from promptdelta.backbones.t5 import T5Config, T5Model
from promptdelta.deltas import AdapterWrapper, AddedBias, attach, deltas_of, load_delta, model_fingerprint
from promptdelta.deltas.adapter import AdapterConfig, Bottleneck
from promptdelta.errors import CheckpointError, ConfigError, DeltaError


# --------------------------------------------------------------------------------------------- models
def _seeded(build: Callable[[int], nn.Module]) -> Callable[..., nn.Module]:
    def make(seed: int = 0, hidden: int = 32) -> nn.Module:
        torch.manual_seed(seed)
        return build(hidden).eval()
    return make


def native_bert(hidden: int) -> nn.Module:
    return BertModel(BertConfig(vocab_size=99, hidden_size=hidden, num_layers=2, num_heads=4, intermediate_size=37,
                                max_position_embeddings=64, has_lm_head=True))


def native_roberta(hidden: int) -> nn.Module:
    return RobertaModel(RobertaConfig(vocab_size=99, hidden_size=hidden, num_layers=2, num_heads=4,
                                      intermediate_size=37, max_position_embeddings=66, has_lm_head=True))


def native_gpt2(hidden: int) -> nn.Module:
    return GPT2Model(GPT2Config(vocab_size=99, n_positions=64, hidden_size=hidden, num_layers=2, num_heads=4,
                                eos_token_id=2))


def native_t5(hidden: int) -> nn.Module:   # 2 encoder, 3 decoder layers; gated FFN; n_heads * d_kv != d_model
    return T5Model(T5Config(vocab_size=99, d_model=hidden, d_kv=6, d_ff=37, num_layers=2, num_decoder_layers=3,
                            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                            feed_forward_proj="gated-gelu", tie_word_embeddings=False))


@dataclass
class Family:
    id: str
    build: Callable[..., nn.Module]
    seq2seq: bool = False

    def out(self, model: nn.Module, ids: torch.Tensor, grad: bool = False, **kw) -> torch.Tensor:
        """Logits (B, T, V). Without grad by default: CPU SDPA picks another kernel when no input needs a
        gradient (~1e-6 apart on T5), so outputs compared bit for bit are taken in the same grad mode."""
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        if self.seq2seq:
            kw["decoder_input_ids"] = ids[:, :4]
        with torch.set_grad_enabled(grad):
            return model(input_ids=ids, attention_mask=mask, **kw).logits


NATIVE = [Family("bert", _seeded(native_bert)), Family("roberta", _seeded(native_roberta)),
          Family("gpt2", _seeded(native_gpt2)), Family("t5", _seeded(native_t5), seq2seq=True)]
HF = Family("hf_bert", lambda seed=0, hidden=32: hf_bert(seed, hidden))
HF_TARGETS = {"houlsby": ["attention.output.dense", "output.dense"], "pfeiffer": [r"re:.*layer\.\d+\.output\.dense"],
              "parallel": ["attention.output.dense"]}
PLACEMENTS = ["houlsby", "pfeiffer", "parallel"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster than two on a busy machine (no OpenMP sync); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=NATIVE + [HF], ids=[f.id for f in NATIVE + [HF]])
def family(request) -> Family:
    return request.param


def _attach(family: Family, model: nn.Module, placement: str = "houlsby", **kw):
    if family.id == "hf_bert":
        kw.setdefault("targets", HF_TARGETS[placement])
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
    fam = NATIVE[0]
    model = fam.build()
    before = fam.out(model, ids)
    attach(model, "adapter", init_scale=1e-4)
    after = fam.out(model, ids)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, before, atol=1e-2, rtol=0)


def test_only_adapter_parameters_train_and_change(family, ids):
    model, handle = _trained(family)
    delta = {id(p) for p in handle.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == delta
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(handle.parameters(), lr=0.5)
    family.out(model, ids, grad=True).square().mean().backward()
    assert all(p.grad is None for p in model.parameters() if id(p) not in delta)
    opt.step()
    changed = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
    assert changed and changed <= {k for k, p in model.named_parameters() if id(p) in delta}


def test_detach_restores_outputs_and_state_exactly(family, ids):
    model = family.build()
    snap, out0 = snapshot(model), family.out(model, ids)
    handle = _attach(family, model, bottleneck=4)
    perturb(handle.parameters())
    opt = torch.optim.SGD(handle.parameters(), lr=0.5)
    family.out(model, ids, grad=True).sum().backward()
    opt.step()
    handle.detach()
    assert_same_state(model, snap)
    assert torch.equal(family.out(model, ids), out0)
    assert deltas_of(model) == {} and not any(isinstance(m, AdapterWrapper) for m in model.modules())


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_save_load_onto_fresh_backbone_reproduces_outputs(family, placement, ids, tmp_path):
    model, handle = _trained(family, placement)
    expected = family.out(model, ids)
    handle.save(tmp_path / "a")
    fresh = family.build()
    loaded = load_delta(fresh, tmp_path / "a")
    assert torch.equal(family.out(fresh, ids), expected)
    assert loaded.config == handle.config and loaded.targets == handle.targets


def test_merge_is_refused_with_the_reason(family, ids):
    model, handle = _trained(family)
    out = family.out(model, ids)
    for _ in range(2):
        with pytest.raises(DeltaError, match="non-linear") as err:
            handle.merge()
        assert "lora" in str(err.value) and "attached for inference" in str(err.value)
    assert not handle.merged and torch.equal(family.out(model, ids), out)
    handle.unmerge()                       # nothing to undo, no error
    handle.detach()


def test_checkpoint_for_another_model_is_refused(family, tmp_path):
    _, handle = _trained(family)
    handle.save(tmp_path / "a")
    other = family.build(0, hidden=48)
    with pytest.raises(CheckpointError, match="architectures differ"):
        load_delta(other, tmp_path / "a")
    with pytest.raises(CheckpointError, match="strict=False"):
        load_delta(family.build(seed=1), tmp_path / "a")
    assert deltas_of(other) == {}


def test_disabled_gives_base_outputs(family, ids):
    base = family.out(family.build(), ids)
    model, handle = _trained(family)
    tuned = family.out(model, ids)
    with handle.disabled():
        assert torch.equal(family.out(model, ids), base)
    assert torch.equal(family.out(model, ids), tuned)


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
    t5 = NATIVE[3].build()
    h = attach(t5, "adapter")                                  # houlsby: self-attention output + FFN output
    assert len(h.targets) == 2 * (2 + 3) and all(t.endswith((".attn.o_proj", ".mlp.fc2")) for t in h.targets)
    h.detach()
    assert attach(t5, "adapter", placement="pfeiffer").targets == [f"{s}.layers.{i}.mlp.fc2" for s, n in
                                                                   (("encoder", 2), ("decoder", 3)) for i in range(n)]
    bert = NATIVE[0].build()
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
    fam = NATIVE[2]                                            # GPT-2 attention returns (out, present)
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
        attach(NATIVE[0].build(), "adapter", **kw)
    assert fix in str(err.value)


def test_native_defaults_on_a_transformers_model_say_what_to_pass():
    with pytest.raises(DeltaError, match="match no module") as err:
        attach(hf_bert(), "adapter")
    assert "last components" in str(err.value)


def test_nested_and_unsized_targets_are_refused():
    with pytest.raises(DeltaError, match="narrow the targets"):
        attach(NATIVE[0].build(), "adapter", targets=["mlp", "fc2"])
    with pytest.raises(DeltaError, match="target linear layers"):
        attach(nn.Sequential(nn.Sequential(nn.Linear(4, 4))), "adapter", targets="0")


def test_adapter_output_size_mismatch_is_explained(ids):
    model = NATIVE[0].build()
    h = attach(model, "adapter", placement="parallel", targets=r"re:layers\.\d+\.mlp\.fc1")   # linear 32 -> 37
    perturb(h.parameters())
    assert NATIVE[0].out(model, ids).shape == (3, 7, 99)
    other = NATIVE[0].build()
    attach(other, "adapter", targets="lm_head")                 # a sublayer that does not keep the hidden size
    with pytest.raises(DeltaError, match="keeps the hidden size"):
        NATIVE[0].out(other, ids)


def test_bottleneck_module_is_exact_identity_when_up_is_zero():
    b = Bottleneck(8, 8, 2)
    x = torch.randn(2, 8)
    assert torch.equal(b(x), torch.zeros(2, 8))


# --------------------------------------------------------------------------------------------- BitFit on T5
def test_bitfit_adds_zero_biases_to_t5_and_detach_removes_them(ids, caplog):
    fam = NATIVE[3]
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
    fam = NATIVE[3]
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
        attach(NATIVE[3].build(), "bitfit", add_biases=False)
    with pytest.raises(ConfigError, match="None \\(auto\\), True or False"):
        attach(plain, "bitfit", add_biases="yes")
    assert attach(NATIVE[0].build(), "bitfit").num_parameters() > 0   # BERT has biases: none added
    bert = NATIVE[0].build()
    attach(bert, "bitfit")
    assert not any(isinstance(m, AddedBias) for m in bert.modules())


def test_bitfit_does_not_add_biases_inside_another_delta():
    model = NATIVE[3].build()
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
