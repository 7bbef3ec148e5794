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

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptdelta.backbones.base import PACKED_ROWS
from promptdelta.deltas.base import DeltaHandle, deltas_of, load_delta
from promptdelta.deltas.sites import DeltaWrapper, iter_sites
from promptdelta.errors import DeltaError
from promptdelta.kernels import lora_linear_multi

logger = logging.getLogger(__name__)

_BANK_ATTR = "_promptdelta_lora_bank"
__all__ = ["add_delta", "remove_delta", "served_deltas", "route_rows", "RoutedLinear", "load_many",
           "predict_mixed", "predict_many"]


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
    return {key[:-len(".lora_A")]: _Factors(t, state[key[:-1] + "B"], scale)    # views: stacking copies
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
    else:
        if name is not None and name in served_deltas(model):
            raise DeltaError(f"a delta named {name!r} is already served by this model (served: "
                             f"{served_deltas(model)}); pass another name=..., or remove_delta(model, {name!r}) first.")
        handle = load_delta(model, source, name=name, strict=strict)   # any folder load_delta reads
        name = handle.name
    bank = _bank(model)
    taken = [*(bank.entries if bank else ()), *(n for n in _lora_handles(model) if n != handle.name)]
    try:
        if name in taken:
            raise DeltaError(f"a delta named {name!r} is already served by this model (served: {taken}); pass "
                             f"another name=..., or remove_delta(model, {name!r}) first.")
        factors = {k: _Factors(f.a.clone(), f.b.clone(), f.scale) for k, f in _factors_of(handle).items()}
    except DeltaError:
        if handle is not source:
            handle.detach()
        raise
    handle.detach()
    bank = bank or _bank(model, create=True)
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

    a_stack (L, r, K), b_stack (L, N, r), scales (L,), ids (B,) with -1 = base only. Input (B*k, ..., K), or
    the packed real tokens (N, K) of a backbone that skips padding (each token's row from ``PACKED_ROWS``)."""

    token_wise = True   # per token, given its row: native BERT may hand it packed (N, K) tokens

    def __init__(self, base: nn.Module, a_stack: torch.Tensor, b_stack: torch.Tensor, scales: torch.Tensor,
                 ids: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.a_stack, self.b_stack, self.scales, self.ids = a_stack, b_stack, scales, ids
        self.conv1d = type(base).__name__ == "Conv1D"                     # GPT-2: weight (K, N), y = x W + b

    def forward(self, x: torch.Tensor) -> torch.Tensor:                   # x: (B*k, ..., K)
        rows, lead = self.ids.shape[0], x.shape[0]
        token_rows = PACKED_ROWS.get()                                    # (N,) or None
        if token_rows is not None and x.dim() == 2 and lead == token_rows.shape[0]:
            ids = self.ids[token_rows]                                    # (N,) each token's adapter
        elif lead % rows:
            raise DeltaError(f"route_rows got {rows} row names but this layer sees {lead} rows; pass one name "
                             f"per sequence of the batch the model runs.")
        else:
            ids = self.ids if lead == rows else self.ids.repeat_interleave(lead // rows)   # (B*k,)
        weight = self.base.weight.t() if self.conv1d else self.base.weight   # (N, K)
        return lora_linear_multi(x, weight, self.base.bias, self.a_stack, self.b_stack, self.scales, ids)


def _check_names(model: nn.Module, names: Sequence[str | None]) -> list[str]:
    """The served deltas, after checking every row name is one of them (or None)."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise DeltaError(f"route_rows takes a non-empty list of delta names, one per row (None = base only); "
                         f"got {names!r}.")
    served = served_deltas(model)
    twice = sorted({n for n in served if served.count(n) > 1})
    if twice:
        raise DeltaError(f"deltas {twice} are both banked and attached; detach one, or remove_delta(model, name).")
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
    with torch.inference_mode(False):                     # cached stacks stay usable outside inference mode
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
    Inference: the factors are used detached, so no gradient reaches a delta under this context.
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


# --------------------------------------------------------------------------------------------- classifiers
def _bank_handles(model: nn.Module, handles: list[DeltaHandle], name: str) -> None:
    """One bank entry from several LoRA deltas of one classifier (their modules never overlap), detached."""
    bad = [f"{h.name} ({h.method})" for h in handles if h.method != "lora"]
    if bad:
        for h in handles:
            h.detach()
        raise DeltaError(f"classifier {name} carries non-LoRA deltas {bad}; mixed batches serve LoRA deltas "
                         f"only: predict with it on its own (one --model).")
    factors: dict[str, _Factors] = {}
    for h in handles:
        factors.update({k: _Factors(f.a.clone(), f.b.clone(), f.scale) for k, f in _factors_of(h).items()})
        h.detach()
    bank = _bank(model, create=True)
    bank.entries[name] = factors
    bank.stacks.clear()


def load_many(folders: Sequence[str | Path], backbone: nn.Module | None = None
              ) -> tuple[nn.Module, dict[str, nn.Module], dict[str, str | None]]:
    """Load classifier folders that share one backbone -> (backbone, {folder: clf}, {folder: route}).

    ``backbone=None`` loads the one the first folder records; every folder must fit it (fingerprint). Each
    folder's LoRA deltas go into the backbone's bank under the folder's name as given (``route``; None for a
    classifier without deltas), so the backbone stays plain: run a classifier through ``predict_mixed`` (or
    under ``route_rows(backbone, [route] * B)``), not through ``clf.predict`` alone.
    """
    from promptdelta.prompts.registry import load_classifier, read_classifier_config

    keys = [str(f) for f in folders]
    if not keys or len(set(keys)) != len(keys):
        raise DeltaError(f"load_many takes one or more distinct classifier folders; got {keys}.")
    clfs: dict[str, nn.Module] = {}
    routes: dict[str, str | None] = {}
    for i, key in enumerate(keys):
        if backbone is not None and key in served_deltas(backbone):
            raise DeltaError(f"the backbone already serves a delta named {key!r}; remove_delta it first.")
        before = set(deltas_of(backbone)) if backbone is not None else set()
        saved = [d["name"] for d in read_classifier_config(key)["deltas"]]   # renamed: all may be "lora"
        clf = load_classifier(key, backbone=backbone, delta_names={n: f"_mixed_{i}_{n}" for n in saved})
        backbone = clf.backbone
        new = [h for n, h in deltas_of(backbone).items() if n not in before]
        routes[key] = key if new else None
        if new:
            _bank_handles(backbone, new, key)
        clfs[key] = clf
    return backbone, clfs, routes


def _mixable(clf: nn.Module) -> bool:
    """One backbone forward gives this classifier's label logits (no decoder pass, no sequence scoring)."""
    return clf.kind in ("mlm", "clm") and not clf.uses_sequence_scoring


def _embed(clf: nn.Module, examples: list[Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The classifier's own tokenisation and soft tokens -> inputs_embeds (B, T, H) and the batch's tensors."""
    batch = {k: v.to(device) for k, v in clf.collate(examples).items() if isinstance(v, torch.Tensor)}
    embeds = clf.backbone.input_embeddings()(batch["input_ids"])               # (B, T, H)
    batch["inputs_embeds"] = clf.template.process_embeds(embeds, batch)        # (B, T', H)
    return batch


def _right_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T, ...) -> (B, length, ...) with zeros after (attention mask 0: padded keys get no attention)."""
    pad = length - t.shape[1]
    return t if pad == 0 else torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], 1)


def _readout(clf: nn.Module, batch: dict[str, torch.Tensor], hidden_all: torch.Tensor,
             logits_all: torch.Tensor | None) -> torch.Tensor:
    """Label logits (B, C) from this group's rows of the shared forward, as PromptForClassification reads
    them: the state at the mask (several masks: (B, M, H)), or the masked mean for readout='mean'."""
    rows = torch.arange(hidden_all.shape[0], device=hidden_all.device)
    mask_at = batch["mask_pos"][:, 0]                                          # (B,)
    if batch["mask_pos"].shape[1] > 1:
        rows, mask_at = rows[:, None], batch["mask_pos"]                       # (B, M) gathers
    hidden = hidden_all[rows, mask_at]                                          # (B, H) or (B, M, H)
    if clf.readout == "mean":
        keep = batch["attention_mask"][..., None].to(hidden_all.dtype)         # (B, T, 1)
        hidden = (hidden_all * keep).sum(1) / keep.sum(1).clamp(min=1)         # (B, H)
    logits = None if logits_all is None else logits_all[rows, mask_at]         # (B, V)
    return clf.verbalizer.process(hidden, logits, clf.backbone)                # (B, C)


@torch.no_grad()
def predict_mixed(backbone: nn.Module, clfs: dict[str, nn.Module], routes: dict[str, str | None],
                  rows: Sequence[tuple[str, Any]]) -> list[torch.Tensor]:
    """Label logits of each (classifier key, example) row, in one mixed batch: rows grouped by classifier for
    its template, inputs_embeds right-padded and concatenated, the backbone run once with every row routed
    to its classifier's delta, each group read out by its own verbalizer. -> one (C_k,) tensor per row.

    A classifier that needs more than one forward (see ``_mixable``) runs its rows as its own routed batch."""
    unknown = sorted({k for k, _ in rows} - set(clfs))
    if unknown:
        raise DeltaError(f"rows name classifiers {unknown} that are not loaded; loaded: {list(clfs)}.")
    groups: dict[str, list[int]] = {}
    for i, (key, _) in enumerate(rows):
        groups.setdefault(key, []).append(i)
    device = next(backbone.parameters()).device
    was = {k: c.training for k, c in clfs.items()}
    for c in clfs.values():
        c.eval()
    out: list[torch.Tensor | None] = [None] * len(rows)
    try:
        mixed = {k: ix for k, ix in groups.items() if _mixable(clfs[k])}
        for key, ix in groups.items():
            if key not in mixed:                                                # its own routed batch
                batch = clfs[key].collate([rows[i][1] for i in ix])
                with route_rows(backbone, [routes[key]] * len(ix)):
                    for i, logit in zip(ix, clfs[key](batch)):
                        out[i] = logit
        if mixed:
            _run_mixed(backbone, clfs, routes, rows, mixed, out, device)
    finally:
        for k, c in clfs.items():
            c.train(was[k])
    return out


def _run_mixed(backbone: nn.Module, clfs: dict[str, nn.Module], routes: dict[str, str | None],
               rows: Sequence[tuple[str, Any]], groups: dict[str, list[int]], out: list, device: torch.device
               ) -> None:
    """One backbone forward over the groups' concatenated, right-padded embeddings (see predict_mixed)."""
    batches = {k: _embed(clfs[k], [rows[i][1] for i in ix], device) for k, ix in groups.items()}
    length = max(b["inputs_embeds"].shape[1] for b in batches.values())
    cat = {"inputs_embeds": [], "attention_mask": [], "token_type_ids": []}
    names: list[str | None] = []
    for key, b in batches.items():
        cat["inputs_embeds"].append(_right_pad(b["inputs_embeds"], length))
        cat["attention_mask"].append(_right_pad(b["attention_mask"], length))
        tt = b.get("token_type_ids")
        cat["token_type_ids"].append(_right_pad(tt if tt is not None else b["attention_mask"] * 0, length))
        names += [routes[key]] * len(groups[key])
    with route_rows(backbone, names):
        res = backbone(inputs_embeds=torch.cat(cat["inputs_embeds"]), attention_mask=torch.cat(cat["attention_mask"]),
                       token_type_ids=torch.cat(cat["token_type_ids"]))
    start = 0
    for key, b in batches.items():
        n, t = len(groups[key]), b["inputs_embeds"].shape[1]
        logits_all = None if res.logits is None else res.logits[start:start + n, :t]   # (n, T, V)
        label_logits = _readout(clfs[key], b, res.last_hidden_state[start:start + n, :t], logits_all)
        for i, logit in zip(groups[key], label_logits):
            out[i] = logit
        start += n


def predict_many(folders: Sequence[str | Path], examples: Sequence[Any], batch_size: int = 32,
                 top_k: int | None = None) -> dict[str, Any]:
    """Every classifier folder predicts every example, the folders sharing one backbone: each mixed batch
    holds ``batch_size`` (example, classifier) rows. -> {folder as given: Predictions} (``top_k``: the k most
    probable classes in each row's probs)."""
    from promptdelta.predict import Predictions, to_examples

    examples = to_examples(examples)                                           # strings, dicts, a Dataset...
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DeltaError(f"batch_size={batch_size!r} must be a positive int; pass e.g. 32.")
    backbone, clfs, routes = load_many(folders, None)
    rows = [(k, ex) for ex in examples for k in clfs]
    logits: list[torch.Tensor] = []
    for i in range(0, len(rows), batch_size):
        logits += predict_mixed(backbone, clfs, routes, rows[i:i + batch_size])
    out = {}
    for j, (key, clf) in enumerate(clfs.items()):
        mine = logits[j::len(clfs)]                                           # rows were (example, folder)
        n_classes = len(clf.verbalizer.classes)
        out[key] = Predictions(clf.verbalizer.classes, torch.stack(mine).cpu() if mine else torch.zeros(0, n_classes),
                               top_k)
    return out
