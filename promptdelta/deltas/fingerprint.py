"""What a delta folder is checked against: the base model's fingerprint and the folder's manifest.

Names are canonical: on a ``transformers`` model of a family with a key table, each module and parameter
name is mapped to the native name it stands for (``table_namer``), so a delta saved on a native backbone
loads onto the transformers model with the same weights and back. The fingerprint hashes every value of
every base tensor (sha256 of the fp32 values; a Conv1D weight transposed, as the native (out, in) layout),
cached per tensor. ``manifest.json`` records the size and sha256 of each file of a folder, written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from promptdelta.deltas.sites import base_named_parameters, hf_key_table, iter_sites
from promptdelta.errors import CheckpointError
from promptdelta.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
_SAMPLES_PER_PARAM = 16
_FP_CACHE_ATTR = "_promptdelta_fingerprint_cache"


def canonical_namer(model: nn.Module) -> Callable[[str], str]:
    """``name -> canonical name`` for module and parameter names of ``model``: the native name on a
    ``transformers`` model of a family with a key table (``bert.encoder.layer.0.attention.self.query.lora_A``
    -> ``layers.0.attn.q_proj.lora_A``), the name itself otherwise. Checkpoints and fingerprints use these
    names so a delta moves between a native backbone and the transformers model with the same weights."""
    return table_namer(hf_key_table(model))


def table_namer(table: Any) -> Callable[[str], str]:
    """``HF name -> native name`` through a backbone ``KeyTable`` (identity without one): the longest module
    prefix the table knows is renamed, the rest (``lora_A``, ``adapter.down.weight``) carried over."""
    if table is None:
        return lambda key: key

    def name(key: str) -> str:
        parts = key.split(".")
        for i in range(len(parts), 0, -1):   # longest module prefix the table knows; the rest is carried over
            native = table.to_native(".".join(parts[:i]))
            if native is not None:
                return ".".join([native, *parts[i:]])
        return key
    return name


def _transposed_ids(model: nn.Module) -> set[int]:
    """Weights stored (in, out) (transformers' Conv1D, GPT-2): hashed transposed, as the native (out, in)."""
    return {id(s.module.weight) for s in iter_sites(model)
            if type(s.module).__name__ == "Conv1D" and isinstance(getattr(s.module, "weight", None), torch.Tensor)}


def _tensor_digest(t: torch.Tensor, transpose: bool = False) -> str:
    """sha256 of every value (fp32, contiguous, row-major; 2-D ``t`` transposed first if asked)."""
    t = t.detach().t() if transpose else t.detach()
    a = t.to("cpu", torch.float32).contiguous()
    return hashlib.sha256(a.numpy().tobytes()).hexdigest()


def _cached_digest(cache: dict[Any, tuple[tuple, str]], t: torch.Tensor, transpose: bool, slot: Any = None) -> str:
    """Per-tensor digest, reused while the tensor's storage, version counter and a 16-value sample are
    unchanged (the sample catches writes through ``.data``, which bypass the version counter)."""
    flat = t.detach().reshape(-1)
    idx = torch.linspace(0, max(flat.numel() - 1, 0), min(_SAMPLES_PER_PARAM, flat.numel())).round().long()
    key = (t.data_ptr(), t._version, tuple(t.shape), t.dtype, transpose, flat[idx.to(flat.device)].to("cpu").tolist())
    slot = id(t) if slot is None else slot
    hit = cache.get(slot)
    if hit is None or hit[0] != key:
        hit = (key, _tensor_digest(t, transpose))
        cache[slot] = hit
    return hit[1]


def weights_fingerprint(model: nn.Module, overrides: dict[int, torch.Tensor]) -> dict[str, Any]:
    """Identify the base model by its weights under canonical names (native names; see ``canonical_namer``);
    ``overrides`` gives the value to hash instead of a parameter (by ``id``).

    tensors   = {canonical name: [shape, sha256 of every value (fp32)]}, delta parameters excluded, each
                delta's recorded pre-attach values used where it changed a parameter in place (BitFit, merged
                LoRA), Conv1D weights hashed transposed (so native and transformers GPT-2 agree), a fused
                tensor the key table splits (``KeyTable.fused``: GPT-2's c_attn) hashed part by part;
    structure = sha256 of the sorted (name, shape) pairs;  weights = sha256 of the sorted (name, digest) pairs.
    Digests are cached on the model and recomputed when a tensor changes (data pointer, version counter).
    """
    table = hf_key_table(model)
    namer, transposed = table_namer(table), _transposed_ids(model)
    cache = model.__dict__.setdefault(_FP_CACHE_ATTR, {})
    tensors: dict[str, list] = {}
    for own, p in base_named_parameters(model):
        t = overrides.get(id(p), p)
        flip = id(p) in transposed and t.dim() == 2
        parts = table.fused_parts(own) if table is not None else None
        if parts:   # one tensor holding several native ones (GPT-2's c_attn): each part under its native name
            rows = (t.detach().t() if flip else t.detach()).chunk(len(parts), dim=0)   # native (out, in) rows
            for i, (name, part) in enumerate(zip(parts, rows)):
                tensors[name] = [list(part.shape), _cached_digest(cache, part, False, (id(p), i))]
            continue
        tensors[namer(own)] = [list(t.shape)[::-1] if flip else list(t.shape), _cached_digest(cache, t, flip)]
    h_struct, h_weights = hashlib.sha256(), hashlib.sha256()
    for name in sorted(tensors):
        h_struct.update(f"{name}:{tuple(tensors[name][0])};".encode())
        h_weights.update(f"{name}:{tensors[name][1]};".encode())
    return {"model_class": type(model).__name__, "structure": h_struct.hexdigest(),
            "weights": h_weights.hexdigest(), "tensors": tensors}


def legacy_fingerprint(model: nn.Module, overrides: dict[int, torch.Tensor]) -> dict[str, str]:
    """The format-1 fingerprint (own names, 16 sampled values per tensor), to check folders saved before
    format 2 against."""
    h_struct, h_weights = hashlib.sha256(), hashlib.sha256()
    for name, p in sorted(base_named_parameters(model), key=lambda kv: kv[0]):
        h_struct.update(f"{name}:{tuple(p.shape)};".encode())
        if p.numel():
            flat = overrides.get(id(p), p).detach().reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, min(_SAMPLES_PER_PARAM, flat.numel())).round().long()
            h_weights.update(flat[idx.to(flat.device)].to("cpu", torch.float32).numpy().tobytes())
    return {"structure": h_struct.hexdigest(), "weights": h_weights.hexdigest()}


