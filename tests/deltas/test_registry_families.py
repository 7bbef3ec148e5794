"""A fifth backbone family registered from this test file alone: a small pre-norm decoder (RMSNorm, SwiGLU,
grouped-query attention, no biases) with its own ``Family`` record. Every delta method attaches to it with
its defaults and passes the delta contract without a line of ``deltas/`` knowing the family; the ladder
builds a pre-norm RMSNorm gated side network from the record's ``BlockSpec``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from delta_helpers import V, check_delta_invariants
from torch import nn

from promptdelta.backbones import registry
from promptdelta.backbones.base import BackboneOutput, check_prefix_kv
from promptdelta.backbones.keymap import KeyTable
from promptdelta.deltas import attach
from promptdelta.errors import BackboneError


@dataclass
class ToyConfig:
    vocab_size: int = V
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2                  # grouped-query attention: 2 query heads per KV head
    intermediate_size: int = 37
    eps: float = 1e-6
    max_positions: int = 64

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, h: int, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(h)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)


class ToyAttention(nn.Module):
    def __init__(self, c: ToyConfig) -> None:
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, prefix=None) -> torch.Tensor:
        B, T, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(B, T, c.num_heads, c.head_dim).transpose(1, 2)        # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)     # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        if prefix is not None:
            k, v = torch.cat([prefix[0].to(k.dtype), k], 2), torch.cat([prefix[1].to(v.dtype), v], 2)
        rep = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)             # (B, nh, P + T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)                  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class ToyMLP(nn.Module):
    def __init__(self, c: ToyConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.gate(x)) * self.fc1(x))


class ToyBlock(nn.Module):
    def __init__(self, c: ToyConfig) -> None:
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(c.hidden_size, c.eps), ToyAttention(c)
        self.mlp_norm, self.mlp = RMSNorm(c.hidden_size, c.eps), ToyMLP(c)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, prefix=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), bias, prefix)
        return x + self.mlp(self.mlp_norm(x))


class ToyModel(nn.Module):
    """Pre-norm causal decoder with the native contract (``family``, ``prefix_kv``, ``input_embeddings``)."""

    family = "toy"
    kind = "clm"

    def __init__(self, c: ToyConfig) -> None:
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_positions = nn.Embedding(c.max_positions, c.hidden_size)
        self.layers = nn.ModuleList(ToyBlock(c) for _ in range(c.num_layers))
        self.final_norm = RMSNorm(c.hidden_size, c.eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, prefix_kv=None,
                output_hidden_states=False) -> BackboneOutput:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds   # (B, T, H)
        B, T, _ = x.shape
        x = x + self.embed_positions(torch.arange(T, device=x.device))
        c = self.config
        prefixes = check_prefix_kv(prefix_kv, c.num_layers, c.num_kv_heads, c.head_dim, B)
        P = next((p[0].shape[2] for p in prefixes if p is not None), 0)
        keep = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)      # (B, 1, T, T)
        if attention_mask is not None:
            keep = keep & attention_mask.bool()[:, None, None, :]
        keep = torch.cat([torch.ones(B, 1, T, P, dtype=torch.bool), keep], -1)              # (B, 1, T, P + T)
        bias = torch.where(keep, 0.0, torch.finfo(x.dtype).min).to(x.dtype)
        hidden = [x]
        for layer, prefix in zip(self.layers, prefixes):
            x = layer(x, bias, prefix)
            hidden.append(x)
        x = self.final_norm(x)
        return BackboneOutput(last_hidden_state=x, logits=self.lm_head(x),
                              hidden_states=tuple(hidden) if output_hidden_states else None)


def _no_hf(hf_config, hf_state):
    raise BackboneError("the toy family has no transformers checkpoints")


TOY = registry.Family(
    name="toy", model_types=("toy-test",), from_hf=_no_hf, key_table=lambda config: KeyTable("toy", ()),
    block_spec=lambda c: registry.BlockSpec(pre_norm=True, norm="rmsnorm", activation="silu", gated=True,
                                            positions="absolute", eps=c.eps, bias=False),
    attention_stacks=lambda m: registry.single_stack(m, m.config.num_kv_heads, m.config.head_dim),
    layer_stacks=lambda m: [m.layers], default_targets=registry.STANDARD_TARGETS)


@pytest.fixture(autouse=True)
def toy_family():
    registry.register_family(TOY)
    yield TOY
    registry.unregister_family("toy")


def build(seed: int = 0) -> ToyModel:
    torch.manual_seed(seed)
    return ToyModel(ToyConfig()).eval()


def out(model: nn.Module, grad: bool = False) -> torch.Tensor:
    x = torch.randint(3, V, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    mask[0, -2:] = 0
    with torch.set_grad_enabled(grad):
        return model(input_ids=x, attention_mask=mask).logits


@pytest.mark.parametrize("method", ["lora", "adapter", "bitfit", "prefix", "intrinsic", "ladder"])
def test_every_delta_method_passes_the_contract_on_the_toy_family(method, tmp_path):
    check_delta_invariants(build, out, method, tmp_path / "d")


@pytest.mark.parametrize("placement", ["pfeiffer", "parallel"])
def test_adapter_placements_on_the_toy_family(placement, tmp_path):
    check_delta_invariants(build, out, "adapter", tmp_path / "d", placement=placement)


def test_the_ladder_side_network_follows_the_block_spec():
    """Pre-norm, RMSNorm, gated FFN, no biases: what the record says, not what a name table in deltas/ says."""
    from promptdelta.deltas.side import RMSNorm as SideRMSNorm

    model = build()
    handle = attach(model, "ladder")
    side = handle._method.wrapper.side
    block = side.blocks[0]
    assert block.pre_norm and isinstance(block.attn_norm, SideRMSNorm) and block.mlp.gate is not None
    assert block.attn.q_proj.bias is None and side.causal


def test_the_record_drives_prefix_stacks_and_fsdp_units():
    from promptdelta.train.distributed import fsdp_units

    model = build()
    assert fsdp_units(model) == list(model.layers)
    handle = attach(model, "prefix", num_tokens=3)
    assert handle.targets == ["layers.0.attn", "layers.1.attn"]
    k, v = handle._method.sets["layers"].key_values()
    assert k.shape == (2, 2, 3, 8)   # (layers, KV heads, P, head_dim)


def test_family_defaults_come_from_the_record(toy_family):
    custom = registry.Family(**{**{f: getattr(TOY, f) for f in TOY.__dataclass_fields__},
                                "default_targets": {"lora": ("fc1",)}})
    registry.register_family(custom, overwrite=True)
    model = build()
    assert attach(model, "lora").targets == ["layers.0.mlp.fc1", "layers.1.mlp.fc1"]


def test_all_linear_and_modules_to_save_on_the_toy_family(tmp_path):
    check_delta_invariants(build, out, "lora", tmp_path / "a", targets="all-linear")
    check_delta_invariants(build, out, "adapter", tmp_path / "b", modules_to_save=["lm_head"])
