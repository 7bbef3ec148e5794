"""LoRA and BitFit on every native family (BERT, RoBERTa, GPT-2, T5), each loaded from a tiny random
transformers model through ``load_backbone``: the invariants every delta must keep on every backbone."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers
from delta_helpers import assert_same_state, perturb, snapshot
from torch import nn

from promptdelta.backbones import load_backbone
from promptdelta.deltas import BitFitConfig, attach, deltas_of, load_delta
from promptdelta.errors import DeltaError

V, H, L = 99, 32, 2   # vocab, hidden, layers of every tiny model


def _bert() -> nn.Module:
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64))


def _roberta() -> nn.Module:
    return transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2))


def _gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=H, n_layer=L, n_head=4, n_positions=64, bos_token_id=98, eos_token_id=98))


def _t5() -> nn.Module:
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=H, d_kv=8, d_ff=37, num_layers=L, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1))


@dataclass(frozen=True)
class Family:
    """A family: its tiny HF model, how many modules the default LoRA targets wrap, whether it has biases."""

    name: str
    hf: Callable[[], nn.Module]
    default_lora_sites: int
    has_bias: bool = True

    def build(self) -> nn.Module:
        """A fresh native model, always with the same weights (copied from one cached HF model)."""
        return load_backbone(_hf_model(self))[0].eval()

    def out(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) over a batch whose first row ends in two padding tokens."""
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        if self.name == "t5":
            return model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4]).logits  # (B, 4, V)
        return model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)


@functools.cache
def _hf_model(fam: Family) -> nn.Module:
    """The family's tiny HF model, built once (seed 0); load_backbone copies its weights, never shares them."""
    torch.manual_seed(0)
    return fam.hf().eval()


FAMILIES = [
    Family("bert", _bert, 2 * L),
    Family("roberta", _roberta, 2 * L),
    Family("gpt2", _gpt2, 2 * L),
    Family("t5", _t5, 2 * L + 4 * L, has_bias=False),   # encoder self + decoder self and cross: q, v
]
METHODS = ["lora", "bitfit"]


@pytest.fixture(params=FAMILIES, ids=[f.name for f in FAMILIES])
def fam(request) -> Family:
    return request.param


# BitFit on a bias-free model: the delta library adds zero biases (BitFitConfig.add_biases) when it has that
# option; before it had, BitFit refused such models. Both behaviours are tested, whichever is present.
ADDS_BIASES = "add_biases" in {f.name for f in dataclasses.fields(BitFitConfig)}


def _skip_bias_free(fam: Family) -> None:
    if not fam.has_bias and not ADDS_BIASES:
        pytest.skip(f"{fam.name} has no biases and BitFitConfig has no add_biases: BitFit refuses it "
                    "(see test_bitfit_on_bias_free_t5)")


@pytest.fixture(params=METHODS)
def method(request, fam: Family) -> str:
    if request.param == "bitfit":
        _skip_bias_free(fam)
    return request.param


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, V, (3, 7), generator=g)   # (B, T); ids 0-2 are special/pad in some families


def _base_params(model: nn.Module, handle) -> dict[str, torch.Tensor]:
    """Every model parameter that is not one of the handle's delta parameters (cloned)."""
    delta = {id(p) for p in handle.parameters()}
    return {k: p.detach().clone() for k, p in model.named_parameters() if id(p) not in delta}


def test_families_are_native(fam: Family) -> None:
    model = fam.build()
    assert model.family == fam.name
    assert not isinstance(model, transformers.PreTrainedModel)


def test_default_lora_targets_fit_every_family(fam: Family) -> None:
    model = fam.build()
    h = attach(model, "lora")   # no targets: the LoRA default
    assert len(h.targets) == fam.default_lora_sites
    assert all(t.endswith(("attn.q_proj", "attn.v_proj")) for t in h.targets)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in h.parameters()}


