"""Checks that a saved delta folder is whole and made for this model, before anything is attached.

``load_delta`` (base.py) runs them in order: the folder's files are present and ``delta.json`` holds the
fields of its format with the right types (``read_meta``); each saved config value has the type of the
method's field and is finite (``config_from_meta``); the tensors read and are finite (``read_weights``);
the base model's weights match the fingerprint the delta was saved with (``check_fingerprint``: tensor by
tensor under canonical names, see fingerprint.py). Every failure is one ``CheckpointError`` /
``MissingFileError`` line naming the file, the field or the tensor, and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from promptdelta.deltas.fingerprint import legacy_fingerprint, weights_fingerprint
from promptdelta.errors import CheckpointError, MissingFileError

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "delta.safetensors"
META_FILE = "delta.json"
FORMAT_VERSION = 2   # 2: canonical names, full-weight fingerprint, manifest.json; 1 still loads (warning)
PEFT_CONFIG_FILE = "adapter_config.json"


def read_meta(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise MissingFileError(f"delta folder {folder} does not exist; pass the folder written by handle.save().")
    for fname in (META_FILE, WEIGHTS_FILE):
        if not (folder / fname).is_file():
            raise MissingFileError(f"{folder / fname} is missing; a delta folder needs {META_FILE} and "
                                   f"{WEIGHTS_FILE} as written by handle.save() (or PEFT's {PEFT_CONFIG_FILE}).")
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder / META_FILE} is not valid JSON ({exc}); save the delta again.") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{folder / META_FILE} holds a {type(meta).__name__}, not an object; save the delta again.")
    for key in ("method", "name", "config", "targets", "fingerprint"):
        if key not in meta:
            raise CheckpointError(f"{folder / META_FILE} lacks the key {key!r}; save the delta again.")
    check_meta_types(meta, folder / META_FILE)
    return meta


def check_meta_types(meta: dict[str, Any], where: Path) -> None:
    """Types of delta.json's own fields, and the format version this promptdelta reads."""
    version = meta.get("format", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{where}: format {version!r} is not one this promptdelta reads (1..{FORMAT_VERSION}); "
                              f"load it with the promptdelta version that wrote it, or save the delta again.")
    expected = {"method": str, "name": str, "config": dict, "targets": list, "fingerprint": dict}
    for key, typ in expected.items():
        if not isinstance(meta[key], typ) or (typ is str and not meta[key]):
            raise CheckpointError(f"{where}: {key!r} must be a {'non-empty ' if typ is str else ''}{typ.__name__}, "
                                  f"not {meta[key]!r:.60}; save the delta again.")
    if not all(isinstance(t, str) for t in meta["targets"]):
        raise CheckpointError(f"{where}: 'targets' must list module names (strings); save the delta again.")


def config_from_meta(cls: type, cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """Check each saved config value against the type of the method's default (bool, int, float, str,
    list) and that numbers are finite, before the config's own range checks run."""
    fields = {f.name: f for f in dataclasses.fields(cls.config_cls)}
    for key, value in cfg.items():
        if key == "modules_to_save":   # not a method key: attach() takes it for every method (deltas/saved.py)
            if not (isinstance(value, list) and all(isinstance(x, str) for x in value)):
                raise CheckpointError(f"{where}: config modules_to_save={value!r:.60} should be a list of module "
                                      f"names; fix delta.json or save the delta again.")
            continue
        f = fields.get(key)
        if f is None:
            raise CheckpointError(f"{where}: config key {key!r} is unknown to delta method {cls.__name__} "
                                  f"(known: {sorted(fields)}); save the delta again with this promptdelta.")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")   # "float", "list[str] | str"
        ok = {"bool": lambda v: isinstance(v, bool),
              "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "str": lambda v: isinstance(v, str)}.get(kind.replace(" ", "").replace("|None", ""), lambda v: True)
        if kind.startswith("list") or "| list" in kind:
            ok = lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))  # noqa: E731
        if not ok(value) and not (value is None and "None" in kind):
            raise CheckpointError(f"{where}: config {key}={value!r:.60} should be of type {kind}; fix delta.json "
                                  f"or save the delta again.")
        if isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(f"{where}: config {key}={value!r} is not a finite number; fix delta.json or "
                                  f"save the delta again.")
    # keys a method added later, with the value that reproduces a folder saved before them (e.g. intrinsic names)
    legacy = getattr(cls.config_cls, "SAVED_WITHOUT", {})
    return {**{k: v for k, v in legacy.items() if k not in cfg}, **cfg}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError on bad files
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); it is corrupt or "
                              f"truncated: save the delta again.") from exc
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {key} holds NaN/inf values; the delta is corrupt or diverged "
                                  f"in training: save a good one again.")
    return tensors


