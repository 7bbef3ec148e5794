"""The attach mechanism on tiny HF and native BERT: checkpoints, summary, fingerprint, several deltas, target
matching (own and native names), registry and bad inputs. The invariants of every method on every family are
in test_families.py."""

from __future__ import annotations

import logging

import pytest
import torch
from delta_helpers import FAMILIES, assert_same_state, hf_bert, perturb, snapshot
from torch import nn

from promptdelta.deltas import attach, deltas_of, load_delta, model_fingerprint, register_delta
from promptdelta.backbones import load_backbone
from promptdelta.deltas.base import DeltaMethod, canonical_aliases, match_targets
from promptdelta.errors import CheckpointError, ConfigError, DeltaError, MissingFileError

METHODS = ["lora", "bitfit"]


def _trained(case, method: str, seed: int = 0):
    """A base model with a delta whose parameters are non-trivial."""
    model = case.build(seed)
    handle = attach(model, method)
    perturb(handle.parameters())
    return model, handle


# ----------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_for_other_weights_is_refused_unless_not_strict(case, method, tmp_path, caplog, ids):
    _, handle = _trained(case, method)
    handle.save(tmp_path / "d")
    other = case.build(seed=1)
    with pytest.raises(CheckpointError, match="strict=False"):
        load_delta(other, tmp_path / "d")
    assert deltas_of(other) == {}
    with caplog.at_level(logging.WARNING, logger="promptdelta.deltas.base"):
        loaded = load_delta(other, tmp_path / "d", strict=False)
    assert "other pretrained weights" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), handle.state_dict().values()))


@pytest.mark.parametrize("method", METHODS)
def test_save_refuses_existing_folder_unless_overwrite(case, method, tmp_path):
    _, handle = _trained(case, method)
    handle.save(tmp_path / "d")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        handle.save(tmp_path / "d")
    handle.save(tmp_path / "d", overwrite=True)
    assert sorted(f.name for f in (tmp_path / "d").iterdir()) == ["delta.json", "delta.safetensors", "manifest.json"]


@pytest.mark.parametrize("method", METHODS)
def test_summary_counts_match_parameters(case, method):
    model, handle = _trained(case, method)
    text = handle.summary()
    total = handle.num_parameters()
    base = sum(p.numel() for p in model.parameters()) - (total if method == "lora" else 0)
    assert f"trainable: {total:,} of {base:,}" in text
    assert f"{100 * total / base:.4f}% of model" in text
    assert all(t in text for t in handle.targets)


def test_fingerprint_ignores_attached_deltas(case, ids):
    model = case.build()
    fp = model_fingerprint(model)
    lora = attach(model, "lora")
    bitfit = attach(model, "bitfit")
    perturb(lora.parameters())
    perturb(bitfit.parameters())
    lora.merge()
    assert model_fingerprint(model) == fp
    assert model_fingerprint(case.build(seed=1))["weights"] != fp["weights"]
    assert model_fingerprint(case.build(seed=1))["structure"] == fp["structure"]


# ----------------------------------------------------------------------------------------- several deltas
@pytest.mark.parametrize("order", ["lora_first", "bitfit_first"])
def test_two_deltas_coexist_and_detach_in_any_order(case, order, ids):
    model = case.build()
    snap, out0 = snapshot(model), case.out(model, ids)
    lora = attach(model, "lora", name="L")
    bitfit = attach(model, "bitfit", name="B")
    perturb(lora.parameters())
    perturb(bitfit.parameters())
    assert list(deltas_of(model)) == ["L", "B"]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora.parameters() + bitfit.parameters()}
    first, second = (lora, bitfit) if order == "lora_first" else (bitfit, lora)
    first.detach()
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in second.parameters()}
    second.detach()
    assert_same_state(model, snap)
    assert torch.equal(case.out(model, ids), out0)


def test_two_loras_on_different_targets_and_save_load_both(case, ids, tmp_path):
    model = case.build()
    q, v = (["query"], ["value"]) if case.id == "hf_bert" else (["q_proj"], ["v_proj"])
    a = attach(model, "lora", targets=q, name="a", r=2)
    b = attach(model, "lora", targets=v, name="b", r=4)
    perturb(a.parameters(), seed=1)
    perturb(b.parameters(), seed=2)
    expected = case.out(model, ids)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    fresh = case.build()
    load_delta(fresh, tmp_path / "a")
    load_delta(fresh, tmp_path / "b")
    assert torch.equal(case.out(fresh, ids), expected)


