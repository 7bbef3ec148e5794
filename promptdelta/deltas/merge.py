"""Merge and unload, and a ``save_pretrained`` that never writes wrapper keys.

``merge_and_unload(model)`` folds every attached delta into the base weights and takes the deltas away for
good (no unmerge): the model is again a plain model with its original module names, so a native backbone's
``to_hf()`` works and a ``transformers`` model's ``save_pretrained`` / ``from_pretrained`` round-trips exactly.

    LoRA:       W <- W0 + (alpha / r) B A            (the wrapper's base goes back in its place)
    intrinsic:  theta <- theta0 + lambda P d
    BitFit:     b <- the trained b (already in place; added biases of bias-free layers cannot stay)

A delta whose maths does not fold into the existing weights (adapter, prefix, ladder, BitFit's added biases)
makes it refuse before anything changes, naming the delta. Which methods unload, and how, is the explicit
registry ``register_unload``.

``save_pretrained`` of a ``transformers`` model that carries deltas (directly, or through HF ``Trainer.
save_model``, which calls it with the wrapper-keyed ``state_dict()``) writes the BASE model under its own
names, exactly as it was before the deltas (merged values and BitFit's biases taken back to their originals),
and each delta beside it in ``<dir>/promptdelta_deltas/<name>`` (``handle.save``), with a warning naming
``merge_and_unload``. ``from_pretrained(dir)`` then gives the base model, ``load_delta`` the deltas on it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from promptdelta.deltas.base import (_STATE_ATTR, DeltaHandle, DeltaMethod, DeltaWrapper, WrappingMethod,
                                     _original_overrides, _state, base_named_parameters, deltas_of)
from promptdelta.errors import DeltaError

logger = logging.getLogger(__name__)

DELTAS_SUBDIR = "promptdelta_deltas"
_GUARD_ATTR = "save_pretrained"   # the instance attribute that shadows the class's save_pretrained

Unloader = Callable[[DeltaMethod], None]
_UNLOADERS: dict[str, Unloader] = {}


def register_unload(method: str, fn: Unloader) -> Unloader:
    """Register how a delta method folds itself into the base weights and leaves (``fn(impl)``)."""
    if method in _UNLOADERS:
        raise DeltaError(f"an unload function for {method!r} is already registered; register it once.")
    _UNLOADERS[method] = fn
    return fn


def _unload_wrapping(impl: DeltaMethod) -> None:
    """Merge every wrapper, then put its (now merged) base module back where the wrapper was."""
    assert isinstance(impl, WrappingMethod)
    impl.merge()
    for site, wrapper in reversed(impl.sites):
        setattr(site.parent, site.attr, wrapper.base)   # no unmerge: the merged weights stay
    impl.sites = []


def _unload_bitfit(impl: DeltaMethod) -> None:
    """The trained biases are the base model's biases from now on (nothing is restored)."""
    impl.biases = []   # type: ignore[attr-defined]


