"""Where deltas go: canonical module names, target matching, and putting wrappers in and out.

Names are *canonical*: a module wrapped by a delta keeps its original name (the wrapper's inner ``base``
child is reported under the wrapper's name), so targets, checkpoints and fingerprints never see wrappers.

Targets: an exact module name, a last-component/suffix match (``"q_proj"`` or ``"attn.q_proj"`` match
``layers.0.attn.q_proj``), or a regex (``re.fullmatch``) when the target string starts with ``"re:"``.
They match the model's own module names and, on a ``transformers`` model, also the native names its modules
stand for: read from the key table of its registered family (``backbones.registry``), and for any model from
its module structure (``structure.py``: ``model.layers.0.self_attn.o_proj`` is ``layers.0.attn.o_proj``). So
the methods' default targets, written in native names, fit every kind of model without a per-architecture
name map in the delta library. ``"all-linear"`` names every linear layer (``nn.Linear`` and transformers'
``Conv1D``) but the output head.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from torch import nn

from promptdelta.errors import DeltaError

logger = logging.getLogger(__name__)


class DeltaWrapper(nn.Module):
    """Base of modules that wrap an original module kept as the child ``base``.

    Everything else a wrapper holds (its own parameters and other children) is delta state; canonical names
    and fingerprints look only through ``base``, and attributes the wrapper lacks are read from ``base``.
    ``enabled`` switches the delta off (``disabled()``); ``merge``/``unmerge`` are no-ops unless the wrapper
    can fold itself into ``base``.
    """

    base: nn.Module
    delta_name: str = ""
    enabled: bool = True

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks (``weight``, ``in_features``, a block's ``attn``...) are read from the
        wrapped module, so code that inspects a layer (T5's FFN casting to ``wo.weight.dtype``) still works.
        A subclass registers a parameter or child that ``base`` also has (AddedBias.bias) before ``base``."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base")
            if name == "base" or base is None:
                raise
            return getattr(base, name)

    def merge(self) -> None:
        """Fold the delta into ``base`` (idempotent); a no-op for wrappers that cannot."""

    def unmerge(self) -> None:
        """Undo ``merge`` exactly (idempotent)."""


@dataclass
class ModuleSite:
    """Where a module sits: canonical ``name``, the ``module``, and the ``parent``/``attr`` holding it."""

    name: str
    module: nn.Module
    parent: nn.Module | None
    attr: str


def iter_sites(model: nn.Module) -> Iterator[ModuleSite]:
    """Every module of ``model`` under its canonical name (root excluded, pre-order), through wrappers."""
    yield from _walk("", model)


def _walk(prefix: str, parent: nn.Module) -> Iterator[ModuleSite]:
    wrapper = isinstance(parent, DeltaWrapper)
    children = [("base", parent.base)] if wrapper else list(parent.named_children())
    for attr, child in children:
        name = prefix if wrapper else (f"{prefix}.{attr}" if prefix else attr)  # wrapped keeps its name
        if not isinstance(child, DeltaWrapper):
            yield ModuleSite(name, child, parent, attr)
        yield from _walk(name, child)


def base_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters of the base model under canonical names (delta parameters of wrappers excluded)."""
    out, seen = [], set()
    for p_name, p in model.named_parameters(recurse=False):
        out.append((p_name, p))
        seen.add(id(p))
    for site in iter_sites(model):
        for p_name, p in site.module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.append((f"{site.name}.{p_name}", p))
    return out


def wrap_site(site: ModuleSite, wrapper: DeltaWrapper, delta_name: str) -> DeltaWrapper:
    """Put ``wrapper`` (whose ``base`` is ``site.module``) where the module was: ``setattr(parent, attr, ...)``."""
    wrapper.delta_name = delta_name
    wrapper.train(site.module.training)
    setattr(site.parent, site.attr, wrapper)
    return wrapper


def unwrap_sites(pairs: Sequence[tuple[ModuleSite, DeltaWrapper]]) -> None:
    """Undo ``wrap_site`` for each pair, last first: unmerge, then the original module back in its place."""
    for site, wrapper in reversed(pairs):
        wrapper.unmerge()
        setattr(site.parent, site.attr, site.module)


# --------------------------------------------------------------------------------------------- families
def native_family(model: nn.Module) -> str | None:
    """The registered family name of a native backbone (``backbones.registry``), None for any other module."""
    from promptdelta.backbones.registry import family_of

    family = family_of(model)
    return family.name if family is not None else None


def hf_key_table(model: nn.Module) -> Any:
    """The backbones' HF <-> native ``KeyTable`` for a ``transformers`` model of a registered family (read from
    ``config.model_type``); None for native backbones and other models."""
    from promptdelta.backbones.registry import hf_family

    family = hf_family(model)
    if family is None:
        return None
    try:
        return family.key_table(model.config)
    except Exception as e:   # a family registered for loading only has no key table: fall back to structure
        logger.debug("family %s gives no key table for %s (%s)", family.name, type(model).__name__, e)
        return None