def test_duplicate_delta_name_is_refused(case):
    model = case.build()
    attach(model, "lora")
    with pytest.raises(DeltaError, match="already attached") as err:
        attach(model, "lora")
    assert "name=" in str(err.value)


def test_same_module_cannot_be_wrapped_twice(case):
    model = case.build()
    attach(model, "lora", name="one")
    with pytest.raises(DeltaError, match="already wrapped by delta 'one'"):
        attach(model, "lora", name="two")
    assert list(deltas_of(model)) == ["one"]


# ----------------------------------------------------------------------------------------- target matching
def test_target_matching_rules():
    model = hf_bert()   # BertForMaskedLM: names start with "bert."
    names = lambda t: [s.name for s in match_targets(model, t)]  # noqa: E731
    q0, q1 = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"
    assert names(q0) == [q0]                                        # exact
    assert names("encoder.layer.0.attention.self.query") == [q0]    # suffix of whole components
    assert names("query") == [q0, q1]                               # last component
    assert names(["self.query"]) == [q0, q1]
    assert names("re:.*layer\\.1\\..*\\.(query|key)") == [q1, q1.replace("query", "key")]
    with pytest.raises(DeltaError):
        names("uery")                # suffixes match whole name components only
    with pytest.raises(DeltaError):
        names("re:query")            # a regex must match the whole name


def test_target_matching_sees_through_wrappers():
    model = hf_bert()
    attach(model, "lora", targets=["query"])
    got = [s.name for s in match_targets(model, "re:.*query.*")]
    assert got == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"]


def test_targets_matching_nothing_list_module_names():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))   # no key table: own names
    with pytest.raises(DeltaError) as err:
        attach(model, "lora")  # the native default ["q_proj", "v_proj"]
    msg = str(err.value)
    assert "match no module" in msg and "'2.0'" in msg and "re:" in msg
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("fam, own, native", [
    ("hf_bert", "bert.encoder.layer.1.attention.self.query", ["layers.1.attn.q_proj"]),
    ("hf_bert", "bert.encoder.layer.0.output.dense", ["layers.0.mlp.fc2"]),
    ("hf_bert", "bert.encoder.layer.0", ["layers.0"]),
    ("hf_bert", "cls.predictions", ["lm_head"]),
    ("hf_roberta", "roberta.encoder.layer.0.attention.output.LayerNorm", ["layers.0.attn_norm"]),
    ("hf_gpt2", "transformer.h.0.attn.c_attn", ["layers.0.attn.q_proj", "layers.0.attn.k_proj",
                                                "layers.0.attn.v_proj"]),   # fused: stands for all three
    ("hf_gpt2", "transformer.h.1.mlp", ["layers.1.mlp"]),
    ("hf_gpt2", "transformer.h.1.attn", ["layers.1.attn"]),
    ("hf_t5", "decoder.block.1.layer.1.EncDecAttention.v", ["decoder.layers.1.cross_attn.v_proj"]),
    ("hf_t5", "encoder.block.0.layer.1.DenseReluDense.wi_0", ["encoder.layers.0.mlp.gate"]),
    ("hf_t5", "encoder.block.0.layer.1.DenseReluDense", ["encoder.layers.0.mlp"]),
])
def test_transformers_modules_get_their_native_names(fam, own, native):
    assert canonical_aliases(FAMILIES[fam].build())[own] == native


def test_containers_that_hold_more_than_one_native_sublayer_get_no_name():
    aliases = canonical_aliases(FAMILIES["hf_bert"].build())
    assert "bert.encoder.layer.0.attention" not in aliases      # holds attn_norm too (post-LN residual)
    assert "layers.0.mlp" not in {a for names in aliases.values() for a in names}   # intermediate + output split
    assert canonical_aliases(nn.Sequential(nn.Linear(2, 2))) == {}


@pytest.mark.parametrize("fam", ["hf_bert", "hf_roberta", "hf_gpt2", "hf_t5"])
@pytest.mark.parametrize("method", ["lora", "adapter", "intrinsic", "bitfit"])
def test_default_targets_are_the_same_modules_on_transformers_and_native_models(fam, method):
    hf = FAMILIES[fam].build()
    native = load_backbone(hf)[0]
    aliases = canonical_aliases(hf)
    h_hf, h_native = attach(hf, method), attach(native, method)
    if method == "bitfit":   # every bias (HF T5: none, so one added per linear layer, as in the native T5)
        assert h_hf.num_parameters() == h_native.num_parameters()
        return
    covered = {a for t in h_hf.targets for a in aliases[t]}
    assert set(h_native.targets) <= covered     # GPT-2's fused c_attn also covers k_proj
    fused = {"lora": 2, "intrinsic": 4}.get(method, 0) if fam == "hf_gpt2" else 0   # q, (k,) v -> one c_attn
    assert len(h_hf.targets) == len(h_native.targets) - fused