def _cannot_unload(handle: DeltaHandle) -> str | None:
    """Why ``handle`` cannot be folded into the base weights, or None."""
    if getattr(handle._method, "inner", None) is not None:   # modules_to_save (saved.py): trained copies of modules
        return (f"delta {handle.name!r} ({handle.method}) trains copies of whole modules (modules_to_save), which "
                f"merge_and_unload does not swap in")
    if handle.method not in _UNLOADERS:
        return (f"delta {handle.name!r} ({handle.method}) adds computation that does not fold into the base "
                f"weights (mergeable: {sorted(_UNLOADERS)})")
    if getattr(handle._method, "added", None):   # BitFit's biases on bias-free layers would add new keys
        return (f"delta {handle.name!r} (bitfit) added biases to {len(handle._method.added)} bias-free layers, "
                f"which the plain model has no place for")
    return None


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every attached delta into ``model``'s weights and remove the deltas (in place; returns ``model``).

    The result has its original module names and no delta state: ``to_hf()`` (native) and ``save_pretrained``
    (transformers) give the merged model. Refuses (DeltaError, nothing changed) when a delta cannot merge.
    """
    handles = list(deltas_of(model).values())
    if not handles:
        raise DeltaError(f"{type(model).__name__} carries no deltas to merge; attach or load_delta one first.")
    reasons = [r for r in (_cannot_unload(h) for h in handles) if r]
    if reasons:
        raise DeltaError(f"cannot merge_and_unload: {'; '.join(reasons)}. Detach it (handle.detach()) or keep "
                         f"the model as it is and save the delta with handle.save().")
    st = _state(model)
    for h in reversed(handles):   # last attached first, as detach does
        _UNLOADERS[h.method](h._method)
        h._method.merged = False
        h.attached = False
    for p, flag in st.requires_grad.values():
        p.requires_grad_(flag)
    del model.__dict__[_STATE_ATTR]
    remove_save_guard(model)
    logger.info("merged and unloaded %d deltas (%s)", len(handles), ", ".join(h.name for h in handles))
    return model


register_unload("lora", _unload_wrapping)
register_unload("intrinsic", _unload_wrapping)
register_unload("bitfit", _unload_bitfit)


# --------------------------------------------------------------------------------------------- save guard
def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as if no delta were attached: wrapper keys (``x.base.weight``) under their
    original names (``x.weight``), delta tensors dropped, in-place changed values at their pre-attach values."""
    wrappers = sorted((n for n, m in model.named_modules() if isinstance(m, DeltaWrapper)), key=len, reverse=True)
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        name: str | None = key
        for w in wrappers:   # innermost first; "a.base.b.base.w" -> "a.b.w"
            if name is not None and name.startswith(w + "."):
                rest = name[len(w) + 1:]
                name = w + "." + rest[len("base."):] if rest.startswith("base.") else None
        if name is not None:
            out[name] = t
    overrides = _original_overrides(model)
    for name, p in base_named_parameters(model):
        if id(p) in overrides:
            out[name] = overrides[id(p)]
    return out


class _SaveGuard:
    """Stands in for a transformers model's ``save_pretrained`` while deltas are attached (an instance
    attribute shadowing the class's method): the base model under its own names, the deltas beside it."""

    __promptdelta_guard__ = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __deepcopy__(self, memo: dict) -> "_SaveGuard":
        return _SaveGuard(memo.get(id(self.model), self.model))   # a copied model gets a guard of its own

    def __call__(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        model, original = self.model, type(self.model).save_pretrained
        handles = deltas_of(model)
        if not handles:
            return original(model, save_directory, *args, **kwargs)
        kwargs["state_dict"] = base_state_dict(model)   # also replaces the wrapper-keyed one Trainer passes
        result = original(model, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for name, h in handles.items():
                h.save(Path(save_directory) / DELTAS_SUBDIR / name, overwrite=True)
        logger.warning("%s carries deltas %s: save_pretrained wrote the base model without them and each delta "
                       "to %s/%s/<name> (reload with load_delta). For one model with the deltas folded in, call "
                       "promptdelta.merge_and_unload(model) first.", type(model).__name__, sorted(handles),
                       save_directory, DELTAS_SUBDIR)
        return result


def install_save_guard(model: nn.Module) -> None:
    """Shadow ``model.save_pretrained`` (a transformers model's) by the guard (called by ``attach``)."""
    if getattr(type(model), "save_pretrained", None) is None or isinstance(model.__dict__.get(_GUARD_ATTR), _SaveGuard):
        return
    model.__dict__[_GUARD_ATTR] = _SaveGuard(model)


def remove_save_guard(model: nn.Module) -> None:
    """Drop the guard once no delta is attached (the class's save_pretrained shows through again)."""
    if isinstance(model.__dict__.get(_GUARD_ATTR), _SaveGuard):
        del model.__dict__[_GUARD_ATTR]
