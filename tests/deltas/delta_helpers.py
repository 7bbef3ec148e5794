"""Helpers for the delta tests: tiny transformers BERT (HF names) and native BERT (canonical names) cases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import transformers
from torch import nn


def hf_bert(seed: int = 0, hidden: int = 32, layers: int = 2) -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(cfg).eval()


def native_bert(seed: int = 0, hidden: int = 32, layers: int = 2) -> nn.Module:
    backbones = pytest.importorskip("promptdelta.backbones")
    return backbones.load_backbone(hf_bert(seed, hidden, layers))[0].eval()


@dataclass
class Case:
    """One base model family: how to build it, what LoRA targets fit it, and its output tensor."""

    id: str
    build: Callable[..., nn.Module]
    lora_targets: list[str] | None       # None = the LoRA default (native canonical names)
    attn_targets: list[str]              # attention projections (for BitFit groups)
    norm_target: str                     # LayerNorm modules

    def out(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        return model(input_ids=ids, attention_mask=mask).logits   # (B, T, V)


CASES = [
    Case("hf_bert", hf_bert, ["query", "value"], ["query", "key", "value", "attention.output.dense"], "LayerNorm"),
    Case("native_bert", native_bert, None, ["q_proj", "k_proj", "v_proj", "o_proj"], "re:.*norm"),
]


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
