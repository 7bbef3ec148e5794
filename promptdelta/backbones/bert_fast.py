"""Native BERT/RoBERTa speed paths (used by ``bert.py``): the packing of real tokens, attention groups, and
the fused q/k/v product. Each is exact: tests compare them with transformers and with the plain paths
(tests/backbones/test_bert_packing.py, test_bert_fused_qkv.py)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionGroup:
    """Consecutive batch rows [first, first + rows) whose attention runs as one (rows, length) call, length =
    the group's longest row; ``dest`` (tokens,) places the group's packed tokens in that grid (None when every
    row has ``length`` tokens: the packed tokens are the grid), ``src`` (rows * length,) is the inverse (the
    token at each grid place, ``tokens`` = a zero row at padding) and ``keep`` (rows, length) marks real keys."""

    first: int
    rows: int
    length: int
    tokens: int
    dest: torch.Tensor | None
    keep: torch.Tensor | None
    src: torch.Tensor | None = None

    def grid(self, part: torch.Tensor) -> torch.Tensor:
        """The group's packed tokens (tokens, D) -> (rows, length, D), zeros at padding. A gather, not a
        scatter into zeros: index_select runs about 3x faster than index_copy here (forward)."""
        if self.src is None:
            return part.view(self.rows, self.length, -1)
        padded = torch.cat([part, part.new_zeros(1, part.shape[1])])                 # (tokens + 1, D)
        return padded.index_select(0, self.src).view(self.rows, self.length, -1)


@dataclass
class Packing:
    """Where the real tokens of a right- or left-padded (B, T) batch sit: their flat indices (N,) into B * T
    and their (row, col). Why: projections, MLP and norms are per token, so padding is pure waste for them.
    ``groups`` (see ``attention_groups``) and ``sizes`` (their token counts) let attention skip most padding
    too; None when the batch has more than ``MAX_GROUPS`` of them (then attention runs in the (B, T) layout)."""

    index: torch.Tensor   # (N,) flat positions b * T + t where attention_mask is 1
    row: torch.Tensor     # (N,) b
    col: torch.Tensor     # (N,) t
    batch: int
    length: int
    pad: torch.Tensor     # (B, T) True at padding
    groups: list[AttentionGroup] | None = None
    sizes: list[int] | None = None
    _biases: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, attention_mask: torch.Tensor | None) -> Packing | None:
        """None when there is no padding (nothing to save) or no real token at all."""
        if attention_mask is None or bool(attention_mask.bool().all()) or not bool(attention_mask.bool().any()):
            return None
        B, T = attention_mask.shape
        keep = attention_mask.bool()
        index = keep.reshape(-1).nonzero().squeeze(1)  # (N,)
        row = torch.div(index, T, rounding_mode="floor")
        groups = attention_groups(keep, index, row)
        return cls(index, row, index % T, B, T, ~keep, groups, None if groups is None else [g.tokens for g in groups])

    def group_bias(self, i: int, prefix_len: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive mask (rows, 1, 1, P + length) of group i (None when it has no padding), cached per layer."""
        g = self.groups[i]
        if g.keep is None:
            return None
        key = (i, prefix_len, dtype)
        if key not in self._biases:
            self._biases[key] = _attention_bias(g.keep, prefix_len, dtype)
        return self._biases[key]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) real tokens -> (B * T, D) with zeros at padding."""
        return x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, x)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (N, D), the real tokens."""
        return x.reshape(self.batch * self.length, x.shape[-1]).index_select(0, self.index)


GROUPS_ENV = "PROMPTDELTA_ATTENTION_GROUPS"


def _max_groups() -> int:
    """``PROMPTDELTA_ATTENTION_GROUPS`` (default 8; 0 = always the (B, T) layout), read once at import."""
    raw = os.environ.get(GROUPS_ENV, "8")
    if not raw.strip().isdigit():
        from promptdelta.errors import ConfigError

        raise ConfigError(f"{GROUPS_ENV}={raw!r} is not a count. Fix: set it to an integer >= 0 (0 = attention "
                          "in the padded (B, T) layout; 8, the default, for grouped attention).")
    return int(raw)


#: Most attention groups a packed batch may have (past it attention runs in the (B, T) layout: each group is
#: a few more calls, and many calls cost more than the padding they skip). 8 by default: on 2 idle cores the
#: grouped layout was faster for LoRA (docs/results/backbone-bert-2026-12-07.txt); on a host loaded by other processes its
#: extra calls (a thread barrier each) measured up to 2x slower in wall time: set 0 there.
MAX_GROUPS = _max_groups()
#: A group grows while its padded attention work (rows x longest^2) stays within this factor of the exact one.
GROUP_SLACK = 1.15


