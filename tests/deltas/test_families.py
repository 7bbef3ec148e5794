"""The invariant matrix: every delta method x every family it applies to (native BERT, RoBERTa, GPT-2, T5,
T5 v1.1 and the transformers BERT/RoBERTa/GPT-2/T5), each attached with its *default* targets and config.

Where a method does not apply, the refusal is tested here too (prefix on transformers encoders, the ladder on
transformers GPT-2 and T5, which load_backbone converts). Method-specific exceptions to an invariant are named in the
test and explained in the method's module doc (a fresh prefix changes outputs; adapters and the ladder cannot
be merged); each method's own maths lives in its own test file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from delta_helpers import FAMILIES, Family, assert_same_state, perturb, snapshot
from torch import nn

from promptdelta.deltas import attach, deltas_of, load_delta
from promptdelta.errors import CheckpointError, DeltaError

METHODS = ["lora", "adapter", "bitfit", "prefix", "intrinsic", "ladder"]
MERGEABLE = {"lora", "bitfit", "prefix", "intrinsic"}   # prefix: merge folds the MLP; bitfit: a no-op
NOT_APPLICABLE = {   # (method, family) -> the words the refusal must contain
    # prefix on transformers BERT / RoBERTa goes through their cache too (prefix_hf.py): no refusal left
    # the ladder runs on transformers GPT-2 (fused c_attn split) and T5 (bias read through compute_bias) too
}
CELLS = [(m, f) for m in METHODS for f in FAMILIES if (m, f) not in NOT_APPLICABLE]


def _ids(cells):
    return [f"{m}-{f}" for m, f in cells]


@pytest.fixture(params=CELLS, ids=_ids(CELLS))
def cell(request) -> tuple[str, Family]:
    method, fam = request.param
    return method, FAMILIES[fam]


@pytest.fixture(params=[c for c in CELLS if c[0] in MERGEABLE], ids=_ids([c for c in CELLS if c[0] in MERGEABLE]))
def mergeable(request) -> tuple[str, Family]:
    method, fam = request.param
    return method, FAMILIES[fam]


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 99, (3, 7), generator=g)   # (B, T); ids 0-2 are special/pad in some families


def _trained(method: str, fam: Family, seed: int = 0):
    """A model with the method attached by default and non-trivial delta parameters."""
    model = fam.build(seed)
    handle = attach(model, method)
    perturb(handle.parameters())
    return model, handle


def _hooks(model: nn.Module) -> int:
    return len(model._forward_hooks) + len(model._forward_pre_hooks)


# --------------------------------------------------------------------------------------------- invariants
def test_default_attach_leaves_outputs_unchanged(cell, ids):
    method, fam = cell
    model = fam.build()
    before = fam.out(model, ids)
    handle = attach(model, method)          # no targets, no config: the method's defaults
    assert handle.targets and handle.num_parameters() > 0
    after = fam.out(model, ids)
    if method == "prefix":                  # attending to extra keys always moves the softmax (prefix.py doc)
        assert not torch.allclose(after, before)
        with handle.disabled():
            assert torch.equal(fam.out(model, ids), before)
    elif method == "lora":                  # B = 0; only the fused matmul's rounding may differ
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(after, before)


def test_only_delta_parameters_train_and_change(cell, ids):
    method, fam = cell
    model, handle = _trained(method, fam)
    delta = {id(p) for p in handle.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == delta
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    fam.out(model, ids, grad=True).square().mean().backward()
    assert all(p.grad is None for p in model.parameters() if id(p) not in delta)
    torch.optim.SGD(handle.parameters(), lr=0.5).step()
    changed = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
    assert changed and changed <= {k for k, p in model.named_parameters() if id(p) in delta}


DETACH = [(m, f, merged) for m, f in CELLS for merged in ((False, True) if m in MERGEABLE else (False,))]


@pytest.mark.parametrize("method, fam, merged", DETACH,
                         ids=[f"{m}-{f}{'-merged' if merged else ''}" for m, f, merged in DETACH])
def test_detach_restores_outputs_and_state_exactly(method, fam, merged, ids):
    fam = FAMILIES[fam]
    model = fam.build()
    next(model.parameters()).requires_grad_(False)     # a flag that is not the default must come back too
    snap, out0, hooks = snapshot(model), fam.out(model, ids), _hooks(model)
    handle = attach(model, method)
    perturb(handle.parameters())
    fam.out(model, ids, grad=True).square().mean().backward()
    torch.optim.SGD(handle.parameters(), lr=0.5).step()
    if merged:
        handle.merge()
    assert not torch.equal(fam.out(model, ids), out0)
    handle.detach()
    assert_same_state(model, snap)
    assert torch.equal(fam.out(model, ids), out0)
    assert deltas_of(model) == {} and _hooks(model) == hooks and not hasattr(model, "_promptdelta_state")


def test_save_then_load_into_a_fresh_backbone_reproduces_outputs(cell, ids, tmp_path: Path):
    method, fam = cell
    model, handle = _trained(method, fam)
    expected = fam.out(model, ids)
    handle.save(tmp_path / "d")
    fresh = fam.build()
    loaded = load_delta(fresh, tmp_path / "d")
    assert loaded.method == method and loaded.targets == handle.targets
    assert torch.equal(fam.out(fresh, ids), expected)
    assert {id(p) for p in fresh.parameters() if p.requires_grad} == {id(p) for p in loaded.parameters()}


def test_merged_equals_unmerged_and_merging_twice_is_a_no_op(mergeable, ids):
    method, fam = mergeable
    model, handle = _trained(method, fam)
    unmerged = fam.out(model, ids)
    handle.merge()
    assert handle.merged
    merged_sd = {k: v.clone() for k, v in model.state_dict().items()}
    merged = fam.out(model, ids)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)   # fp32 rounding of W0 + dW
    handle.merge()
    now = model.state_dict()
    assert now.keys() == merged_sd.keys() and all(torch.equal(v, merged_sd[k]) for k, v in now.items())
    assert torch.equal(fam.out(model, ids), merged)
    handle.unmerge()
    handle.unmerge()
    assert not handle.merged
    if method != "prefix":   # prefix: folding is for good, and changes no output (exact unmerge not needed)
        assert torch.equal(fam.out(model, ids), unmerged)


@pytest.mark.parametrize("method", ["adapter", "ladder"])
def test_merge_is_refused_where_the_maths_does_not_allow(method, ids):
    fam = FAMILIES["bert"]
    model, handle = _trained(method, fam)
    out, sd = fam.out(model, ids), snapshot(model)
    for _ in range(2):
        with pytest.raises(DeltaError, match="cannot be merged") as err:
            handle.merge()
        assert "attached for inference" in str(err.value)
    handle.unmerge()                         # nothing to undo, no error
    assert not handle.merged and torch.equal(fam.out(model, ids), out)
    assert_same_state(model, sd)


def test_a_checkpoint_for_another_model_is_refused(cell, tmp_path: Path):
    method, fam = cell
    _, handle = _trained(method, fam)
    handle.save(tmp_path / "d")
    for other, words in ((fam.build(0, hidden=48), "architectures differ"), (fam.build(seed=1), "strict=False")):
        hooks = _hooks(other)
        with pytest.raises(CheckpointError, match=words) as err:
            load_delta(other, tmp_path / "d")
        assert "Load it onto the model" in str(err.value) or "load it onto the checkpoint" in str(err.value)
        assert deltas_of(other) == {} and _hooks(other) == hooks
        assert all(p.requires_grad for p in other.parameters())


def test_disabled_gives_the_base_outputs_then_the_delta_again(cell, ids):
    method, fam = cell
    base = fam.out(fam.build(), ids)
    model, handle = _trained(method, fam)
    tuned = fam.out(model, ids)
    assert not torch.allclose(tuned, base)
    for merge in (False, True) if method in MERGEABLE else (False,):
        if merge:
            handle.merge()
        with handle.disabled():
            torch.testing.assert_close(fam.out(model, ids), base, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fam.out(model, ids), tuned, rtol=1e-5, atol=1e-5)
        assert handle.merged == merge


# --------------------------------------------------------------------------------------------- where it does not apply
@pytest.mark.parametrize("method, fam", sorted(NOT_APPLICABLE), ids=_ids(sorted(NOT_APPLICABLE)))
def test_methods_refuse_families_they_do_not_apply_to_and_say_why(method, fam):
    model = FAMILIES[fam].build()
    snap, hooks = snapshot(model), _hooks(model)
    with pytest.raises(DeltaError, match=NOT_APPLICABLE[method, fam]) as err:
        attach(model, method)
    assert "use" in str(err.value) or "load_backbone" in str(err.value)
    assert deltas_of(model) == {} and _hooks(model) == hooks
    assert_same_state(model, snap)


# --------------------------------------------------------------------------------------------- all-linear, modules_to_save
@pytest.mark.parametrize("fam", ["bert", "gpt2", "t5v11"])
def test_all_linear_and_modules_to_save_on_native_families(fam, tmp_path: Path):
    from delta_helpers import check_delta_invariants

    family = FAMILIES[fam]
    out = lambda m, grad=False: family.out(m, ids_(), grad=grad)   # noqa: E731
    handle = attach(family.build(), "lora", targets="all-linear")
    assert all(t != "lm_head" and not t.endswith("decoder") and "embed" not in t for t in handle.targets)
    check_delta_invariants(family.build, out, "lora", tmp_path / "a", targets="all-linear")
    check_delta_invariants(family.build, out, "bitfit", tmp_path / "b", modules_to_save=["lm_head"])


def ids_() -> torch.Tensor:
    return torch.randint(3, 99, (3, 7), generator=torch.Generator().manual_seed(1))
