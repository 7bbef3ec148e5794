"""The attach mechanism shared by every delta method.

A delta method (LoRA, BitFit, ...) is a ``DeltaMethod`` subclass registered by name. ``attach`` finds the
target modules (``sites.py``: canonical names, target matching), lets the method patch them (replace a child
with ``setattr(parent, child, new)``, or mark existing parameters trainable), freezes everything else and
returns a ``DeltaHandle``. The handle saves, merges, disables and detaches that one delta; ``detach`` restores
the exact original modules, values and ``requires_grad`` flags. The deltas attached to a model live on the
model object (``_promptdelta_state``). ``load_delta`` re-attaches a saved folder once ``checks.py`` has
checked its files, fields and fingerprint.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

from promptdelta.deltas.sites import (DeltaWrapper, ModuleSite, base_named_parameters, canonical_aliases,
                                      hf_key_table, iter_sites, match_targets, native_family, unwrap_sites,
                                      wrap_site)
from promptdelta.deltas.fingerprint import (MANIFEST_FILE, canonical_namer, legacy_fingerprint, table_namer,
                                            verify_manifest, weights_fingerprint, write_manifest)
from promptdelta.deltas.checks import (FORMAT_VERSION, META_FILE, PEFT_CONFIG_FILE, WEIGHTS_FILE,
                                       check_fingerprint, config_from_meta, read_meta, read_weights)
from promptdelta.deltas.fused import split_or_fuse
from promptdelta.deltas.checks import read_weights as _read_weights  # noqa: F401  (its old name: peft_format.py)
from promptdelta.errors import CheckpointError, ConfigError, DeltaError, PromptDeltaError
from promptdelta.utils.io import atomic_save_safetensors, atomic_write_json

logger = logging.getLogger(__name__)

_STATE_ATTR = "_promptdelta_state"
__all__ = ["DeltaWrapper", "ModuleSite", "base_named_parameters", "canonical_aliases", "hf_key_table", "iter_sites",
           "match_targets", "native_family", "DeltaMethod", "WrappingMethod", "DeltaHandle", "attach", "load_delta",
           "deltas_of", "model_fingerprint", "canonical_namer", "table_namer", "register_delta", "get_delta_method", "wrap_site", "unwrap_sites"]


# --------------------------------------------------------------------------------------------- configs
def build_config(config_cls: type, cfg: dict[str, Any], method: str) -> Any:
    """``config_cls(**cfg)``, raising ConfigError for keys the method does not know."""
    valid = [f.name for f in dataclasses.fields(config_cls)]
    for key in cfg:
        if key not in valid:
            raise ConfigError(f"unknown config key {key!r} for delta method {method!r}; valid keys: {valid}.")
    return config_cls(**cfg)


def config_to_dict(config: Any) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    if isinstance(d.get("targets"), tuple):
        d["targets"] = list(d["targets"])
    return d


# --------------------------------------------------------------------------------------------- methods
class DeltaMethod(abc.ABC):
    """One attached delta's implementation. Subclasses set ``config_cls`` and implement the hooks."""

    config_cls: ClassVar[type]
    wraps_modules: ClassVar[bool] = False           # replaces target modules by a DeltaWrapper
    trains_base_parameters: ClassVar[bool] = False  # makes existing base parameters trainable

    def __init__(self, config: Any, name: str) -> None:
        self.config = config
        self.name = name
        self.merged = False

    @abc.abstractmethod
    def select(self, model: nn.Module, sites: list[ModuleSite]) -> list[ModuleSite]:
        """Keep the matched sites this method applies to; raise DeltaError if it cannot apply."""

    @abc.abstractmethod
    def apply(self, sites: list[ModuleSite]) -> None:
        """Patch the model at ``sites`` (called once, after ``select``)."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Undo ``apply`` exactly: original modules and values back in place."""

    @abc.abstractmethod
    def named_delta_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable delta parameters under stable canonical keys (``<module>.<param>``)."""

    def merge(self) -> None:
        self.merged = True

    def unmerge(self) -> None:
        self.merged = False

    @contextmanager
    def disabled(self) -> Iterator[None]:
        yield

    def original_values(self) -> dict[int, torch.Tensor]:
        """Pre-attach values of base parameters this delta changes in place (by ``id(param)``)."""
        return {}

    def export_state(self) -> tuple[Any, dict[str, torch.Tensor]]:
        """(config, tensors) that ``save`` writes: by default the config and the delta parameters. A method
        whose training-time form differs from its inference form (prefix tuning's MLP) returns the latter,
        with a config that re-attaches in that form."""
        return self.config, {k: p.detach() for k, p in self.named_delta_parameters()}


class WrappingMethod(DeltaMethod):
    """A method that replaces each target module by a ``DeltaWrapper`` (LoRA, adapter, intrinsic).

    It keeps ``(site, wrapper)`` pairs in ``self.sites``; ``remove`` puts the originals back, ``merge`` /
    ``unmerge`` / ``disabled`` act on every wrapper (a disabled delta is unmerged for the duration).
    """

    wraps_modules = True

    def __init__(self, config: Any, name: str) -> None:
        super().__init__(config, name)
        self.sites: list[tuple[ModuleSite, Any]] = []

    def _wrap(self, site: ModuleSite, wrapper: DeltaWrapper) -> None:
        self.sites.append((site, wrap_site(site, wrapper, self.name)))

    def remove(self) -> None:
        unwrap_sites(self.sites)
        self.sites = []

    def merge(self) -> None:
        for _, w in self.sites:
            w.merge()
        self.merged = True

    def unmerge(self) -> None:
        for _, w in self.sites:
            w.unmerge()
        self.merged = False

    @contextmanager
    def disabled(self) -> Iterator[None]:
        was_merged = self.merged
        self.unmerge()
        for _, w in self.sites:
            w.enabled = False
        try:
            yield
        finally:
            for _, w in self.sites:
                w.enabled = True
            if was_merged:
                self.merge()


_REGISTRY: dict[str, type[DeltaMethod]] = {}


def register_delta(name: str, cls: type[DeltaMethod]) -> type[DeltaMethod]:
    """Register a delta method class under ``name``; duplicates raise DeltaError."""
    if name in _REGISTRY:
        raise DeltaError(f"a delta method named {name!r} is already registered ({_REGISTRY[name].__name__}); "
                         f"pick another name. Known: {sorted(_REGISTRY)}.")
    if not (isinstance(cls, type) and issubclass(cls, DeltaMethod)):
        raise DeltaError(f"{cls!r} is not a DeltaMethod subclass; subclass promptdelta.deltas.base.DeltaMethod.")
    _REGISTRY[name] = cls
    return cls


def get_delta_method(name: str) -> type[DeltaMethod]:
    if name not in _REGISTRY:
        raise DeltaError(f"unknown delta method {name!r}; known methods: {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


# --------------------------------------------------------------------------------------------- model state
@dataclass
class _ModelDeltaState:
    """Kept on the model: its attached deltas and every parameter's requires_grad before the first attach."""

    deltas: dict[str, "DeltaHandle"] = dataclasses.field(default_factory=dict)
    requires_grad: dict[int, tuple[nn.Parameter, bool]] = dataclasses.field(default_factory=dict)


def _state(model: nn.Module, create: bool = False) -> _ModelDeltaState | None:
    st = model.__dict__.get(_STATE_ATTR)
    if st is None and create:
        st = _ModelDeltaState()
        model.__dict__[_STATE_ATTR] = st
    return st


def deltas_of(model: nn.Module) -> dict[str, "DeltaHandle"]:
    """The deltas attached to ``model``, by name (a copy; attach order)."""
    st = _state(model)
    return dict(st.deltas) if st else {}


def _delta_param_ids(st: _ModelDeltaState) -> set[int]:
    return {id(p) for h in st.deltas.values() for _, p in h._method.named_delta_parameters()}


# --------------------------------------------------------------------------------------------- fingerprint
def _original_overrides(model: nn.Module) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    for h in deltas_of(model).values():
        out.update(h._method.original_values())
    return out


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The base model's weights under canonical names (``fingerprint.weights_fingerprint``), each delta's
    pre-attach values used where it changed a parameter in place (BitFit, merged LoRA)."""
    return weights_fingerprint(model, _original_overrides(model))


def _legacy_fingerprint(model: nn.Module) -> dict[str, str]:
    return legacy_fingerprint(model, _original_overrides(model))


# --------------------------------------------------------------------------------------------- handle
class DeltaHandle:
    """One delta attached to a model: inspect, save, merge, disable or detach it."""

    def __init__(self, model: nn.Module, method_name: str, impl: DeltaMethod, targets: list[str]) -> None:
        self.model = model
        self.method = method_name
        self._method = impl
        self.targets = targets
        self.attached = True

    @property
    def name(self) -> str:
        return self._method.name

    @property
    def config(self) -> Any:
        return self._method.config

    @property
    def merged(self) -> bool:
        return self._method.merged

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"DeltaHandle(name={self.name!r}, method={self.method!r}, {len(self.targets)} targets, {state})"

    def _check_attached(self) -> None:
        if not self.attached:
            raise DeltaError(f"delta {self.name!r} was detached; attach it again with "
                             f"promptdelta.attach(model, {self.method!r}, ...) or load_delta(model, path).")

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        self._check_attached()
        return self._method.named_delta_parameters()

    def parameters(self) -> list[nn.Parameter]:
        """The delta's trainable parameters (pass these to an optimizer)."""
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Delta tensors only, under canonical keys (``<module name>.<param>``), detached."""
        return {k: p.detach() for k, p in self.named_parameters()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` into the delta parameters; keys and shapes must match exactly."""
        params = dict(self.named_parameters())
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise CheckpointError(f"delta {self.name!r}: checkpoint keys do not fit (missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}); load a checkpoint saved for this method/targets.")
        for k, p in params.items():
            if tuple(tensors[k].shape) != tuple(p.shape):
                raise CheckpointError(f"delta {self.name!r}: {k} has shape {tuple(tensors[k].shape)} in the "
                                      f"checkpoint but {tuple(p.shape)} here; load it onto the model it was made for.")
        was_merged = self.merged
        self.unmerge()
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[k])
        if was_merged:
            self.merge()

    def summary(self) -> str:
        """Trainable parameters per module, the total, and its share of the base model."""
        per_module: dict[str, int] = {}
        for key, p in self.named_parameters():
            mod = key.rsplit(".", 1)[0]
            per_module[mod] = per_module.get(mod, 0) + p.numel()
        total = sum(per_module.values())
        base = sum(p.numel() for _, p in base_named_parameters(self.model))
        width = max((len(m) for m in per_module), default=10)
        lines = [f"delta {self.name!r} ({self.method}) on {type(self.model).__name__}: "
                 f"{len(per_module)} modules{', merged' if self.merged else ''}"]
        lines += [f"  {m:<{width}}  {n:>12,}" for m, n in per_module.items()]
        pct = 100.0 * total / base if base else 0.0
        lines.append(f"  trainable: {total:,} of {base:,} base parameters ({pct:.4f}% of model)")
        return "\n".join(lines)

    def merge(self) -> None:
        """Fold the delta into the base weights (idempotent); forward then uses the base weights only."""
        self._check_attached()
        self._method.merge()

    def unmerge(self) -> None:
        """Undo ``merge`` exactly (idempotent)."""
        self._check_attached()
        self._method.unmerge()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model as if this delta were not attached; everything is put back on exit."""
        self._check_attached()
        with self._method.disabled():
            yield

    def detach(self) -> None:
        """Remove the delta: original modules, parameter values and requires_grad flags come back."""
        self._check_attached()
        st = _state(self.model)
        self._method.unmerge()
        own = [p for _, p in self._method.named_delta_parameters()]
        self._method.remove()
        del st.deltas[self.name]
        self.attached = False
        if st.deltas:  # other deltas remain: base parameters this delta trained go back to frozen
            others = _delta_param_ids(st)
            for p in own:
                if id(p) not in others and id(p) in st.requires_grad:
                    p.requires_grad_(False)
            return
        for p, flag in st.requires_grad.values():
            p.requires_grad_(flag)
        del self.model.__dict__[_STATE_ATTR]
        from promptdelta.deltas.merge import remove_save_guard
        remove_save_guard(self.model)

    def save(self, path: str | Path, overwrite: bool = False, format: str = "promptdelta") -> Path:
        """Write the delta in its inference form (``DeltaMethod.export_state``) to the folder ``path``.

        format="promptdelta": ``delta.safetensors`` + ``delta.json`` (method, name, config, targets and tensor
        keys under canonical names, the base model's fingerprint, versions) + ``manifest.json`` (size and
        sha256 of both, written last). format="peft": PEFT's ``adapter_config.json`` +
        ``adapter_model.safetensors`` (see ``promptdelta.deltas.peft_format``)."""
        self._check_attached()
        if format == "peft":
            from promptdelta.deltas.peft_format import save_peft
            return save_peft(self, path, overwrite=overwrite)
        if format != "promptdelta":
            raise CheckpointError(f"unknown delta format {format!r}; use format='promptdelta' or format='peft'.")
        folder = _prepare_folder(path, overwrite)
        config, tensors = self._method.export_state()
        namer = canonical_namer(self.model)
        tensors = {namer(k): t.detach().contiguous() for k, t in tensors.items()}
        for key, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise DeltaError(f"delta {self.name!r}: {key} holds NaN/inf values; it is not worth saving "
                                 f"(lower the learning rate or check the loss).")
        atomic_save_safetensors(folder / WEIGHTS_FILE, tensors, metadata={"method": self.method, "name": self.name})
        atomic_write_json(folder / META_FILE, self._meta(config, namer))
        write_manifest(folder, [WEIGHTS_FILE, META_FILE], FORMAT_VERSION)
        logger.info("saved delta %r (%d tensors) to %s", self.name, len(tensors), folder)
        return folder

    def _meta(self, config: Any, namer: Callable[[str], str]) -> dict[str, Any]:
        import promptdelta

        return {"format": FORMAT_VERSION, "method": self.method, "name": self.name,
                "config": config_to_dict(config), "targets": [namer(t) for t in self.targets],
                "fingerprint": model_fingerprint(self.model),
                "versions": {"promptdelta": getattr(promptdelta, "__version__", "unknown"),
                             "torch": torch.__version__}}


# --------------------------------------------------------------------------------------------- folders
def _prepare_folder(path: str | Path, overwrite: bool) -> Path:
    """The folder to write a delta to: refused if it is a file, or exists without ``overwrite=True``."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} exists and is not a folder; pass a folder path for the delta.")
    if folder.exists() and not overwrite:
        raise CheckpointError(f"{folder} already exists; pass overwrite=True to replace the delta there, "
                              f"or choose another path.")
    return folder