def attention_groups(keep: torch.Tensor, index: torch.Tensor, row: torch.Tensor) -> list[AttentionGroup] | None:
    """Split the rows (B,) with real tokens into consecutive groups for attention: a row joins the open group
    while rows x longest^2 <= GROUP_SLACK x sum(length^2) (sorted or equal lengths give few groups); rows
    without real tokens close a group and are skipped. None past MAX_GROUPS groups."""
    if MAX_GROUPS == 0:
        return None
    counts = keep.sum(1).tolist()
    spans: list[list[int]] = []   # [first, rows, longest, exact work]
    for b, c in enumerate(counts):
        if c == 0:
            spans.append(None)
            continue
        g = spans[-1] if spans else None
        if g is not None and (g[1] + 1) * max(g[2], c) ** 2 <= GROUP_SLACK * (g[3] + c * c):
            g[1], g[2], g[3] = g[1] + 1, max(g[2], c), g[3] + c * c
        else:
            spans.append([b, 1, c, c * c])
    spans = [g for g in spans if g is not None]
    if len(spans) > MAX_GROUPS:   # also when MAX_GROUPS is 0 (off)
        return None
    rank = (keep.cumsum(1) - 1).reshape(-1).index_select(0, index)   # (N,) a token's place among its row's real ones
    groups, start = [], 0
    for first, rows, length, _ in spans:
        n_tok = sum(counts[first:first + rows])
        if n_tok == rows * length:
            groups.append(AttentionGroup(first, rows, length, n_tok, None, None))
        else:
            dest = (row[start:start + n_tok] - first) * length + rank[start:start + n_tok]    # (tokens,)
            lengths = torch.tensor(counts[first:first + rows], device=keep.device)
            grid_keep = torch.arange(length, device=keep.device)[None, :] < lengths[:, None]  # (rows, length)
            src = torch.full((rows * length,), n_tok, dtype=torch.long, device=keep.device)
            src[dest] = torch.arange(n_tok, device=keep.device)                            # (rows * length,)
            groups.append(AttentionGroup(first, rows, length, n_tok, dest, grid_keep, src))
        start += n_tok
    return groups

