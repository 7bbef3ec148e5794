"""The ladder's side network (see ``ladder.py`` for the method): narrow transformer blocks fed by gated ladder
connections, and the structural pruning that initialises them from the backbone's blocks.

    s_0 = down_0(h_0);  s_i = mu_i * down_i(h_i) + (1 - mu_i) * block_i(s_{i-1});  out = up(s_L)

A side block copies its backbone block's layout (the family's ``BlockSpec``, backbones/registry.py) at width
h: pre-norm (GPT-2, T5, Llama) or post-norm (BERT, RoBERTa), LayerNorm or RMSNorm (T5, Llama), plain or gated
FFN (T5 v1.1, SwiGLU), biases or none, T5's unscaled attention with the relative position bias of the heads
it kept, and (T5 decoder) cross-attention over the side encoder's output. Grouped-query attention (fewer
key/value heads) is pruned as if every query head had its own copy of its key/value head. Rotary positions
are not applied inside the side network (its heads keep only some of each head's dims).
Submodule names follow the backbone's canonical roles (``attn.q_proj``, ``mlp.fc1``, ``attn_norm`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn



@dataclass(frozen=True)
class SideSpec:
    """What a side block copies from its backbone's blocks."""

    pre_norm: bool                 # x + f(N(x)) (GPT-2, T5); else N(x + f(x)) (BERT, RoBERTa)
    act: Callable[[torch.Tensor], torch.Tensor]
    rms: bool = False              # RMSNorm (T5, Llama) instead of LayerNorm
    gated: bool = False            # T5 v1.1, SwiGLU: fc2(act(gate x) * fc1 x)
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim); T5: 1.0 (folded into its init)
    eps: float = 1e-5
    bias: bool = True              # linear layers with biases (False: T5, Llama)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 (Zhang & Sennrich 2019); weight only."""

    def __init__(self, h: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(h)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: (..., h)
        var = x.float().square().mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


def side_norm(h: int, spec: SideSpec) -> nn.Module:
    """The norm a side block of ``spec`` uses, at width h."""
    return RMSNorm(h, spec.eps) if spec.rms else nn.LayerNorm(h, eps=spec.eps)


def side_attention_bias(attention_mask: torch.Tensor | None, T: int, causal: bool, dtype: torch.dtype,
                        position_bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """Additive SDPA mask over T keys: (B | 1, n | 1, 1 | T, T) from padding (1 = keep), causality and a
    (1, n, T, T) position bias; None when there is neither padding nor a position bias (causality then goes
    through ``is_causal``)."""
    if attention_mask is None and position_bias is None:
        return None
    if attention_mask is None:
        keep = torch.ones(1, 1, 1, T, dtype=torch.bool, device=position_bias.device)
    else:
        keep = attention_mask.bool()[:, None, None, :]                                  # (B, 1, 1, T)
    if causal:
        keep = keep & torch.ones(T, T, dtype=torch.bool, device=keep.device).tril()     # (B, 1, T, T)
    base = torch.zeros((), dtype=dtype, device=keep.device) if position_bias is None else position_bias.to(dtype)
    return torch.where(keep, base, torch.finfo(dtype).min)


class SideAttention(nn.Module):
    """n heads of size hd at width h; keys/values from ``source`` (cross-attention) or from x."""

    def __init__(self, h: int, heads: int, head_dim: int, scale: float | None, bias: bool) -> None:
        super().__init__()
        self.heads, self.head_dim, self.scale = heads, head_dim, scale
        inner = heads * head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(h, inner, bias=bias) for _ in range(3))
        self.o_proj = nn.Linear(inner, h, bias=bias)
        self.register_buffer("head_index", torch.arange(heads), persistent=False)   # backbone heads kept

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, causal: bool,
                source: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        src = x if source is None else source                                          # (B, S, h)
        split = lambda t: t.view(B, t.shape[1], self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(src)), split(self.v_proj(src))  # (B, n, T|S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal and bias is None and T > 1,
                                           scale=self.scale)                           # (B, n, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))                        # (B, T, h)


class SideMLP(nn.Module):
    """fc2(act(fc1 x)), or gated: fc2(act(gate x) * fc1 x)."""

    def __init__(self, h: int, f: int, spec: SideSpec, bias: bool) -> None:
        super().__init__()
        self.act = spec.act
        self.fc1, self.fc2 = nn.Linear(h, f, bias=bias), nn.Linear(f, h, bias=bias)
        self.gate = nn.Linear(h, f, bias=bias) if spec.gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.act(self.fc1(x)) if self.gate is None else self.act(self.gate(x)) * self.fc1(x)   # (B, T, f)
        return self.fc2(z)                                                                         # (B, T, h)