def canonical_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Own module name -> the native names it stands for, on a ``transformers`` model with a key table.

    Leaf modules are translated by the table; a fused projection the table splits (GPT-2's ``c_attn``, read
    as ``c_attn_q/_k/_v``) stands for all its parts. A module that holds exactly the leaves of one native
    sublayer or block (GPT-2's ``h.0.mlp`` -> ``layers.0.mlp``, T5's ``DenseReluDense``, BERT's
    ``encoder.layer.0`` -> ``layers.0``) gets that name too. Native backbones map every name to itself.
    """
    names = [s.name for s in iter_sites(model)]
    if native_family(model) is not None:
        return {n: [n] for n in names}
    from promptdelta.deltas.structure import structural_aliases

    table = hf_key_table(model)           # a registered family's key table, else the module structure
    if table is None:
        return structural_aliases(model)
    leaves: dict[str, list[str]] = {}
    for n in names:
        own = _module_native(table, n)
        parts = [own] if own else [a for a in (_module_native(table, f"{n}_{p}") for p in "qkv") if a]
        if parts:
            leaves[n] = parts
    return {**leaves, **_container_aliases(set(names), leaves)}


def _module_native(table: Any, name: str) -> str | None:
    """The native name of a module a rule of ``table`` names as a whole. ``table.to_native`` also carries one
    trailing component (a parameter's ``.weight``), which on module names would give a container inside a named
    block (BERT's ``encoder.layer.0.attention`` under the ladder's ``encoder.layer.{}`` rule) a native name that
    does not exist; containers get theirs from the leaves they hold (_container_aliases)."""
    if table.fused_parts(name) is not None:
        return None
    key = table.strip_prefix(name)
    for hf, native in table.rules:
        match = _whole_rule(hf).fullmatch(key)
        if match:
            return native.format(*match.groups())
    return None


@functools.lru_cache(maxsize=None)
def _whole_rule(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)"))


def _container_aliases(names: set[str], leaves: dict[str, list[str]]) -> dict[str, list[str]]:
    """Own name -> native parents (``layers.0.attn``, ``layers.0``) whose leaves it holds, and nothing else."""
    groups: dict[str, list[str]] = {}                  # native parent -> own names of its leaves
    for own, natives in leaves.items():
        for native in natives:
            comps = native.split(".")
            for k in range(1, len(comps)):
                groups.setdefault(".".join(comps[:k]), []).append(own)
    out: dict[str, list[str]] = {}
    for parent, owns in groups.items():
        anc = _common_ancestor(owns)
        if anc not in names or anc in leaves:
            continue
        inside = [a for o, natives in leaves.items() if o.startswith(anc + ".") for a in natives]
        if all(a.startswith(parent + ".") for a in inside):
            out.setdefault(anc, []).append(parent)
    return out


def _common_ancestor(names: list[str]) -> str:
    """Deepest module name that contains every name in ``names`` (a single name: its parent)."""
    split = [n.split(".") for n in names]
    common = []
    for comps in zip(*split):
        if len(set(comps)) > 1:
            break
        common.append(comps[0])
    if len(common) == min(len(s) for s in split):   # one of them contains the others: take its parent
        common = common[:-1]
    return ".".join(common)


# --------------------------------------------------------------------------------------------- targets
def _target_matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def normalise_targets(targets: Any) -> list[str] | None:
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise DeltaError(f"targets={targets!r} is not usable; pass a module name, a list of names "
                         f"(e.g. ['q_proj', 'v_proj']) or a regex string 're:<pattern>'.")
    for t in targets:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as exc:
                raise DeltaError(f"target {t!r} is not a valid regex ({exc}); fix the pattern after 're:'.")
    return list(targets)


ALL_LINEAR = "all-linear"


def _all_linear(model: nn.Module, sites: list[ModuleSite], rest: list[str]) -> list[ModuleSite]:
    """Every linear layer but the output head, and what the other targets name (``["all-linear", "x"]``)."""
    from promptdelta.deltas.structure import is_linear, output_heads

    heads = {id(m) for m in output_heads(model)}
    extra = {id(s.module) for s in match_targets(model, rest)} if rest else set()
    hits = [s for s in sites if (is_linear(s.module) and id(s.module) not in heads) or id(s.module) in extra]
    if not hits:
        raise DeltaError(f"targets 'all-linear' match no linear layer of {type(model).__name__} (its output head is "
                         f"left out); name the modules to adapt instead.")
    return hits


def _module_name_sample(model: nn.Module, k: int = 12) -> str:
    names = [s.name for s in iter_sites(model) if next(s.module.parameters(recurse=False), None) is not None]
    lasts = sorted({n.rsplit(".", 1)[-1] for n in names})
    step = max(1, len(names) // k)
    return f"sample of names: {names[::step][:k]}; last components: {lasts[:30]}"


def match_targets(model: nn.Module, targets: str | Sequence[str] | None,
                  warn_unused: bool = True) -> list[ModuleSite]:
    """Modules of ``model`` named by ``targets`` (None = every module), by their own or their native names
    (see the module doc). Raises DeltaError if none match; logs a warning for targets that match nothing."""
    pats = normalise_targets(targets)
    sites = list(iter_sites(model))
    if pats is None:
        return sites
    if ALL_LINEAR in pats:
        return _all_linear(model, sites, [p for p in pats if p != ALL_LINEAR])
    aliases = canonical_aliases(model)
    names = {s.name: [s.name, *aliases.get(s.name, ())] for s in sites}
    hit = lambda s, p: any(_target_matches(n, p) for n in names[s.name])  # noqa: E731
    hits = [s for s in sites if any(hit(s, p) for p in pats)]
    if not hits:
        raise DeltaError(f"targets {pats} match no module of {type(model).__name__} ({_module_name_sample(model)}). "
                         f"Pass exact names, last components such as 'query', or 're:<pattern>'.")
    unused = [p for p in pats if not any(hit(s, p) for s in hits)]
    if unused and warn_unused:
        logger.warning("targets %s matched no module of %s", unused, type(model).__name__)
    return hits