def _attention_bias(attention_mask: torch.Tensor | None, prefix_len: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive SDPA mask (B, 1, 1, P + T): 0 where attended, dtype-min at padding; prefix always attended."""
    if attention_mask is None:
        return None
    keep = attention_mask.bool()  # (B, T)
    if prefix_len:
        keep = torch.cat([keep.new_ones(keep.shape[0], prefix_len), keep], dim=1)  # (B, P + T)
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def _plain_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)


def fused_qkv(attn: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """[q | k | v] (..., 3H) from ONE product with the concatenated weight (3H, H), or None when the modules do
    not allow it. Why: one GEMM (and one backward GEMM) instead of three, and no concatenation of outputs.

    Each of q_proj/k_proj/v_proj must be a plain ``nn.Linear`` without hooks, or a LoRA on one (``LoRALinear``,
    fused impl; disabled or merged counts as its base). With LoRA dropout active (training), the base product is
    still one GEMM and the LoRA terms take each LoRA's own dropped input (see ``_dropped_product``). The LoRA terms run as one low-rank
    update of the fused layer, x A_cat^T B_blk^T: A_cat (R, H) stacks their A; B_blk (3H, R) holds each
    (alpha/r) B in its own slot's rows and rank columns, zeros elsewhere: exactly the sum of the separate
    updates. When R is no rank of the native kernel (LoRA r=8 on all three: 24) the slots split in two
    products whose ranks are (q,k: 16 and v: 8). The weights are concatenated at every call (about 0.1% of a
    layer's time): no cache that a write through ``.data`` could leave stale; the concatenation is
    differentiable, so trainable q/k/v weights still get their gradients."""
    from promptdelta.deltas.lora import LoRALinear  # lazy: deltas import the backbones

    slots: list[tuple[nn.Linear, Any]] = []   # (base linear, its LoRA or None) for q, k, v
    dropping = False
    for m in (attn.q_proj, attn.k_proj, attn.v_proj):
        lora = None
        if type(m) is LoRALinear and not (m._forward_hooks or m._forward_pre_hooks):
            if m.enabled and not m.merged:
                if m.impl != "fused" or m.fan_in_fan_out or m.lora_A.dtype != x.dtype:
                    return None
                dropping = dropping or (m.training and isinstance(m.dropout, nn.Dropout) and m.dropout.p > 0)
                lora = m
            m = m.base
        if not _plain_linear(m) or m.weight.dtype != x.dtype or m.weight.device != x.device:
            return None
        slots.append((m, lora))
    if len({m.bias is None for m, _ in slots}) > 1:
        return None
    if dropping:
        return _dropped_product(x, slots)
    parts = [_fused_product(x, slots[a:b]) for a, b in _segments([0 if l is None else l.r for _, l in slots])]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)                     # (..., 3H)


def _segments(ranks: list[int]) -> list[tuple[int, int]]:
    """Slot ranges for the fused products: all three at once when their rank sum suits the native LoRA
    kernel (or there is no LoRA), else a split in two whose sums do (q,k | v or q | k,v), else one."""
    from promptdelta.kernels.native import RANKS

    fits = lambda rs: sum(rs) == 0 or sum(rs) in RANKS  # noqa: E731
    if fits(ranks):
        return [(0, 3)]
    split = next((j for j in (2, 1) if fits(ranks[:j]) and fits(ranks[j:])), None)
    return [(0, 3)] if split is None else [(0, split), (split, 3)]


def _fused_product(x: torch.Tensor, slots: list[tuple[nn.Linear, Any]]) -> torch.Tensor:
    """x (..., H) through the concatenated slots: x W_cat^T + b_cat (+ the block low-rank term) -> (..., S*H)."""
    weight = torch.cat([m.weight for m, _ in slots])                                     # (S*H, H)
    bias = None if slots[0][0].bias is None else torch.cat([m.bias for m, _ in slots])   # (S*H,)
    loras = [l for _, l in slots if l is not None]
    if not loras:
        return F.linear(x, weight, bias)
    from promptdelta.kernels import lora_linear

    same = len({l.scaling for l in loras}) == 1
    lora_a = torch.cat([l.lora_A for l in loras])                                       # (R, H)
    scale = loras[0].scaling if same else 1.0
    b_blk = _lora_block(slots, weight, scaled=not same)                                 # (S*H, R)
    return lora_linear(x, weight, bias, lora_a, b_blk, scale, impl="fused")             # (..., S*H)


def _lora_block(slots: list[tuple[nn.Linear, Any]], weight: torch.Tensor, scaled: bool) -> torch.Tensor:
    """B_blk (S*H, R): each LoRA's B (times its alpha/r when ``scaled``) in its slot's rows and its own rank
    columns, zeros elsewhere."""
    R = sum(l.r for _, l in slots if l is not None)
    blocks, offset = [], 0
    for m, lora in slots:
        if lora is None:
            blocks.append(weight.new_zeros(m.weight.shape[0], R))
            continue
        b = lora.lora_B * lora.scaling if scaled else lora.lora_B                        # (H, r)
        blocks.append(F.pad(b, (offset, R - offset - lora.r)))                           # (H, R)
        offset += lora.r
    return torch.cat(blocks)


def _dropped_product(x: torch.Tensor, slots: list[tuple[nn.Linear, Any]]) -> torch.Tensor:
    """LoRA with dropout on its input (training): y = x W_cat^T + b_cat + [s_i drop_i(x) A_i^T] B_blk^T, x (..., H)
    -> (..., 3H). Each LoRA draws its own mask through its own dropout module, in q, k, v order: the draws the
    three separate LoRALinear calls make, so both paths give the same output under one torch seed. Why: the
    frozen base stays one GEMM; the low-rank terms are small plain products."""
    lead, H = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, H)                                                                # (M, H)
    weight = torch.cat([m.weight for m, _ in slots])                                     # (3H, H)
    bias = None if slots[0][0].bias is None else torch.cat([m.bias for m, _ in slots])   # (3H,)
    y = F.linear(x2, weight, bias)                                                       # (M, 3H)
    loras = [l for _, l in slots if l is not None]
    xa = torch.cat([l.dropout(x2) @ (l.lora_A.t() * l.scaling) for l in loras], dim=-1)  # (M, R)
    y = torch.addmm(y, xa, _lora_block(slots, weight, scaled=False).t())                 # (M, 3H)
    return y.view(*lead, -1)