# --------------------------------------------------------------------------------------------- attach
def _freeze_rest(model: nn.Module, st: _ModelDeltaState, before: list[tuple[nn.Parameter, bool]]) -> None:
    """Record the pre-attach requires_grad of base parameters (first record wins), then freeze non-deltas."""
    for p, flag in before:
        st.requires_grad.setdefault(id(p), (p, flag))
    delta_ids = _delta_param_ids(st)
    for p in model.parameters():
        p.requires_grad_(id(p) in delta_ids)


def attach(model: nn.Module, method: str, targets: str | Sequence[str] | None = None,
           name: str | None = None, **cfg: Any) -> DeltaHandle:
    """Attach delta ``method`` (e.g. "lora", "bitfit") to ``model``'s ``targets``; freeze everything else.

    ``targets`` overrides the method's default (its config's ``targets``); ``cfg`` are the method's config
    keys (unknown keys raise ConfigError). Several deltas may coexist under different ``name``s.
    """
    cls = get_delta_method(method)
    saved = cfg.pop("modules_to_save", None)   # whole modules trained and saved with the delta (saved.py)
    if targets is not None:
        cfg["targets"] = targets
    family_default = targets is None and "targets" not in cfg and _family_targets(model, method, cls, cfg)
    config = build_config(cls.config_cls, cfg, method)
    name = name or method
    st = _state(model)
    if st is not None and name in st.deltas:
        raise DeltaError(f"a delta named {name!r} is already attached to this model "
                         f"(attached: {sorted(st.deltas)}); pass another name=..., or detach it first.")
    impl = cls(config, name)
    if saved:
        from promptdelta.deltas.saved import SavedModules
        impl = SavedModules(impl, saved)
    sites = impl.select(model, match_targets(model, getattr(config, "targets", None),
                                             warn_unused=not (family_default or _default_targets(cls, cfg, config))))
    _check_not_owned(model, impl, sites)
    known = _delta_param_ids(st) if st is not None else set()
    before = [(p, p.requires_grad) for p in model.parameters() if id(p) not in known]   # base params only
    _apply_or_roll_back(model, impl, sites, method, before)
    st = _state(model, create=True)
    handle = DeltaHandle(model, method, impl, [s.name for s in sites])
    st.deltas[name] = handle
    _freeze_rest(model, st, before)
    from promptdelta.deltas.merge import install_save_guard
    install_save_guard(model)   # save_pretrained writes the base model + the deltas beside it, never wrapper keys
    logger.info("attached delta %r (%s) to %d modules", name, method, len(sites))
    return handle