def test_fresh_delta_leaves_outputs_unchanged(fam: Family, method: str, ids: torch.Tensor) -> None:
    model = fam.build()
    with torch.no_grad():
        before = fam.out(model, ids)
        h = attach(model, method)
        after = fam.out(model, ids)
    assert h.num_parameters() > 0
    if method == "bitfit":   # nothing changed at all: the same biases
        assert torch.equal(before, after)
    else:                    # B = 0: only the fused matmul's rounding may differ
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_step_changes_only_delta_params(fam: Family, method: str, ids: torch.Tensor) -> None:
    model = fam.build()
    h = attach(model, method)
    base = _base_params(model, h)
    delta = {k: p.detach().clone() for k, p in h.named_parameters()}
    opt = torch.optim.SGD(h.parameters(), lr=0.5)
    fam.out(model, ids).float().pow(2).mean().backward()
    assert all(p.grad is None for k, p in model.named_parameters() if k in base)
    opt.step()
    for k, p in model.named_parameters():
        if k in base:
            assert torch.equal(p, base[k]), f"frozen parameter {k} changed"
    changed = [k for k, p in h.named_parameters() if not torch.equal(p, delta[k])]
    assert changed, "no delta parameter moved after an optimizer step"
    if method == "lora":   # B starts at 0, so the first step moves every B (A's gradient is B^T ... = 0)
        assert {k for k in changed if k.endswith("lora_B")} == {k for k in delta if k.endswith("lora_B")}


def test_merge_equals_unmerged(fam: Family, ids: torch.Tensor) -> None:
    model = fam.build()
    h = attach(model, "lora", r=4, alpha=8)
    perturb(h.parameters())
    with torch.no_grad():
        unmerged = fam.out(model, ids)
        h.merge()
        merged = fam.out(model, ids)
        h.unmerge()
        again = fam.out(model, ids)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, unmerged)
    assert not torch.allclose(merged, _fresh_out(fam, ids), atol=1e-3), "the perturbed delta had no effect"


def test_bitfit_merge_is_a_noop(fam: Family, ids: torch.Tensor) -> None:
    _skip_bias_free(fam)
    model = fam.build()
    h = attach(model, "bitfit")
    perturb(h.parameters())
    with torch.no_grad():
        out = fam.out(model, ids)
        h.merge()
        assert torch.equal(fam.out(model, ids), out)


def _fresh_out(fam: Family, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return fam.out(fam.build(), ids)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_detach_restores_state_and_outputs(fam: Family, method: str, ids: torch.Tensor, merged: bool) -> None:
    model = fam.build()
    snap = snapshot(model)
    with torch.no_grad():
        before = fam.out(model, ids)
    h = attach(model, method)
    perturb(h.parameters())
    if merged:
        h.merge()
    with torch.no_grad():
        assert not torch.equal(fam.out(model, ids), before)
    h.detach()
    assert deltas_of(model) == {}
    assert_same_state(model, snap)
    with torch.no_grad():
        assert torch.equal(fam.out(model, ids), before)


def test_save_load_round_trip(fam: Family, method: str, ids: torch.Tensor, tmp_path: Path) -> None:
    model = fam.build()
    h = attach(model, method)
    perturb(h.parameters())
    with torch.no_grad():
        out = fam.out(model, ids)
    h.save(tmp_path / "delta")
    other = fam.build()   # same pretrained weights, fresh object
    h2 = load_delta(other, tmp_path / "delta")
    assert h2.method == method and h2.targets == h.targets
    for (k, p), (k2, p2) in zip(h.named_parameters(), h2.named_parameters()):
        assert k == k2 and torch.equal(p, p2)
    with torch.no_grad():
        assert torch.equal(fam.out(other, ids), out)


def test_bitfit_on_bias_free_t5() -> None:
    """T5 has no bias: BitFit refuses it with a DeltaError naming the fix, unless it may add zero biases."""
    model = next(f for f in FAMILIES if f.name == "t5").build()
    assert not any(k.endswith("bias") for k in model.state_dict() if "relative_attention_bias" not in k)
    snap = snapshot(model)
    refuse = {"add_biases": False} if ADDS_BIASES else {}
    for targets in (None, ["q_proj", "v_proj"]):
        with pytest.raises(DeltaError, match="another delta method") as err:
            attach(model, "bitfit", targets=targets, **refuse)
        assert "bias" in str(err.value)
        if ADDS_BIASES:
            assert "add_biases=True" in str(err.value)
    assert deltas_of(model) == {}
    assert_same_state(model, snap)   # the refused attach froze nothing
    if ADDS_BIASES:   # the default adds one zero bias per linear layer of the bias-free backbone
        n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
        h = attach(model, "bitfit")
        assert len(h.targets) == n_linear and all(k.endswith(".bias") for k, _ in h.named_parameters())