# --------------------------------------------------------------------------------------------- manifest
def _digest_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path, names: Sequence[str], version: int = 2) -> Path:
    """``manifest.json``: size and sha256 of each file in ``names`` (written last, atomically)."""
    files = {n: {"bytes": (folder / n).stat().st_size, "sha256": _digest_file(folder / n)} for n in names}
    return atomic_write_json(folder / MANIFEST_FILE, {"format": version, "files": files})


def verify_manifest(folder: Path, names: Sequence[str], required: bool) -> None:
    """Check every file in ``names`` against ``manifest.json``; a missing manifest raises when ``required``,
    else logs a warning (folders written before the manifest existed)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path} is missing, so the delta's files cannot be verified; save the "
                                  f"delta again with handle.save().")
        logger.warning("%s has no %s (saved by an older promptdelta): loading it without a checksum check; "
                       "save it again to add one", folder, MANIFEST_FILE)
        return
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        entries = {n: (int(files[n]["bytes"]), str(files[n]["sha256"])) for n in names}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a valid manifest ({type(exc).__name__}: {exc}); save the delta "
                              f"again.") from None
    for n, (size, sha) in entries.items():
        f = folder / n
        if f.stat().st_size != size or _digest_file(f) != sha:
            raise CheckpointError(f"{f} does not match its sha256 in {MANIFEST_FILE} (edited, truncated or "
                                  f"corrupted); save the delta again, or restore the original file.")
