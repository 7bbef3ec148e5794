"""Helpers for the delta tests: the tiny model families (native BERT, RoBERTa, GPT-2, T5, T5 v1.1 and their
transformers counterparts), and state snapshots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import transformers
from torch import nn

from promptdelta.backbones import (BertConfig, BertModel, GPT2Config, GPT2Model, RobertaConfig, RobertaModel,
                                   T5Config, T5Model)

V = 99   # vocabulary of every tiny model


# --------------------------------------------------------------------------------------------- builders
def _hf_bert(hidden: int, layers: int = 2) -> nn.Module:
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=V, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64))


def hf_bert(seed: int = 0, hidden: int = 32, layers: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return _hf_bert(hidden, layers).eval()


def native_bert(seed: int = 0, hidden: int = 32, layers: int = 2) -> nn.Module:
    """A native BERT loaded from ``hf_bert`` (the same weights) through ``load_backbone``."""
    backbones = pytest.importorskip("promptdelta.backbones")
    return backbones.load_backbone(hf_bert(seed, hidden, layers))[0].eval()


def _hf_roberta(hidden: int) -> nn.Module:
    return transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=V, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2))


def _hf_gpt2(hidden: int) -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=hidden, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0))


def _hf_t5(hidden: int) -> nn.Module:   # v1.1 / Flan-T5 layout: gated-GELU FFN (wi_0, wi_1, wo)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=hidden, d_kv=8, d_ff=37, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _bert(hidden: int) -> nn.Module:
    return BertModel(BertConfig(vocab_size=V, hidden_size=hidden, num_layers=2, num_heads=4, intermediate_size=37,
                                max_position_embeddings=64, has_lm_head=True))


def _roberta(hidden: int) -> nn.Module:
    return RobertaModel(RobertaConfig(vocab_size=V, hidden_size=hidden, num_layers=2, num_heads=4,
                                      intermediate_size=37, max_position_embeddings=66, has_lm_head=True))


def _gpt2(hidden: int) -> nn.Module:
    return GPT2Model(GPT2Config(vocab_size=V, n_positions=64, hidden_size=hidden, num_layers=2, num_heads=4,
                                eos_token_id=2))


def _t5(hidden: int) -> nn.Module:   # the original T5: ReLU FFN, head tied to the embeddings
    return T5Model(T5Config(vocab_size=V, d_model=hidden, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                            relative_attention_num_buckets=8, relative_attention_max_distance=20))


def _t5v11(hidden: int) -> nn.Module:   # 2 encoder, 3 decoder layers; gated FFN; n_heads * d_kv != d_model
    return T5Model(T5Config(vocab_size=V, d_model=hidden, d_kv=6, d_ff=37, num_layers=2, num_decoder_layers=3,
                            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                            feed_forward_proj="gated-gelu", tie_word_embeddings=False))


# --------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """One model family: how to build a tiny seeded model of it, and its logits on a padded batch."""

    id: str
    make: Callable[[int], nn.Module]      # hidden size -> a fresh model
    seq2seq: bool = False
    native: bool = True

    def build(self, seed: int = 0, hidden: int = 32) -> nn.Module:
        torch.manual_seed(seed)
        return self.make(hidden).eval()

    def out(self, model: nn.Module, ids: torch.Tensor, grad: bool = False, **kw) -> torch.Tensor:
        """Logits (B, T, V) (T5: over 4 decoder positions) of a batch whose first row ends in two pads.
        Without grad by default: CPU SDPA picks another kernel when no input needs a gradient (~1e-6 apart
        on T5), so outputs compared bit for bit are taken in the same grad mode."""
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        if self.seq2seq:
            kw["decoder_input_ids"] = ids[:, :4]
        with torch.set_grad_enabled(grad):
            return model(input_ids=ids, attention_mask=mask, **kw).logits


def _llama(hidden: int) -> nn.Module:   # the native Llama family, loaded from a transformers Llama (GQA)
    backbones = pytest.importorskip("promptdelta.backbones")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    return backbones.load_backbone(hf)[0]


NATIVE = [Family("bert", _bert), Family("roberta", _roberta), Family("gpt2", _gpt2),
          Family("t5", _t5, seq2seq=True), Family("t5v11", _t5v11, seq2seq=True), Family("llama", _llama)]
HF = [Family("hf_bert", _hf_bert, native=False), Family("hf_roberta", _hf_roberta, native=False),
      Family("hf_gpt2", _hf_gpt2, native=False), Family("hf_t5", _hf_t5, seq2seq=True, native=False)]
FAMILIES = {f.id: f for f in NATIVE + HF}


# --------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """A base model for the mechanism tests: how to build it and what BitFit groups fit its names."""

    id: str
    build: Callable[..., nn.Module]
    attn_targets: list[str]              # attention projections (for BitFit groups)
    norm_target: str                     # LayerNorm modules

    def out(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        return model(input_ids=ids, attention_mask=mask).logits   # (B, T, V)


CASES = [
    Case("hf_bert", hf_bert, ["query", "key", "value", "attention.output.dense"], "LayerNorm"),
    Case("native_bert", native_bert, ["q_proj", "k_proj", "v_proj", "o_proj"], "re:.*norm"),
]


# --------------------------------------------------------------------------------------------- state
def perturb(params, scale: float = 0.2, seed: int = 5) -> None:
    """Give delta parameters non-trivial values (a fresh LoRA has B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    """(state_dict clone, requires_grad by parameter name)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return sd, {k: p.requires_grad for k, p in model.named_parameters()}


def assert_same_state(model: nn.Module, snap: tuple[dict[str, torch.Tensor], dict[str, bool]]) -> None:
    sd, rg = snap
    now = model.state_dict()
    assert list(now) == list(sd)
    for k in sd:
        assert torch.equal(now[k], sd[k]), k
    assert {k: p.requires_grad for k, p in model.named_parameters()} == rg


# --------------------------------------------------------------------------------------------- one invariant check
MERGEABLE_METHODS = {"lora", "bitfit", "intrinsic"}


def check_delta_invariants(build: Callable[[], nn.Module], out: Callable[..., torch.Tensor], method: str,
                           folder, exact_zero_init: bool = True, **attach_kw) -> None:
    """The delta contract on one model, in one pass (``out(model, grad=False)`` -> logits):
    a fresh delta leaves the outputs unchanged (prefix: its ``disabled()`` does), only delta parameters get
    gradients and change, save -> load into a fresh model reproduces the outputs, merge = unmerged (where the
    method can merge), and detach restores every tensor, requires_grad flag and the outputs exactly."""
    from promptdelta.deltas import attach, deltas_of, load_delta

    model = build()
    snap, base = snapshot(model), out(model)
    handle = attach(model, method, **attach_kw)
    assert handle.num_parameters() > 0
    if method == "prefix":                   # attending to extra keys moves the softmax; disabled() must not
        with handle.disabled():
            assert torch.equal(out(model), base)
    elif exact_zero_init and method != "lora":
        assert torch.equal(out(model), base)
    else:                                    # LoRA: B = 0, only the fused matmul's rounding may differ
        torch.testing.assert_close(out(model), base, rtol=1e-5, atol=1e-6)
    delta = {id(p) for p in handle.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == delta
    perturb(handle.parameters())
    out(model, grad=True).float().square().mean().backward()
    assert all(p.grad is None for p in model.parameters() if id(p) not in delta)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in handle.parameters())
    tuned = out(model)
    assert not torch.allclose(tuned, base)
    handle.save(folder)
    fresh = build()
    loaded = load_delta(fresh, folder)
    assert loaded.targets == handle.targets
    torch.testing.assert_close(out(fresh), tuned, rtol=0, atol=0)
    if method in MERGEABLE_METHODS:
        handle.merge()
        # merged, the layer is one MKL GEMM; unmerged, the native LoRA layer's own GEMM (csrc/lora_gemm.h): two
        # summation orders through every layer (a tiny random T5 v1.1: 3e-5 on outputs up to 3.1; a wrong merge
        # is off by 1e-2 or more)
        torch.testing.assert_close(out(model), tuned, rtol=1e-4, atol=2e-5 * max(1.0, float(tuned.abs().max())))
        handle.unmerge()
        assert torch.equal(out(model), tuned)
    handle.detach()
    assert deltas_of(model) == {}
    assert_same_state(model, snap)
    assert torch.equal(out(model), base)