def _family_targets(model: nn.Module, method: str, cls: type[DeltaMethod], cfg: dict[str, Any]) -> bool:
    """Put the default targets of the model's family (``backbones.registry``; native backbones and
    transformers models of a registered family) for ``method`` into ``cfg``; True when it did."""
    from promptdelta.backbones.registry import family_of, hf_family

    family = family_of(model) or hf_family(model)
    if family is None or "targets" not in {f.name for f in dataclasses.fields(cls.config_cls)}:
        return False
    placement = cfg.get("placement", getattr(cls.config_cls, "placement", None))
    found = family.targets_for(method, placement if isinstance(placement, str) else None)
    if found is None:
        return False
    cfg["targets"] = list(found)
    return True


def _apply_or_roll_back(model: nn.Module, impl: DeltaMethod, sites: list[ModuleSite], method: str,
                        before: list[tuple[nn.Parameter, bool]]) -> None:
    """``impl.apply(sites)``; if it fails, undo what it did (every wrapped site, hooks, added modules) and put
    the requires_grad flags back, so nothing stays attached; a non-promptdelta error becomes a DeltaError."""
    try:
        impl.apply(sites)
    except BaseException as exc:
        try:
            impl.remove()
        except Exception as undo:   # the method's own state was too broken to undo: say so, keep the cause
            logger.error("rolling back the failed %s attach also failed: %s", method, undo)
        for p, flag in before:
            p.requires_grad_(flag)
        if isinstance(exc, PromptDeltaError) or not isinstance(exc, Exception):
            raise
        raise DeltaError(f"{method} could not be attached to {type(model).__name__} ({type(exc).__name__}: "
                         f"{exc}); nothing was attached. Choose other targets or another delta method.") from exc


