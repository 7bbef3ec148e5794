"""Many LoRA deltas on one backbone, served in one mixed batch (Punica's SGMV, Chen et al. 2023).

    y_i = x_i W^T + b + s_{a_i} (x_i A_{a_i}^T) B_{a_i}^T       a_i = the delta row i names; None = base only

Several task deltas share one frozen backbone. Two LoRA deltas cannot wrap the same module (``attach``
refuses), so the task deltas a server holds live in the model's **LoRA bank**: ``add_delta(model, folder or
handle, name)`` loads (or takes) a LoRA delta, keeps its factors under its name and detaches it, so the model
itself stays the plain backbone. ``route_rows(model, names)`` is a context manager under which every LoRA site
(a module some banked or attached LoRA delta adapts) computes row i with delta ``names[i]`` through the
multi-adapter kernel (``kernels.lora_linear_multi``), all rows in one batch. LoRA deltas attached the usual
way (``pd.attach(model, "lora", name=...)`` on modules no other LoRA wraps) can be named too.

Rows: ``names`` has one entry per sequence of the batch (B). A site whose input has B * k leading rows (a
flattened (B*T, H) activation, or k candidates per prompt) repeats each id k times, so ids follow the rows.

Classifiers (``load_many`` / ``predict_mixed``): several classifier folders on one backbone. Rows are grouped
by classifier for the template (each has its own tokenisation and soft tokens); the groups' input embeddings
are right-padded to one length and concatenated, the backbone runs once with per-row delta ids, and each
group's hidden states go back through its own readout and verbalizer. Padding is exact (padded keys get no
attention). Classifiers whose scoring needs more than one forward (T5's decoder, multi-token label words
scored by sequence likelihood) run as their own routed batch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptdelta.deltas.base import META_FILE, DeltaHandle, deltas_of, load_delta
from promptdelta.deltas.sites import DeltaWrapper, iter_sites
from promptdelta.errors import DeltaError
from promptdelta.kernels import lora_linear_multi

logger = logging.getLogger(__name__)

_BANK_ATTR = "_promptdelta_lora_bank"
__all__ = ["add_delta", "remove_delta", "served_deltas", "route_rows", "RoutedLinear", "load_many",
           "predict_mixed"]


@dataclass
class _Factors:
    """One delta's update at one module: A (r, K), B (N, r), scale alpha / r."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


