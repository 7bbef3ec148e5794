"""LoRA checkpoints across a fused projection: one HF module holding several native ones (GPT-2's ``c_attn``
= q | k | v stacked along the output dim) and the native backbone that keeps them apart.

Driven by the family's ``KeyTable.fused`` (backbones/keymap.py); the family's own file names the parts.
A LoRA's update is ``dW = s B A`` with A (r, in), B (out, r). On a fused module the rows of dW are the parts'
rows in order, so (Hu et al. 2021, LoRA):

    fused -> split:  A_j = A,  B_j = B[j*o:(j+1)*o]          (exact)
    split -> fused:  A = A_j (all equal),  B = [B_q; B_k; B_v]  (a part without LoRA: B_j = 0, exact)

Split LoRAs with different A have ``dW = [B_q A_q; B_k A_k; B_v A_v]``, of rank up to 3r: no one rank-r LoRA
gives it, so that direction is refused. Other methods are left to ``checks._check_targets_exist`` (refused).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptdelta.errors import CheckpointError

_METHODS = ("lora",)   # methods whose checkpoint this module rewrites; tensor names under a target below
_A, _B = "lora_A", "lora_B"


def _key_table(model: nn.Module) -> Any:
    """The family's KeyTable for a transformers model or a native backbone; None for other models."""
    from promptdelta.backbones.registry import family_of, hf_family

    family = family_of(model) or hf_family(model)
    if family is None:
        return None
    try:
        return family.key_table(model.config)
    except Exception:   # a family registered for loading only has no key table: nothing is fused
        return None


def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")


def split_or_fuse(model: nn.Module, method: str, targets: list[str], tensors: dict[str, torch.Tensor],
                  folder: Path) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(targets, tensors) of a saved delta, under canonical names, rewritten for ``model`` where it sits on a
    fused module this model keeps split, or on split parts this model keeps fused. Unchanged otherwise."""
    table = _key_table(model)
    if method not in _METHODS or table is None or not table.fused:
        return targets, tensors
    from promptdelta.deltas.fingerprint import canonical_namer
    from promptdelta.deltas.sites import iter_sites

    namer = canonical_namer(model)
    order = {n: i for i, n in enumerate(namer(s.name) for s in iter_sites(model))}
    lost = [t for t in targets if t not in order]
    if not lost:
        return targets, tensors
    out_targets = [t for t in targets if t in order]
    out = {k: v for k, v in tensors.items() if not any(k.startswith(t + ".") for t in lost)}
    done: set[str] = set()
    for fused, parts in table.fused_modules():
        whole, pieces = _regex(fused), [_regex(p) for p in parts]
        groups: dict[str, list[str | None]] = {}   # fused name here -> its saved parts (None: no LoRA there)
        for t in lost:
            m = whole.match(t)
            names = [p.format(*m.groups()) for p in parts] if m else []
            if names and all(n in order for n in names) and _has(tensors, [t]):   # fused there, split here
                _split(t, names, tensors, out, folder)
                out_targets += names
                done.add(t)
            for j, piece in enumerate(pieces):                         # split there, fused here
                m = piece.match(t)
                if m and fused.format(*m.groups()) in order:
                    groups.setdefault(fused.format(*m.groups()), [None] * len(parts))[j] = t
        for name, saved in groups.items():
            if not _has(tensors, [t for t in saved if t]):
                continue
            _fuse(name, saved, tensors, out, folder, type(model).__name__)
            out_targets.append(name)
            done.update(t for t in saved if t)
    if not done:
        return targets, tensors
    left = [t for t in lost if t not in done]   # still lost: refused later by checks._check_targets_exist
    out.update({k: v for k, v in tensors.items() if any(k.startswith(t + ".") for t in left)})
    return sorted(out_targets, key=order.__getitem__) + left, out


def _has(tensors: dict[str, torch.Tensor], targets: list[str]) -> bool:
    """Both LoRA tensors of each target, under its canonical name (a format-1 folder keeps its own names: it is
    left as saved, and refused by the later checks)."""
    return all(f"{t}.{x}" in tensors for t in targets for x in (_A, _B))


def _split(fused: str, names: list[str], tensors: dict[str, torch.Tensor], out: dict[str, torch.Tensor],
           folder: Path) -> None:
    a = tensors[f"{fused}.{_A}"]   # (r, in)
    b = tensors[f"{fused}.{_B}"]   # (n * out_part, r)
    if b.shape[0] % len(names):
        raise CheckpointError(f"delta {folder}: {fused}.{_B} has {b.shape[0]} rows, not a multiple of its "
                              f"{len(names)} parts; save the delta again.")
    for name, rows in zip(names, b.chunk(len(names), dim=0)):   # rows: (out_part, r)
        out[f"{name}.{_A}"], out[f"{name}.{_B}"] = a.clone(), rows.clone()


def _fuse(fused: str, saved: list[str | None], tensors: dict[str, torch.Tensor], out: dict[str, torch.Tensor],
          folder: Path, model_class: str) -> None:
    present = [t for t in saved if t]
    a = [tensors[f"{t}.{_A}"] for t in present]            # each (r, in)
    b = {t: tensors[f"{t}.{_B}"] for t in present}         # each (out_part, r)
    if not all(torch.equal(a[0], x) for x in a[1:]):
        raise CheckpointError(
            f"delta {folder}: its LoRAs on {', '.join(present)} have different lora_A, so no one LoRA on "
            f"{fused} (one weight for all of them on this {model_class}) gives the same update; load it onto "
            f"the model it was trained on, or train with targets both sides share (e.g. o_proj, fc1, fc2).")
    zeros = torch.zeros_like(next(iter(b.values())))                     # a part without LoRA adds nothing
    out[f"{fused}.{_A}"] = a[0].clone()
    out[f"{fused}.{_B}"] = torch.cat([b[t] if t else zeros for t in saved], dim=0)   # (n * out_part, r)
