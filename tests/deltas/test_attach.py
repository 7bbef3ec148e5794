"""The attach mechanism: one matrix of methods x invariants on tiny HF and native BERT, then bad inputs."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from delta_helpers import assert_same_state, hf_bert, perturb, snapshot

from promptdelta.deltas import DeltaHandle, attach, deltas_of, load_delta, model_fingerprint, register_delta
from promptdelta.deltas.base import DeltaMethod, match_targets
from promptdelta.errors import CheckpointError, ConfigError, DeltaError, MissingFileError

METHODS = ["lora", "bitfit"]


def _attach(case, model, method: str, **kw) -> DeltaHandle:
    if method == "lora" and case.lora_targets is not None:
        kw.setdefault("targets", case.lora_targets)
    return attach(model, method, **kw)


def _trained(case, method: str, seed: int = 0):
    """A base model with a delta whose parameters are non-trivial."""
    model = case.build(seed)
    handle = _attach(case, model, method)
    perturb(handle.parameters())
    return model, handle


# ----------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("method", METHODS)
def test_fresh_delta_leaves_outputs_unchanged(case, method, ids):
    model = case.build()
    before = case.out(model, ids)
    handle = _attach(case, model, method)
    assert handle.num_parameters() > 0
    assert torch.equal(case.out(model, ids), before)


@pytest.mark.parametrize("method", METHODS)
def test_only_delta_parameters_are_trainable_and_change(case, method, ids):
    model, handle = _trained(case, method)
    delta_ids = {id(p) for p in handle.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == delta_ids
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(trainable, lr=0.5)
    case.out(model, ids).square().mean().backward()
    opt.step()
    changed = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
    delta_names = {k for k, p in model.named_parameters() if id(p) in delta_ids}
    assert changed and changed <= delta_names


@pytest.mark.parametrize("method", METHODS)
def test_merge_matches_unmerged_and_is_idempotent(case, method, ids):
    model, handle = _trained(case, method)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = case.out(model, ids)
    handle.merge()
    merged = case.out(model, ids)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)   # fp32 rounding of W0 + BA
    merged_sd = {k: v.clone() for k, v in model.state_dict().items()}
    handle.merge()
    assert all(torch.equal(v, merged_sd[k]) for k, v in model.state_dict().items())
    handle.unmerge()
    handle.unmerge()
    assert all(torch.equal(v, base_sd[k]) for k, v in model.state_dict().items())
    assert torch.equal(case.out(model, ids), unmerged)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_detach_restores_model_exactly(case, method, merged, ids):
    model = case.build()
    emb = next(model.parameters())
    emb.requires_grad_(False)          # a flag that is not the default must come back too
    snap, out0 = snapshot(model), case.out(model, ids)
    handle = _attach(case, model, method)
    perturb(handle.parameters())
    opt = torch.optim.SGD(handle.parameters(), lr=0.5)
    case.out(model, ids).sum().backward()
    opt.step()
    if merged:
        handle.merge()
    handle.detach()
    assert_same_state(model, snap)
    assert torch.equal(case.out(model, ids), out0)
    assert deltas_of(model) == {} and not hasattr(model, "_promptdelta_state")


@pytest.mark.parametrize("method", METHODS)
def test_save_load_onto_fresh_copy_reproduces_outputs(case, method, ids, tmp_path):
    model, handle = _trained(case, method)
    expected = case.out(model, ids)
    handle.save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert meta["method"] == method and meta["targets"] == handle.targets
    fresh = case.build()
    loaded = load_delta(fresh, tmp_path / "d")
    assert torch.equal(case.out(fresh, ids), expected)
    assert loaded.name == handle.name and loaded.config == handle.config and loaded.targets == handle.targets
    assert {k: v for k, v in loaded.state_dict().items()}.keys() == handle.state_dict().keys()
    assert {id(p) for p in fresh.parameters() if p.requires_grad} == {id(p) for p in loaded.parameters()}


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_for_other_shapes_is_refused(case, method, tmp_path):
    _, handle = _trained(case, method)
    handle.save(tmp_path / "d")
    other = case.build(0, hidden=48)
    with pytest.raises(CheckpointError, match="made for") as err:
        load_delta(other, tmp_path / "d")
    assert "architectures differ" in str(err.value) and "Load it onto the model" in str(err.value)
    assert deltas_of(other) == {}


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
def test_disabled_gives_base_outputs_then_restores(case, method, ids):
    model = case.build()
    base = case.out(model, ids)
    model, handle = _trained(case, method)
    tuned = case.out(model, ids)
    assert not torch.allclose(tuned, base)
    for merge in (False, True):
        if merge:
            handle.merge()
        with handle.disabled():
            torch.testing.assert_close(case.out(model, ids), base, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(case.out(model, ids), tuned, atol=1e-5, rtol=1e-5)
        assert handle.merged == merge


@pytest.mark.parametrize("method", METHODS)
def test_save_refuses_existing_folder_unless_overwrite(case, method, tmp_path):
    _, handle = _trained(case, method)
    handle.save(tmp_path / "d")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        handle.save(tmp_path / "d")
    handle.save(tmp_path / "d", overwrite=True)
    assert sorted(f.name for f in (tmp_path / "d").iterdir()) == ["delta.json", "delta.safetensors"]


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
    lora = _attach(case, model, "lora")
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
    lora = _attach(case, model, "lora", name="L")
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
    _attach(case, model, "lora")
    with pytest.raises(DeltaError, match="already attached") as err:
        _attach(case, model, "lora")
    assert "name=" in str(err.value)


def test_same_module_cannot_be_wrapped_twice(case):
    model = case.build()
    _attach(case, model, "lora", name="one")
    with pytest.raises(DeltaError, match="already wrapped by delta 'one'"):
        _attach(case, model, "lora", name="two")
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
    model = hf_bert()
    with pytest.raises(DeltaError) as err:
        attach(model, "lora")  # the native default ["q_proj", "v_proj"] does not exist in HF BERT
    msg = str(err.value)
    assert "match no module" in msg and "bert.encoder.layer.0.attention.self.query" in msg and "re:" in msg
    assert all(p.requires_grad for p in model.parameters())


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