def _default_targets(cls: type[DeltaMethod], cfg: dict[str, Any], config: Any) -> bool:
    """The config's targets are the method's defaults, written for every family (so one a family lacks, such
    as T5 v1.1's FFN gate elsewhere, is not worth a warning)."""
    if "targets" not in cfg:
        return True
    default = cls.config_cls(**{k: v for k, v in cfg.items() if k != "targets"})
    return getattr(default, "targets", None) == getattr(config, "targets", None)


def _check_not_owned(model: nn.Module, impl: DeltaMethod, sites: list[ModuleSite]) -> None:
    """Refuse targets whose module is wrapped by, or whose parameters belong to, another delta."""
    st = _state(model)
    if st is None:
        return
    owned = {id(p): h.name for h in st.deltas.values() for _, p in h._method.named_delta_parameters()}
    for s in sites:
        if isinstance(s.parent, DeltaWrapper) and impl.wraps_modules:
            raise DeltaError(f"module {s.name!r} is already wrapped by delta {s.parent.delta_name!r}; "
                             f"choose other targets for {impl.name!r} or detach that delta first.")
        for p in s.module.parameters(recurse=False):
            if id(p) in owned and impl.trains_base_parameters:
                raise DeltaError(f"parameters of {s.name!r} already belong to delta {owned[id(p)]!r}; "
                                 f"choose other targets for {impl.name!r} or detach that delta first.")


