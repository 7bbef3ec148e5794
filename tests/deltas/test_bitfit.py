"""BitFit-specific behaviour: which biases train, groups, restore of the pretrained biases, bias-free models."""

from __future__ import annotations

import pytest
import torch
from delta_helpers import hf_bert, perturb
from safetensors.torch import load_file
from torch import nn

from promptdelta.deltas import attach, deltas_of
from promptdelta.errors import DeltaError


def _all_biases(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() for n, p in m.named_parameters(recurse=False) if n == "bias"}


def test_default_trains_every_bias_once(case):
    model = case.build()
    h = attach(model, "bitfit")
    assert {id(p) for p in h.parameters()} == _all_biases(model)
    assert len(h.parameters()) == len({id(p) for p in h.parameters()})   # tied biases counted once
    assert all(k.endswith(".bias") for k in h.state_dict())
    assert {id(p) for p in model.parameters() if p.requires_grad} == _all_biases(model)


def test_attention_group_only(case):
    model = case.build()
    h = attach(model, "bitfit", targets=case.attn_targets)
    n_layers = 2
    assert len(h.targets) == 4 * n_layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 * n_layers and all(n.endswith(".bias") for n in trainable)


def test_layernorm_group_only(case):
    model = case.build()
    h = attach(model, "bitfit", targets=case.norm_target)
    assert h.targets
    assert all(isinstance(m, nn.LayerNorm) for m in _modules_of(model, h))


def _modules_of(model, h):
    ids = {id(p) for p in h.parameters()}
    return [m for m in model.modules() if any(id(p) in ids for p in m.parameters(recurse=False))]


def test_detach_restores_pretrained_biases_after_training(case, ids):
    model = case.build()
    b0 = {k: v.clone() for k, v in model.state_dict().items()}
    h = attach(model, "bitfit")
    opt = torch.optim.SGD(h.parameters(), lr=1.0)
    case.out(model, ids).square().mean().backward()
    opt.step()
    assert any(not torch.equal(v, b0[k]) for k, v in model.state_dict().items())
    h.detach()
    assert all(torch.equal(v, b0[k]) for k, v in model.state_dict().items())


def test_checkpoint_holds_only_biases(case, tmp_path):
    model = case.build()
    h = attach(model, "bitfit")
    perturb(h.parameters())
    tensors = load_file(h.save(tmp_path / "b") / "delta.safetensors")
    from promptdelta.deltas.base import canonical_namer

    namer = canonical_namer(model)          # files hold canonical (native) names, on transformers models too
    assert set(tensors) == {namer(k) for k in h.state_dict()}
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in h.parameters())
    assert all(k.endswith(".bias") for k in tensors)


def test_bias_free_targets_are_refused():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    with pytest.raises(DeltaError, match="without a bias") as err:
        attach(model, "bitfit")
    assert "another delta method" in str(err.value)
    assert deltas_of(model) == {} and all(p.requires_grad for p in model.parameters())


def test_bias_free_modules_among_others_are_skipped():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    h = attach(model, "bitfit", targets="re:.*")
    assert h.targets == ["1"]


def test_two_bitfits_on_the_same_biases_are_refused():
    model = hf_bert()
    attach(model, "bitfit", name="a", targets=["query"])
    with pytest.raises(DeltaError, match="already belong to delta 'a'"):
        attach(model, "bitfit", name="b", targets=["query", "key"])
    attach(model, "bitfit", name="c", targets=["key"])   # disjoint groups are fine
    assert list(deltas_of(model)) == ["a", "c"]


def test_bitfit_inside_a_lora_wrapped_module_keeps_canonical_names():
    model = hf_bert()
    attach(model, "lora", targets=["query"])
    h = attach(model, "bitfit", targets=["query"])
    assert h.targets == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"]
    assert list(h.state_dict()) == [f"{t}.bias" for t in h.targets]