def test_unmatched_user_targets_warn_but_method_defaults_do_not(caplog):
    with caplog.at_level(logging.WARNING, logger="promptdelta.deltas.sites"):
        attach(FAMILIES["bert"].build(), "intrinsic", dim=4)      # default "mlp.gate": only T5 v1.1 has it
        assert not caplog.records
        attach(FAMILIES["bert"].build(), "lora", targets=["q_proj", "v_prj"])
    assert "['v_prj'] matched no module" in caplog.text


def test_user_targets_may_use_own_or_native_names():
    model = hf_bert()
    own = [s.name for s in match_targets(model, "query")]
    assert [s.name for s in match_targets(model, "q_proj")] == own
    assert [s.name for s in match_targets(model, "re:layers\\.\\d+\\.attn\\.q_proj")] == own


@pytest.mark.parametrize("bad", [[], "", 3, ["q", 4]])
def test_malformed_targets_are_refused(bad):
    with pytest.raises(DeltaError, match="pass a module name"):
        attach(hf_bert(), "bitfit", targets=bad)


def test_invalid_regex_is_refused():
    with pytest.raises(DeltaError, match="fix the pattern"):
        attach(hf_bert(), "bitfit", targets="re:(query")


# ----------------------------------------------------------------------------------------- registry, config
def test_unknown_config_key_names_key_and_valid_keys():
    with pytest.raises(ConfigError) as err:
        attach(hf_bert(), "lora", targets=["query"], rank=4)
    assert "'rank'" in str(err.value) and "'r'" in str(err.value) and "valid keys" in str(err.value)


def test_unknown_method_lists_known_methods():
    with pytest.raises(DeltaError) as err:
        attach(hf_bert(), "loar")
    assert "'loar'" in str(err.value) and "'lora'" in str(err.value) and "'bitfit'" in str(err.value)


def test_register_delta_refuses_duplicates_and_non_methods():
    class Dummy(DeltaMethod):
        pass

    with pytest.raises(DeltaError, match="already registered"):
        register_delta("lora", Dummy)
    with pytest.raises(DeltaError, match="subclass"):
        register_delta("not_a_method", dict)


def test_detached_handle_refuses_use(tmp_path):
    model = hf_bert()
    h = attach(model, "bitfit")
    h.detach()
    for call in (h.merge, h.detach, h.parameters, lambda: h.save(tmp_path / "x")):
        with pytest.raises(DeltaError, match="attach it again"):
            call()


# ----------------------------------------------------------------------------------------- bad checkpoints
@pytest.fixture
def saved(tmp_path):
    model = hf_bert()
    h = attach(model, "lora", targets=["query"])
    perturb(h.parameters())
    return h.save(tmp_path / "d")


def test_load_missing_folder_or_file(saved, tmp_path):
    with pytest.raises(MissingFileError, match="handle.save"):
        load_delta(hf_bert(), tmp_path / "nope")
    (saved / "delta.safetensors").unlink()
    with pytest.raises(MissingFileError, match="delta.safetensors"):
        load_delta(hf_bert(), saved)


def test_load_corrupt_safetensors(saved):
    data = (saved / "delta.safetensors").read_bytes()
    (saved / "delta.safetensors").write_bytes(data[: len(data) // 2])
    model = hf_bert()
    with pytest.raises(CheckpointError, match="save the delta again"):
        load_delta(model, saved)
    assert deltas_of(model) == {}


def test_load_corrupt_json(saved):
    (saved / "delta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_delta(hf_bert(), saved)


def test_load_with_wrong_tensor_keys_leaves_model_clean(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "delta.safetensors")
    tensors["extra.lora_A"] = torch.zeros(1)
    save_file(tensors, saved / "delta.safetensors")
    from promptdelta.deltas.base import write_manifest

    write_manifest(saved, ["delta.safetensors", "delta.json"])   # a consistent folder: the key check must catch it
    model = hf_bert()
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_delta(model, saved)
    assert deltas_of(model) == {}
    assert_same_state(model, snap)


def test_load_under_a_new_name_next_to_the_original(saved, ids):
    model = hf_bert()
    attach(model, "bitfit")
    h = load_delta(model, saved, name="other")
    assert list(deltas_of(model)) == ["bitfit", "other"] and h.name == "other"
