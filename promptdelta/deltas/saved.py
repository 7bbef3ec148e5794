"""``modules_to_save``: whole modules trained and saved with a delta (a fresh task head, e.g. the
``classifier`` of ``BertForSequenceClassification``).

``attach(model, "lora", modules_to_save=["classifier"])`` puts a ``SavedModule`` where each named module
was: it keeps the original as its ``base`` (frozen, untouched) and runs a trainable deep copy instead. The
copy's parameters join the delta's (``<module>.saved.<param>`` in the checkpoint), ``disabled()`` runs the
original again, and ``detach()`` puts the original module back, so the base model never changes. The same
idea as PEFT's ``ModulesToSaveWrapper``; a delta method needs no code for it: ``SavedModules`` wraps the
method's implementation and adds the copies.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from promptdelta.deltas.sites import (ALL_LINEAR, DeltaWrapper, ModuleSite, match_targets, normalise_targets,
                                      unwrap_sites, wrap_site)
from promptdelta.errors import DeltaError

KEY = "modules_to_save"


class SavedModule(DeltaWrapper):
    """The original module ``base`` (kept for detach and ``disabled()``) and its trainable copy ``copy``,
    which runs in its place: forward(x) = copy(x) while enabled, base(x) when disabled."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.copy = copy.deepcopy(base)
        for p in self.copy.parameters():
            p.requires_grad_(True)
        self.base = base

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.copy if self.enabled else self.base)(*args, **kwargs)


_CONFIGS: dict[type, type] = {}


def with_modules_to_save(config: Any, modules: list[str]) -> Any:
    """``config`` as an instance of a subclass with a ``modules_to_save`` field, so that ``save()`` writes
    the list into delta.json and ``load_delta`` passes it back to ``attach``."""
    base = type(config)
    if KEY in {f.name for f in dataclasses.fields(base)}:
        return dataclasses.replace(config, **{KEY: list(modules)})
    if base not in _CONFIGS:
        _CONFIGS[base] = dataclasses.make_dataclass(
            base.__name__, [(KEY, list, dataclasses.field(default_factory=list))], bases=(base,))
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(base)}
    return _CONFIGS[base](**values, **{KEY: list(modules)})


class SavedModules:
    """A delta method's implementation plus ``modules_to_save``: every ``DeltaMethod`` hook goes to the
    method (``inner``), and the saved modules' copies are added to its parameters, state and removal."""

    def __init__(self, inner: Any, modules: Any) -> None:
        names = normalise_targets(modules)
        if names is None:
            raise DeltaError("modules_to_save=None; pass module names, e.g. modules_to_save=['classifier'].")
        self.inner, self.names = inner, names
        self.config = with_modules_to_save(inner.config, names)
        self.wraps_modules, self.trains_base_parameters = inner.wraps_modules, inner.trains_base_parameters
        self.saved: list[tuple[ModuleSite, SavedModule]] = []
        self._pending: list[ModuleSite] = []

    def __getattr__(self, name: str) -> Any:   # anything else (sites, model, prefix sets ...) is the method's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def merged(self) -> bool:
        return self.inner.merged

    def select(self, model: nn.Module, sites: list[ModuleSite]) -> list[ModuleSite]:
        found = match_targets(model, self.names)
        found = [s for s in found if not any(s.name.startswith(o.name + ".") for o in found)]   # outermost
        targets = normalise_targets(getattr(self.inner.config, "targets", None))
        if targets is None or ALL_LINEAR in targets:
            # every module / "all-linear" means those outside the saved modules (a saved head is trained whole)
            sites = [c for c in sites if not any(c.name == s.name or c.name.startswith(s.name + ".") for s in found)]
        chosen = self.inner.select(model, sites)
        for s in found:
            inside = [c.name for c in chosen if c.name == s.name or c.name.startswith(s.name + ".")]
            if inside or isinstance(s.parent, DeltaWrapper) or next(s.module.parameters(), None) is None:
                why = (f"it holds the delta's own targets {inside[:3]}" if inside else
                       "another delta wraps it" if isinstance(s.parent, DeltaWrapper) else "it has no parameters")
                raise DeltaError(f"modules_to_save names {s.name!r}, but {why}; save whole modules outside the "
                                 f"delta's targets (e.g. the task head 'classifier').")
        self._pending = found
        return chosen

    def apply(self, sites: list[ModuleSite]) -> None:
        self.inner.apply(sites)
        for s in self._pending:
            self.saved.append((s, wrap_site(s, SavedModule(s.module), self.inner.name)))

    def remove(self) -> None:
        unwrap_sites(self.saved)
        self.saved = []
        self.inner.remove()

    def named_delta_parameters(self) -> list[tuple[str, nn.Parameter]]:
        own = [(f"{s.name}.saved.{k}", p) for s, w in self.saved for k, p in w.copy.named_parameters()]
        return self.inner.named_delta_parameters() + own

    def merge(self) -> None:
        self.inner.merge()

    def unmerge(self) -> None:
        self.inner.unmerge()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        with ExitStack() as stack:
            stack.enter_context(self.inner.disabled())
            for _, w in self.saved:
                w.enabled = False
            try:
                yield
            finally:
                for _, w in self.saved:
                    w.enabled = True

    def original_values(self) -> dict[int, torch.Tensor]:
        return self.inner.original_values()

    def export_state(self) -> tuple[Any, dict[str, torch.Tensor]]:
        config, tensors = self.inner.export_state()
        own = {f"{s.name}.saved.{k}": p.detach() for s, w in self.saved for k, p in w.copy.named_parameters()}
        return with_modules_to_save(config, self.names), {**tensors, **own}
