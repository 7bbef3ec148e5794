"""Training checkpoints that survive crashes: write atomically, verify before loading, keep the last K.

Layout of ``<checkpoint_dir>/step-00000120/``::

    tensors.safetensors   every tensor: trainable parameters (``param.*``), the best dev snapshot (``best.*``),
                          optimizer state (``optim.<param index>.<key>``), torch RNG states (``rng.*``)
    state.json            everything else: step, data position, history, best score, optimizer param groups,
                          scheduler and grad-scaler state, Python and NumPy RNG states
    manifest.json         written LAST: size and SHA-256 of the two files above

Each file is written with temp file + fsync + rename (:mod:`promptdelta.utils.io`). A folder without a
manifest, or whose files do not match it (truncated, edited, half copied), is incomplete: the newest
*complete* checkpoint is used and the broken one is skipped with a warning, never loaded. safetensors +
JSON (not pickle) means loading a checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from promptdelta.errors import CheckpointError
from promptdelta.utils.io import atomic_save_safetensors, atomic_write_json

logger = logging.getLogger(__name__)

TENSORS, STATE, MANIFEST = "tensors.safetensors", "state.json", "manifest.json"
_NAME = re.compile(r"^step-(\d{8,})$")
FORMAT_VERSION = 1


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_path(root: str | Path, step: int) -> Path:
    """``<root>/step-<step:08d>``."""
    return Path(root) / f"step-{step:08d}"


def save_checkpoint(root: str | Path, step: int, tensors: Mapping[str, torch.Tensor],
                    state: Mapping[str, Any], keep_last: int = 2) -> Path:
    """Write one checkpoint (tensors, then state, then the manifest) and delete all but the newest ``keep_last``."""
    path = checkpoint_path(root, step)
    if path.exists():
        shutil.rmtree(path)          # an earlier, possibly partial, write of the same step
    atomic_save_safetensors(path / TENSORS, tensors)
    atomic_write_json(path / STATE, {"format_version": FORMAT_VERSION, **state})
    files = {name: {"bytes": (path / name).stat().st_size, "sha256": _digest(path / name)}
             for name in (TENSORS, STATE)}
    atomic_write_json(path / MANIFEST, {"format_version": FORMAT_VERSION, "step": step, "files": files})
    _prune(Path(root), keep_last)
    return path


def _prune(root: Path, keep_last: int) -> None:
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless the manifest exists and every file matches its size and hash."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has no readable manifest ({e.__class__.__name__}); "
                              "it was interrupted while being written: delete it or resume from an older one") from None
    for name in (TENSORS, STATE):
        f = path / name
        want = files.get(name, {}) if isinstance(files, dict) else {}
        if not f.is_file() or f.stat().st_size != want.get("bytes") or _digest(f) != want.get("sha256"):
            raise CheckpointError(f"checkpoint file {str(f)!r} is missing or does not match its manifest "
                                  "(truncated or modified); delete the folder or resume from an older checkpoint")


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``; incomplete or corrupt ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            logger.warning("skipping checkpoint: %s", e)
            continue
        return path
    return None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify and read one checkpoint -> (tensors, state). Raises :class:`CheckpointError` if it is broken."""
    from safetensors.torch import load_file

    path = Path(path)
    verify_checkpoint(path)
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {state.get('format_version')!r}, this "
                              f"promptdelta reads {FORMAT_VERSION}; resume with the version that wrote it")
    return load_file(str(path / TENSORS)), state


# Training settings a resumed run must share with its checkpoint: any change would continue the run with a
# mix of the old and the new settings (the optimizer, scheduler and data order come from the checkpoint).
RESUME_KEYS = ("lr", "head_lr", "epochs", "max_steps", "batch_size", "grad_accum", "seed", "warmup_ratio",
               "weight_decay", "max_grad_norm", "precision", "metric", "eval_every", "patience", "fast_dropout")
# Keys added after checkpoints were first written, with the value that reproduces a checkpoint made before them
# (fast_dropout: older checkpoints trained with torch's dropout, whose masks the fused kernel does not draw).
ADDED_LATER = {"fast_dropout": False}


def check_resume(path: str | Path, state: Mapping[str, Any], config: Mapping[str, Any], n_train: int) -> None:
    """Raise :class:`CheckpointError` when ``config`` (a TrainConfig as a dict) or the training-set size differ
    from what the checkpoint at ``path`` was written with, naming every difference."""
    saved = dict(state.get("config") or {})
    if saved:
        saved.update({k: v for k, v in ADDED_LATER.items() if k not in saved and k in config})
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {config.get(k)!r}" for k in RESUME_KEYS
             if k in saved and saved.get(k) != config.get(k)]
    order = state.get("order") or []
    if order and len(order) != n_train:
        diffs.append(f"training examples: checkpoint {len(order)}, now {n_train} (shots or data changed)")
    if diffs:
        raise CheckpointError(f"cannot resume from {str(path)!r}: the settings differ ({'; '.join(diffs)}); "
                              "resume with the settings the run started with, or start a new run without resume")


# ---- optimizer / RNG state <-> (tensors, JSON) -------------------------------------------------------
def optimizer_to_flat(opt_state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> tensors ``optim.<idx>.<key>`` + JSON (param groups, non-tensor state)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in opt_state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_flat`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, extra in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RNG states of torch (CPU, CUDA), the Trainer's shuffling ``generator``, Python and NumPy."""
    import random

    import numpy as np

    tensors = {"rng.torch": torch.get_rng_state(), "rng.generator": generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    meta = {"python": [version, list(internal), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def restore_rng(generator: torch.Generator, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    import random

    import numpy as np

    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