class SideBlock(nn.Module):
    """A narrow transformer block (see the module doc); ``cross=True`` adds cross-attention (T5 decoder)."""

    def __init__(self, h: int, heads: int, head_dim: int, f: int, spec: SideSpec, dropout: float,
                 cross: bool = False) -> None:
        super().__init__()
        bias = spec.bias
        norm = lambda: side_norm(h, spec)  # noqa: E731
        self.pre_norm = spec.pre_norm
        self.attn_norm, self.attn = norm(), SideAttention(h, heads, head_dim, spec.attn_scale, bias)
        self.cross_attn_norm = norm() if cross else None
        self.cross_attn = SideAttention(h, heads, head_dim, spec.attn_scale, bias) if cross else None
        self.mlp_norm, self.mlp = norm(), SideMLP(h, f, spec, bias)
        self.dropout = nn.Dropout(dropout)

    def _sub(self, x: torch.Tensor, norm: nn.Module, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(f(norm(x)))
        return norm(x + self.dropout(f(x)))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, causal: bool, memory: torch.Tensor | None = None,
                memory_bias: torch.Tensor | None = None) -> torch.Tensor:   # x: (B, T, h)
        x = self._sub(x, self.attn_norm, lambda z: self.attn(z, bias, causal))
        if self.cross_attn is not None:
            x = self._sub(x, self.cross_attn_norm, lambda z: self.cross_attn(z, memory_bias, False, source=memory))
        return self._sub(x, self.mlp_norm, self.mlp)                                   # (B, T, h)


