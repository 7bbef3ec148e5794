"""Declarative HF <-> native key tables, shared by every backbone family.

A family declares a ``KeyTable``: rules ``(hf_pattern, native_pattern)`` where ``{}`` stands for a layer
index and a rule names either a module (``"encoder.layer.{}.attention.self.query"``, the trailing
``.weight`` / ``.bias`` is carried over) or one exact parameter (``"cls.predictions.bias"``). The functions
here map a whole state dict, check every key and shape against the native model, and fail with a
``BackboneError`` that lists missing, unexpected and mis-shaped keys by name.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping

import torch
from torch import nn

from promptdelta.errors import BackboneError

logger = logging.getLogger(__name__)

_MAX_LISTED = 20  # keys listed per category in an error message
_PROBE = "918273645"  # a layer index no real model has: stands for {} while a pattern goes through the rules


def _compile(pattern: str) -> re.Pattern[str]:
    """``"a.{}.b"`` -> regex matching ``a.<int>.b`` optionally followed by one ``.leaf`` component."""
    body = re.escape(pattern).replace(r"\{\}", r"(\d+)")
    return re.compile(rf"^{body}(\.[^.]+)?$")


def _translate(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for regex, target in rules:
        match = regex.match(key)
        if match:
            *indices, leaf = match.groups()
            return target.format(*indices) + (leaf or "")
    return None


@dataclass(frozen=True)
class KeyTable:
    """How one family's HF checkpoint keys map onto its native parameter names.

    family:   name used in error messages ("bert").
    rules:    (hf_pattern, native_pattern) pairs; the first matching rule wins.
    prefixes: HF model-class prefixes stripped before matching (``"bert."`` in BertForMaskedLM).
    ignore:   regexes (``re.search``) of HF keys dropped with a debug log (buffers, unused heads).
    tied:     native key -> native key it shares storage with (a tied decoder); the tied copy may be
              absent from a checkpoint and is always filled from its source.
    fused:    (hf_module_pattern, native part patterns): one HF tensor that holds several native ones, stacked
              along dim 0 in the native (out, in) layout (GPT-2's ``c_attn`` = q, k, v). It has no single
              native name (``to_native`` gives None); ``fused_parts`` names its parts, so a fingerprint hashes
              each third under the name the native backbone gives it.
    """

    family: str
    rules: tuple[tuple[str, str], ...]
    prefixes: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    tied: Mapping[str, str] = field(default_factory=dict)
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @cached_property
    def _fused(self) -> list[tuple[re.Pattern[str], tuple[str, ...]]]:
        return [(_compile(hf), parts) for hf, parts in self.fused]

    @cached_property
    def _forward(self) -> list[tuple[re.Pattern[str], str]]:
        return [(_compile(hf), native) for hf, native in self.rules]

    @cached_property
    def _reverse(self) -> list[tuple[re.Pattern[str], str]]:
        return [(_compile(native), hf) for hf, native in self.rules]

    def strip_prefix(self, hf_key: str) -> str:
        for prefix in self.prefixes:
            if hf_key.startswith(prefix):
                return hf_key[len(prefix):]
        return hf_key

    def is_ignored(self, hf_key: str) -> bool:
        return any(re.search(pattern, hf_key) for pattern in self.ignore)

    def to_native(self, hf_key: str) -> str | None:
        """Native name of an HF key (prefix stripped), or None when no rule matches or the key is fused."""
        if self.fused_parts(hf_key) is not None:
            return None
        return _translate(self.strip_prefix(hf_key), self._forward)

    def fused_parts(self, hf_key: str) -> list[str] | None:
        """Native names of the parts of a fused HF module or tensor (``h.0.attn.c_attn.bias`` ->
        ``layers.0.attn.{q,k,v}_proj.bias``), in their order along dim 0; None when the key is not fused."""
        key = self.strip_prefix(hf_key)
        for regex, parts in self._fused:
            match = regex.match(key)
            if match:
                *indices, leaf = match.groups()
                return [part.format(*indices) + (leaf or "") for part in parts]
        return None

    def fused_modules(self) -> list[tuple[str, tuple[str, ...]]]:
        """(name pattern, native part patterns) of each fused HF module, under the name a delta checkpoint gives
        it: the longest prefix the rules rename, then the rest (``h.{}.attn.c_attn`` -> ``layers.{}.attn.c_attn``)."""
        out = []
        for hf, parts in self.fused:
            probe = hf.replace("{}", _PROBE)          # a layer index the rules match, then put back as {}
            keys = probe.split(".")
            for i in range(len(keys) - 1, 0, -1):     # the fused module itself has no native name: its prefixes
                native = _translate(".".join(keys[:i]), self._forward)
                if native is not None:
                    out.append((".".join([native, *keys[i:]]).replace(_PROBE, "{}"), parts))
                    break
        return out

    def to_hf(self, native_key: str) -> str | None:
        """HF name (without model-class prefix) of a native key, or None when no rule matches."""
        return _translate(native_key, self._reverse)


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(shown) + more


def _mismatch_error(table: KeyTable, missing: list[str], unexpected: list[str], shapes: list[str]) -> BackboneError:
    text = f"the checkpoint's weights do not fit the native {table.family} model:"
    if missing:
        text += _listing("missing from the checkpoint", missing)
    if unexpected:
        text += _listing("unexpected in the checkpoint (no place in the model)", unexpected)
    if shapes:
        text += _listing("shape mismatch (checkpoint vs model)", shapes)
    text += ("\nFix: make sure config.json belongs to these weights and that the checkpoint is a plain "
             f"{table.family} model (not a task head or another architecture).")
    return BackboneError(text)


def _map_keys(hf_state: Mapping[str, torch.Tensor], table: KeyTable) -> tuple[dict, dict, list[str]]:
    """Rename HF keys: (native -> tensor, native -> original HF key, HF keys no rule matched)."""
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmatched: list[str] = []
    for hf_key, tensor in hf_state.items():
        if table.is_ignored(hf_key):
            logger.debug("ignoring checkpoint key %s (%s)", hf_key, table.family)
            continue
        native = table.to_native(hf_key)
        if native is None:
            unmatched.append(hf_key)
        elif native in mapped:
            logger.debug("%s duplicates %s (both map to %s); keeping the first", hf_key, origin[native], native)
        else:
            mapped[native], origin[native] = tensor, hf_key
    return mapped, origin, unmatched


def _fill_tied(mapped: dict, origin: dict, table: KeyTable, target: Mapping[str, torch.Tensor]) -> list[str]:
    """Replace tied copies with their source tensor; returns shape-mismatch lines for the tied copies."""
    shapes = []
    for tied, source in table.tied.items():
        if tied not in target:
            continue
        given = mapped.pop(tied, None)
        if given is not None and tuple(given.shape) != tuple(target[tied].shape):
            shapes.append(f"{origin[tied]} -> {tied}: {tuple(given.shape)} vs {tuple(target[tied].shape)}")
        elif given is not None and source in mapped and not torch.equal(given, mapped[source]):
            logger.warning("%s differs from %s, but the native %s model ties them; using %s",
                           origin[tied], origin[source], table.family, source)
        if source in mapped:
            mapped[tied] = mapped[source]
    return shapes


def hf_to_native_state(hf_state: Mapping[str, torch.Tensor], table: KeyTable,
                       model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an HF state dict to ``model``'s names, checking that every key is present and every shape fits."""
    target = model.state_dict()
    mapped, origin, unexpected = _map_keys(hf_state, table)
    shapes = _fill_tied(mapped, origin, table, target)
    missing = [f"{k} (HF: {table.to_hf(k)})" for k in target if k not in mapped]
    unexpected += [f"{origin[k]} (-> {k})" for k in mapped if k not in target]
    shapes += [f"{origin.get(k, k)} -> {k}: {tuple(v.shape)} vs {tuple(target[k].shape)}"
               for k, v in mapped.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    if missing or unexpected or shapes:
        raise _mismatch_error(table, missing, unexpected, shapes)
    return {k: v for k, v in mapped.items() if k in target}


def load_hf_state(model: nn.Module, hf_state: Mapping[str, torch.Tensor], table: KeyTable) -> nn.Module:
    """Copy HF weights into ``model`` (in place, strict) and return it."""
    model.load_state_dict(hf_to_native_state(hf_state, table, model), strict=True)
    return model


def native_to_hf_state(native_state: Mapping[str, torch.Tensor], table: KeyTable,
                       hf_model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict ``hf_model`` needs, taken from native weights through the same table.

    Driven by the HF model's own keys, so aliases of one tensor (a tied decoder, a shared bias) all get it.
    Every native weight must land somewhere: a native key no HF key uses is reported as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing, shapes = [], []
    for hf_key, hf_tensor in hf_model.state_dict().items():
        if table.is_ignored(hf_key):
            continue
        native = table.to_native(hf_key)
        if native is None or native not in native_state:
            missing.append(f"{hf_key} (native: {native})")
        elif tuple(native_state[native].shape) != tuple(hf_tensor.shape):
            shapes.append(f"{native} -> {hf_key}: {tuple(native_state[native].shape)} vs {tuple(hf_tensor.shape)}")
        else:
            out[hf_key] = native_state[native]
            used.add(native)
    unexpected = [k for k in native_state if k not in used]
    if missing or unexpected or shapes:
        raise _mismatch_error(table, missing, unexpected, shapes)
    return out


def load_into_hf(hf_model: nn.Module, native_state: Mapping[str, torch.Tensor], table: KeyTable) -> nn.Module:
    """Copy native weights into a ``transformers`` model (ignored HF buffers keep their values)."""
    result = hf_model.load_state_dict(native_to_hf_state(native_state, table, hf_model), strict=False)
    left = [k for k in result.missing_keys if not table.is_ignored(k)]
    if left or result.unexpected_keys:
        raise _mismatch_error(table, left, list(result.unexpected_keys), [])
    return hf_model