@dataclass
class _Bank:
    """Kept on the model: banked deltas by name -> {canonical module name: factors}; stacks built per use."""

    entries: dict[str, dict[str, _Factors]] = field(default_factory=dict)
    stacks: dict[tuple, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


def _bank(model: nn.Module, create: bool = False) -> _Bank | None:
    bank = model.__dict__.get(_BANK_ATTR)
    if bank is None and create:
        bank = _Bank()
        model.__dict__[_BANK_ATTR] = bank
    return bank


def _lora_handles(model: nn.Module) -> dict[str, DeltaHandle]:
    return {n: h for n, h in deltas_of(model).items() if h.method == "lora"}


def served_deltas(model: nn.Module) -> list[str]:
    """Names a row may route to: banked deltas (load order), then LoRA deltas attached to the model."""
    bank = _bank(model)
    return [*(bank.entries if bank else ()), *_lora_handles(model)]


def _factors_of(handle: DeltaHandle) -> dict[str, _Factors]:
    """{module: factors} of an attached LoRA delta, read from its state dict (A, B do not change on merge)."""
    if handle.method != "lora":
        raise DeltaError(f"delta {handle.name!r} is a {handle.method!r} delta; mixed batches serve LoRA deltas "
                         f"only (the multi-adapter kernel computes LoRA updates): serve it on its own.")
    scale = float(handle.config.alpha) / float(handle.config.r)
    state = handle.state_dict()
    return {key[:-len(".lora_A")]: _Factors(t.clone(), state[key[:-1] + "B"].clone(), scale)
            for key, t in state.items() if key.endswith(".lora_A")}


def add_delta(model: nn.Module, source: DeltaHandle | str | Path, name: str | None = None,
              strict: bool = True) -> str:
    """Put a LoRA delta into ``model``'s bank under ``name`` (default: its own name) and return that name.

    ``source`` is a delta folder (``handle.save``; loaded with ``load_delta``, so a delta made for another
    model is refused) or a LoRA delta attached to ``model``. Either way the delta ends up detached: the
    model stays the plain backbone, and the delta applies only to rows that name it under ``route_rows``.
    """
    if isinstance(source, DeltaHandle):
        if source.model is not model or not source.attached:
            raise DeltaError(f"delta {source.name!r} is not attached to this model; pass a handle attached to "
                             f"it, or the delta's folder.")
        handle, name = source, name or source.name
        taken = [n for n in served_deltas(model) if n != source.name]
    else:
        taken = served_deltas(model)
        handle = load_delta(model, source, name=f"_mixed_loading_{len(taken)}", strict=strict)
        name = name or json.loads((Path(source) / META_FILE).read_text(encoding="utf-8"))["name"]
    try:
        if name in taken:
            raise DeltaError(f"a delta named {name!r} is already served by this model (served: {taken}); pass "
                             f"another name=..., or remove_delta(model, {name!r}) first.")
        factors = _factors_of(handle)
    except DeltaError:
        if handle is not source:
            handle.detach()
        raise
    handle.detach()
    bank = _bank(model, create=True)
    bank.entries[name] = factors
    bank.stacks.clear()
    logger.info("banked LoRA delta %r (%d modules)", name, len(factors))
    return name


def remove_delta(model: nn.Module, name: str) -> None:
    """Drop a banked delta."""
    bank = _bank(model)
    if bank is None or name not in bank.entries:
        raise DeltaError(f"no banked delta named {name!r}; banked: {list(bank.entries) if bank else []}.")
    del bank.entries[name]
    bank.stacks.clear()


# --------------------------------------------------------------------------------------------- routing
class RoutedLinear(DeltaWrapper):
    """A linear layer (``base``, kept as is) computing row i with adapter ``ids[i]`` of stacked factors.

    a_stack (L, r, K), b_stack (L, N, r), scales (L,), ids (B,) with -1 = base only. Input (B*k, ..., K)."""

    def __init__(self, base: nn.Module, a_stack: torch.Tensor, b_stack: torch.Tensor, scales: torch.Tensor,
                 ids: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.a_stack, self.b_stack, self.scales, self.ids = a_stack, b_stack, scales, ids
        self.conv1d = type(base).__name__ == "Conv1D"                     # GPT-2: weight (K, N), y = x W + b

    def forward(self, x: torch.Tensor) -> torch.Tensor:                   # x: (B*k, ..., K)
        rows, lead = self.ids.shape[0], x.shape[0]
        if lead % rows:
            raise DeltaError(f"route_rows got {rows} row names but this layer sees {lead} rows; pass one name "
                             f"per sequence of the batch the model runs.")
        ids = self.ids if lead == rows else self.ids.repeat_interleave(lead // rows)   # (B*k,)
        weight = self.base.weight.t() if self.conv1d else self.base.weight   # (N, K)
        return lora_linear_multi(x, weight, self.base.bias, self.a_stack, self.b_stack, self.scales, ids)


def _check_names(model: nn.Module, names: Sequence[str | None]) -> list[str]:
    """The served deltas, after checking every row name is one of them (or None)."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise DeltaError(f"route_rows takes a non-empty list of delta names, one per row (None = base only); "
                         f"got {names!r}.")
    served = served_deltas(model)
    for i, n in enumerate(names):
        if n is not None and n not in served:
            raise DeltaError(f"row {i} names delta {n!r}, which is not attached to this model; attached: "
                             f"{served}. Load it with promptdelta.deltas.mixed.add_delta(model, folder, name=...).")
    others = [f"{h.name} ({h.method})" for h in deltas_of(model).values() if h.method != "lora"]
    if others:
        raise DeltaError(f"the model carries non-LoRA deltas {others}, which would apply to every row; mixed "
                         f"batches serve LoRA deltas only: detach them, or serve them on their own.")
    return served


def _pad_rank(t: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Zero-pad a factor to rank r along ``dim`` (zero rows of A / columns of B add nothing: exact)."""
    pad = r - t.shape[dim]
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim)


def _stacks(per_adapter: list[dict[str, _Factors]], like: dict[str, torch.Tensor]
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{module: (A stack (L, r, K), B stack (L, N, r), scales (L,))} over the adapters; an adapter that does
    not touch a module gets zero factors there (so its rows see the base layer)."""
    out = {}
    for site in sorted({s for f in per_adapter for s in f}):
        w = like[site]
        present = [f[site] for f in per_adapter if site in f]
        r, k, n = max(f.a.shape[0] for f in present), present[0].a.shape[1], present[0].b.shape[0]
        a = [_pad_rank(f[site].a, r, 0) if site in f else w.new_zeros(r, k) for f in per_adapter]
        b = [_pad_rank(f[site].b, r, 1) if site in f else w.new_zeros(n, r) for f in per_adapter]
        scales = [f[site].scale if site in f else 0.0 for f in per_adapter]
        out[site] = (torch.stack(a).to(w.device, w.dtype), torch.stack(b).to(w.device, w.dtype),
                     torch.tensor(scales, dtype=torch.float32, device=w.device))
    return out


def _site_stacks(model: nn.Module, used: list[str], handles: dict[str, DeltaHandle], sites: dict[str, Any]
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Stacks of the used adapters per module; cached in the bank when they are all banked (attached deltas
    may still be training, so their factors are read afresh)."""
    bank = _bank(model)
    cacheable = bank is not None and not set(used) & set(handles)
    if cacheable and tuple(used) in bank.stacks:
        return bank.stacks[tuple(used)]
    per_adapter = [_factors_of(handles[n]) if n in handles else bank.entries[n] for n in used]
    stacks = _stacks(per_adapter, {s: sites[s].module.weight for f in per_adapter for s in f})
    if cacheable:
        bank.stacks[tuple(used)] = stacks
    return stacks


@contextmanager
def route_rows(model: nn.Module, names: Sequence[str | None]) -> Iterator[torch.Tensor]:
    """Under this context every LoRA site of ``model`` computes row i with delta ``names[i]`` (None = base
    only), in one batch, through the multi-adapter kernel. Yields the row ids (B,) (-1 = base only).

    Attached LoRA deltas are disabled for the duration (a row that does not name one does not get it); the
    model's modules are put back on exit. A row naming a delta that is not served raises DeltaError.
    """
    served = _check_names(model, names)
    wanted = set(names)
    used = [n for n in served if n in wanted]                              # adapter a = used[a]
    handles = _lora_handles(model)
    sites = {s.name: s for s in iter_sites(model)}
    stacks = _site_stacks(model, used, handles, sites)
    index = {n: a for a, n in enumerate(used)}
    device = next(model.parameters()).device
    ids = torch.tensor([-1 if n is None else index[n] for n in names], dtype=torch.long, device=device)  # (B,)
    with ExitStack() as stack:
        for h in handles.values():
            stack.enter_context(h.disabled())               # unmerged, forward = base; routed below where used
        swapped = []
        try:
            for name, (a, b, s) in stacks.items():
                site = sites[name]                          # parent: the module, or a disabled LoRA wrapper
                setattr(site.parent, site.attr, RoutedLinear(site.module, a, b, s, ids))
                swapped.append(site)
            yield ids
        finally:
            for site in reversed(swapped):
                setattr(site.parent, site.attr, site.module)