class SideNetwork(nn.Module):
    """The ladder over one stack: down-projections of L + 1 backbone states, L side blocks, L gates, and an
    up-projection back to H (zero-initialised) or, for a T5 side encoder, a final norm instead."""

    def __init__(self, H: int, h: int, blocks: list[SideBlock], causal: bool, gate_init: float,
                 gate_temperature: float, final_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.causal, self.temperature = causal, gate_temperature
        self.down = nn.ModuleList(nn.Linear(H, h) for _ in range(len(blocks) + 1))
        self.blocks = nn.ModuleList(blocks)
        self.gates = nn.Parameter(torch.full((len(blocks),), float(gate_init)))  # alpha_i
        self.final_norm = final_norm
        self.up = None if final_norm is not None else nn.Linear(h, H)
        if self.up is not None:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def states(self, hidden: Sequence[torch.Tensor], attention_mask: torch.Tensor | None,
               position_bias: torch.Tensor | None = None, memory: torch.Tensor | None = None,
               memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Side output s_L (B, T, h) from the backbone states h_0..h_L (each (B, T, H)); ``position_bias``
        (1, n_heads, T, T) of the backbone, ``memory`` (B, S, h) for cross-attention (T5 decoder)."""
        dtype, T = self.down[0].weight.dtype, hidden[0].shape[1]
        mem_bias = side_attention_bias(memory_mask, memory.shape[1], False, dtype) if memory is not None else None
        biases: dict[tuple[int, ...], torch.Tensor | None] = {}
        s = self.down[0](hidden[0].to(dtype))                                          # (B, T, h)
        for i, block in enumerate(self.blocks):
            heads = tuple(block.attn.head_index.tolist()) if position_bias is not None else ()
            if heads not in biases:
                pb = position_bias[:, list(heads)] if position_bias is not None else None   # (1, n, T, T)
                biases[heads] = side_attention_bias(attention_mask, T, self.causal, dtype, pb)
            mu = torch.sigmoid(self.gates[i] / self.temperature)
            s = mu * self.down[i + 1](hidden[i + 1].to(dtype)) + (1 - mu) * block(s, biases[heads], self.causal,
                                                                                  memory, mem_bias)
        return s if self.final_norm is None else self.final_norm(s)

    def forward(self, hidden: Sequence[torch.Tensor], attention_mask: torch.Tensor | None,
                position_bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.up(self.states(hidden, attention_mask, position_bias))              # (B, T, H)


class SideSeq2Seq(nn.Module):
    """T5's side network: a side encoder over the encoder states, whose (normed) output the side decoder
    cross-attends to; the side decoder's output is projected back to H."""

    def __init__(self, encoder: SideNetwork, decoder: SideNetwork) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, hidden: dict[str, list[torch.Tensor]], masks: dict[str, torch.Tensor | None],
                position_bias: dict[str, torch.Tensor]) -> torch.Tensor:
        memory = self.encoder.states(hidden["encoder"], masks["encoder"], position_bias.get("encoder"))   # (B, S, h)
        s = self.decoder.states(hidden["decoder"], masks["decoder"], position_bias.get("decoder"), memory,
                                masks["encoder"])
        return self.decoder.up(s)                                                      # (B, T, H)


# ------------------------------------------------------------------------------------------- pruning
def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in increasing index order."""
    return torch.topk(scores, k).indices.sort().values


def _w(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().float()


def _b(module: nn.Module) -> torch.Tensor:
    b = getattr(module, "bias", None)
    return torch.zeros(module.weight.shape[0]) if b is None else b.detach().float()


def _expand_kv(roles: dict[str, nn.Module], group: str, heads: int) -> dict[str, nn.Module]:
    """``roles`` with the k/v projections of a grouped-query attention expanded to one copy per query head."""
    q_rows = roles[f"{group}.q_proj"].weight.shape[0]
    hd = q_rows // heads
    out = dict(roles)
    for p in "kv":
        proj = roles[f"{group}.{p}_proj"]
        kv_rows = proj.weight.shape[0]
        if kv_rows == q_rows:
            continue
        if q_rows % kv_rows:
            raise ValueError(f"{group}.{p}_proj has {kv_rows} rows, which do not divide the {q_rows} query rows")
        rep = q_rows // kv_rows
        lin = nn.Linear(proj.weight.shape[1], q_rows, bias=getattr(proj, "bias", None) is not None)
        with torch.no_grad():
            lin.weight.copy_(_w(proj).view(kv_rows // hd, hd, -1).repeat_interleave(rep, 0).reshape(q_rows, -1))
            if lin.bias is not None:
                lin.bias.copy_(_b(proj).view(kv_rows // hd, hd).repeat_interleave(rep, 0).reshape(q_rows))
        out[f"{group}.{p}_proj"] = lin
    return out


def hidden_dims(blocks: Sequence[dict[str, nn.Module]], h: int) -> torch.Tensor:
    """The h residual dims to keep (for every side block): largest squared norms of the weight columns that
    read a dim (q, k, v, fc1, gate) plus the rows that write it (o, fc2), summed over ``blocks`` (role maps)."""
    score = 0
    for roles in blocks:
        for role, m in roles.items():
            if role.endswith(("q_proj", "k_proj", "v_proj", "fc1", "gate")):
                score = score + _w(m).square().sum(0)                                 # (H,)
            elif role.endswith(("o_proj", "fc2")):
                score = score + _w(m).square().sum(1)
    return _top(score, h)


def _head_rows(roles: dict[str, nn.Module], group: str, heads: int, keep_heads: int,
               hd_s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept heads, rows of q/k, rows of v = columns of o): hd_s dims in each of the keep_heads best heads."""
    w = {p: _w(roles[f"{group}.{p}_proj"]) for p in "qkvo"}
    hd = w["q"].shape[0] // heads
    qk = (w["q"].square().sum(1) + w["k"].square().sum(1)).view(heads, hd)
    vo = (w["v"].square().sum(1) + w["o"].square().sum(0)).view(heads, hd)
    kept = _top(qk.sum(1) + vo.sum(1), keep_heads)                                     # (keep_heads,)
    pick = lambda s: torch.cat([hh * hd + _top(s[hh], hd_s) for hh in kept.tolist()])  # noqa: E731
    return kept, pick(qk), pick(vo)


@torch.no_grad()
def _copy(dst: nn.Module, src: nn.Module, rows: torch.Tensor, cols: torch.Tensor | None = None) -> None:
    """dst <- src sliced: weight[rows][:, cols] (a norm: weight[rows]), bias[rows] where dst has one."""
    w = _w(src)[rows]
    dst.weight.copy_(w if cols is None else w[:, cols])
    if getattr(dst, "bias", None) is not None:
        dst.bias.copy_(_b(src)[rows])


def prune_into(side: SideBlock, roles: dict[str, nn.Module], hid: torch.Tensor, heads: int) -> None:
    """Fill ``side`` with its backbone block's weights (``roles``) sliced to the kept dims/heads/units."""
    for group in ("attn", "cross_attn"):
        att = getattr(side, group)
        if att is None:
            continue
        roles = _expand_kv(roles, group, heads)
        kept, qk, vo = _head_rows(roles, group, heads, att.heads, att.head_dim)
        att.head_index.copy_(kept)
        for p, rows in (("q", qk), ("k", qk), ("v", vo)):
            _copy(getattr(att, f"{p}_proj"), roles[f"{group}.{p}_proj"], rows, hid)
        _copy(att.o_proj, roles[f"{group}.o_proj"], hid, vo)
    mlp, fc1, fc2 = side.mlp, _w(roles["mlp.fc1"]), _w(roles["mlp.fc2"])
    score = fc1.square().sum(1) + fc2.square().sum(0)
    if mlp.gate is not None:
        score = score + _w(roles["mlp.gate"]).square().sum(1)
    units = _top(score, mlp.fc1.out_features)
    _copy(mlp.fc1, roles["mlp.fc1"], units, hid)
    if mlp.gate is not None:
        _copy(mlp.gate, roles["mlp.gate"], units, hid)
    _copy(mlp.fc2, roles["mlp.fc2"], hid, units)
    for name in ("attn_norm", "cross_attn_norm", "mlp_norm"):
        if getattr(side, name) is not None:
            _copy(getattr(side, name), roles[name], hid)


def random_init(side: SideBlock) -> None:
    """N(0, 0.02) weights and zero biases for every linear layer (``init="random"``)."""
    for m in side.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@torch.no_grad()
def select_dims(side: SideNetwork, hid: torch.Tensor) -> None:
    """Every down-projection starts as the selection of the kept residual dims ``hid``."""
    for down in side.down:
        down.weight.zero_()
        down.weight[torch.arange(len(hid)), hid] = 1.0
        down.bias.zero_()