# --------------------------------------------------------------------------------------------- load (checks.py)
def load_delta(model: nn.Module, path: str | Path, name: str | None = None, strict: bool = True) -> DeltaHandle:
    """Re-attach the delta saved in ``path`` to ``model`` with its saved config, and load its weights.

    ``path`` is a promptdelta delta folder (``handle.save``) or a PEFT adapter folder (``adapter_config.json``).
    The folder's manifest, format version, field types and tensors are checked first; names are canonical,
    so a delta saved on a native backbone loads onto the transformers model with the same weights and back.
    Refuses (CheckpointError) a checkpoint made for another model; ``strict=False`` lets a model with the
    same structure but other weights through with a warning.
    """
    folder = Path(path)
    if (folder / PEFT_CONFIG_FILE).is_file() and not (folder / META_FILE).is_file():
        from promptdelta.deltas.peft_format import load_peft
        return load_peft(model, folder, name=name)
    meta = read_meta(folder)
    verify_manifest(folder, [WEIGHTS_FILE, META_FILE], required=meta.get("format", 1) >= 2)
    tensors = read_weights(folder / WEIGHTS_FILE)
    cls = get_delta_method(meta["method"])
    config = config_from_meta(cls, meta["config"], folder / META_FILE)
    namer = canonical_namer(model)
    want_targets = [namer(t) for t in meta["targets"]]
    # a LoRA on a fused projection (GPT-2's c_attn) <-> on its split parts (q/k/v_proj): rewritten when exact
    want_targets, tensors = split_or_fuse(model, meta["method"], want_targets, tensors, folder)
    check_fingerprint(model, meta["fingerprint"], folder, strict, want_targets, _original_overrides(model))
    try:
        handle = attach(model, meta["method"], name=name or meta["name"], **config)
    except (ConfigError, DeltaError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / META_FILE}: its config does not attach ({exc}); fix the file or save "
                              f"the delta again.") from None
    try:
        if [namer(t) for t in handle.targets] != want_targets and "targets" in config:
            handle.detach()   # the saved pattern means other modules here (a transformers model): name them
            own = {namer(s.name): s.name for s in iter_sites(model)}
            exact = "re:(?:" + "|".join(re.escape(own.get(t, t)) for t in want_targets) + ")"
            handle = attach(model, meta["method"], name=name or meta["name"], **{**config, "targets": exact})
        if [namer(t) for t in handle.targets] != want_targets:
            raise CheckpointError(f"delta {folder} was attached to {len(want_targets)} modules but its "
                                  f"config matches {len(handle.targets)} here; load it onto the model it was made for.")
        own_keys = {namer(k): k for k, _ in handle.named_parameters()}
        handle.load_state_dict({own_keys.get(namer(k), k): t for k, t in tensors.items()})
    except BaseException:
        if handle.attached:
            handle.detach()
        raise
    return handle