def check_fingerprint(model: nn.Module, saved: dict[str, Any], folder: Path, strict: bool,
                      targets: Sequence[str], overrides: dict[int, torch.Tensor]) -> None:
    """Compare the model's weights with those the delta was made for, tensor by tensor under canonical names.

    Architectures differ (error) when no tensor is shared, a shared tensor's shape differs, or a target
    module's weights are missing here; other values (another checkpoint) are an error unless ``strict=False``.
    """
    if "tensors" not in saved:   # format 1: own names, sampled weights
        here: dict[str, Any] = {"model_class": type(model).__name__, **legacy_fingerprint(model, overrides)}
        other = saved.get("weights") != here["weights"]
        differ = saved.get("structure") != here["structure"]
        detail = ""
    else:
        here = weights_fingerprint(model, overrides)
        want, have = saved["tensors"], here["tensors"]
        if not isinstance(want, dict) or not all(
                isinstance(v, list) and len(v) == 2 and isinstance(v[0], list) and isinstance(v[1], str)
                for v in want.values()):
            raise CheckpointError(f"{folder / META_FILE}: fingerprint.tensors is not an object of [shape, sha256] "
                                  f"entries; save the delta again.")
        common = [n for n in want if n in have]
        needed = [n for n in want if any(n.startswith(t + ".") for t in targets)]
        mismatch = _first_mismatch(want, have, common, needed)
        differ = mismatch is not None
        changed = [n for n in common if want[n][1] != have[n][1]]
        other = bool(changed)
        detail = f" ({len(changed)} of {len(common)} tensors differ, e.g. {changed[0]})" if changed else ""
    made_for = f"{saved.get('model_class')} (structure {str(saved.get('structure'))[:12]})"
    if differ:
        where = f" ({mismatch})" if "tensors" in saved else ""
        raise CheckpointError(f"delta {folder} was made for {made_for}, but this model is {here['model_class']} "
                              f"(structure {here['structure'][:12]}): the architectures differ{where}. Load it onto "
                              f"the model it was trained with.")
    _check_targets_exist(model, targets, folder)
    if other:
        msg = (f"delta {folder} was made for a {made_for} with other pretrained weights than this "
               f"{here['model_class']}{detail}; load it onto the checkpoint it was trained with")
        if strict:
            raise CheckpointError(msg + ", or pass strict=False if you are sure the weights are compatible.")
        logger.warning("%s (loading anyway: strict=False)", msg)


def _check_targets_exist(model: nn.Module, targets: Sequence[str], folder: Path) -> None:
    """Every module the delta sits on (canonical names) is a module here too: a delta on a fused projection
    (one weight for q, k and v) cannot move to a model that keeps them apart, nor back (a LoRA is rewritten
    before this check where that is exact: deltas/fused.py)."""
    from promptdelta.deltas.fingerprint import canonical_namer
    from promptdelta.deltas.sites import iter_sites

    namer = canonical_namer(model)
    here = {namer(s.name) for s in iter_sites(model)}
    lost = [t for t in targets if t not in here]
    if lost:
        raise CheckpointError(f"delta {folder} sits on {lost[0]} ({len(lost)} of its {len(targets)} modules), which "
                              f"this {type(model).__name__} has no module for: a delta on a module only one side has "
                              f"(a projection fused on one side, one weight for q, k and v, and split on the other) "
                              f"cannot carry over. "
                              f"Load it onto the kind of model it was trained on (transformers or native), or train "
                              f"it again on this one.")


def _first_mismatch(want: dict[str, list], have: dict[str, list], common: list[str], needed: list[str]) -> str | None:
    """The first way the saved base model's tensors (name -> [shape, sha256]) differ in architecture from this
    model's, in words (a shape, a target's missing weight, nothing shared); None when they do not."""
    if not common:
        return f"no tensor name in common, e.g. {next(iter(want), '?')} there, {next(iter(have), '?')} here"
    shapes = [n for n in common if list(want[n][0]) != list(have[n][0])]
    if shapes:
        n = shapes[0]
        return f"{len(shapes)} tensor shapes differ, e.g. {n}: {list(want[n][0])} there, {list(have[n][0])} here"
    lost = [n for n in needed if n not in have]
    if lost:
        return f"the delta's modules hold {len(lost)} tensors this model lacks, e.g. {lost[0]}"
    return None
