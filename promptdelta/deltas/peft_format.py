"""PEFT's adapter folder, both ways: ``handle.save(dir, format="peft")`` and ``load_delta(model, dir)``.

A PEFT folder holds ``adapter_config.json`` (``peft_type``, ``r``, ``lora_alpha``, ...) and
``adapter_model.safetensors`` with keys ``base_model.model.<transformers module>.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r): the same tensors as our ``lora_A`` / ``lora_B`` and the same maths,
``y = W0 x + (alpha / r) B A x`` (``alpha / sqrt(r)`` with ``use_rslora``). So the conversion is a rename:
on a ``transformers`` model its own module names are written; on a native backbone the canonical names are
mapped back to the transformers names through the family's key table (``backbones/keymap.py``), with the
model-class prefix (``bert.``, ``transformer.``, ``model.``) of the class ``to_hf()`` builds.

GPT-2: the native backbone splits the fused ``c_attn`` into q/k/v projections. A native LoRA on them is
written as one LoRA on ``c_attn`` of rank 3r (``A = [A_q; A_k; A_v]``, ``B = diag(B_q, B_k, B_v)``, alpha
scaled so alpha'/r' = alpha/r) through PEFT's ``rank_pattern`` / ``alpha_pattern``; a PEFT LoRA on
``c_attn`` loads onto the native q/k/v as ``A`` shared and ``B`` split by rows (exact both ways).

Covered: LoRA (r, alpha, dropout, targets, rslora, bias "none"); prefix tuning (our plain prefixes <-> PEFT
PREFIX_TUNING without projection, one-stack models: exact on a transformers decoder, where both are a KV
cache; on a native backbone or a transformers encoder (BERT, RoBERTa ...: ours keeps positions) PEFT's numbering of the input positions after the P prefix positions differs
from ours (from 0), so outputs agree when it gets ``position_ids`` from P: said in a warning);
prompt tuning (a SoftTemplate's soft prompt <-> PROMPT_TUNING: ``export_prompt_tuning`` /
``import_prompt_tuning``); IA3 (keys ``<module>.ia3_l``, (out, 1) for an output-scaling vector and (1, in) for
one of PEFT's ``feedforward_modules``; not on GPT-2's fused c_attn). Not covered, refused with a one-line CheckpointError naming the option: DoRA,
LoRA bias, LoRA on embeddings, ``modules_to_save``, different ranks or alphas per module, PEFT's prefix MLP
(``prefix_projection``), encoder-decoder prefixes, and every other PEFT method.
PEFT folders carry no fingerprint of the base model: only module names and shapes are checked on load.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from promptdelta.deltas.base import (PEFT_CONFIG_FILE, DeltaHandle, _prepare_folder, _read_weights, attach,
                                     canonical_namer, hf_key_table, iter_sites, native_family, table_namer)
from promptdelta.deltas.prefix_hf import encoder_only
from promptdelta.errors import CheckpointError, DeltaError, MissingFileError
from promptdelta.utils.io import atomic_save_safetensors, atomic_write_json

logger = logging.getLogger(__name__)

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_ROOT = "base_model.model."
_FUSED_QKV = re.compile(r"^(?P<layer>h\.\d+\.attn)\.c_attn_(?P<part>[qkv])$")   # GPT-2 key table's split names
# PEFT LoRA options promptdelta has no counterpart for: option -> values that mean "not used"
_UNSUPPORTED = {"use_dora": (False, None), "lora_bias": (False, None), "modules_to_save": (None, []),
                "layer_replication": (None, []), "target_parameters": (None, []), "trainable_token_indices": (None,),
                "use_qalora": (False, None), "alora_invocation_tokens": (None,), "use_bdlora": (None, False),
                "megatron_config": (None,), "arrow_config": (None,)}
# (target_modules, exclude_modules, layers_to_transform and the init options only decide where PEFT put LoRAs
# and how it started them: the saved tensors name every adapted module, so they need no counterpart)


# --------------------------------------------------------------------------------------------- names
def _native_table(model: nn.Module) -> Any:
    """The HF <-> native key table of a native backbone's family (from the family registry)."""
    from promptdelta.backbones.registry import family_of

    record = family_of(model)
    return None if record is None else record.key_table(model.config)


def _hf_fuses_qkv(model: nn.Module) -> bool:
    """Whether the native backbone's transformers checkpoint keeps q|k|v in one Conv1D (GPT-2's c_attn)."""
    from promptdelta.backbones.registry import family_of

    record = family_of(model)
    return record is not None and record.hf_fused_qkv


def _hf_names(model: nn.Module, hf_prefix: str | None) -> Callable[[str], str | None]:
    """Own module name -> the transformers module name PEFT keys use (None: no transformers counterpart)."""
    if native_family(model) is None:
        return lambda name: name
    table = _native_table(model)
    if table is None:
        raise DeltaError(f"no transformers key table for the native {native_family(model)!r} backbone, so its "
                         f"module names cannot be written in PEFT's format; save with format='promptdelta'.")
    prefix = hf_prefix if hf_prefix is not None else (
        table.prefixes[0] if getattr(model, "has_lm_head", False) and table.prefixes else "")
    return lambda name: (lambda hf: None if hf is None else prefix + hf)(table.to_hf(name))


# --------------------------------------------------------------------------------------------- save
def save_peft(handle: DeltaHandle, path: str | Path, overwrite: bool = False, hf_prefix: str | None = None) -> Path:
    """Write ``handle`` (a LoRA delta) as a PEFT adapter folder that ``peft.PeftModel.from_pretrained`` and
    transformers' ``model.load_adapter`` load onto the matching transformers model.

    ``hf_prefix``: the model-class prefix of the transformers model the folder is for (a native backbone
    defaults to the class its ``to_hf()`` builds: ``"bert."`` with an MLM head, ``""`` without)."""
    if getattr(handle._method, "inner", None) is not None:   # modules_to_save (saved.py)
        raise DeltaError(f"delta {handle.name!r} carries modules_to_save (trained copies of whole modules), which "
                         f"save(format='peft') does not write; save it with format='promptdelta'.")
    if handle.method == "prefix":
        return _save_prefix(handle, _prepare_folder(path, overwrite))
    if handle.method == "ia3":
        return _save_ia3(handle, path, overwrite, hf_prefix)
    if handle.method != "lora":
        raise DeltaError(f"delta {handle.name!r} is a {handle.method!r} delta; PEFT's format is written for 'lora', "
                         f"'ia3' and 'prefix' only ({handle.method} has no PEFT counterpart with the same outputs): save it "
                         f"with format='promptdelta'.")
    c = handle.config
    folder = _prepare_folder(path, overwrite)
    to_hf = _hf_names(handle.model, hf_prefix)
    tensors: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}   # GPT-2 c_attn -> part -> (A, B)
    for (site, w) in handle._method.sites:
        hf = to_hf(site.name)
        if hf is None:
            raise DeltaError(f"module {site.name!r} has no transformers counterpart; save with format='promptdelta'.")
        m = re.search(r"\.c_attn_(?P<part>[qkv])$", hf)   # GPT-2: the key table's split name of the fused c_attn
        if m:
            fused.setdefault(hf[:-2], {})[m.group("part")] = (w.lora_A, w.lora_B)
            continue
        tensors[f"{_ROOT}{hf}.lora_A.weight"] = w.lora_A.detach().contiguous()   # (r, in)
        tensors[f"{_ROOT}{hf}.lora_B.weight"] = w.lora_B.detach().contiguous()   # (out, r)
    rank_pattern, alpha_pattern = {}, {}
    for hf, parts in fused.items():
        a, b = _fuse_qkv(parts)
        tensors[f"{_ROOT}{hf}.lora_A.weight"], tensors[f"{_ROOT}{hf}.lora_B.weight"] = a, b
        rank_pattern[hf] = 3 * c.r
        alpha_pattern[hf] = c.alpha * (math.sqrt(3) if c.rslora else 3)   # alpha'/f(3r) == alpha/f(r)
    modules = sorted({k[len(_ROOT):].rsplit(".lora_", 1)[0] for k in tensors})
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
              "r": c.r, "lora_alpha": c.alpha, "lora_dropout": c.dropout, "target_modules": modules,
              "bias": "none", "use_rslora": c.rslora, "use_dora": False, "fan_in_fan_out": _fan_in_fan_out(handle, fused),
              "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "peft_version": _peft_version()}
    atomic_save_safetensors(folder / PEFT_WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    atomic_write_json(folder / PEFT_CONFIG_FILE, config)
    logger.info("saved delta %r in PEFT's format (%d modules) to %s", handle.name, len(modules), folder)
    return folder


def _fuse_qkv(parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k/v LoRAs -> one LoRA on the fused projection: A (3r, in) stacked, B (3 out, 3r) block diagonal
    (a part without a LoRA gets zeros)."""
    ref_a, ref_b = next(iter(parts.values()))
    r, d_in, d_out = ref_a.shape[0], ref_a.shape[1], ref_b.shape[0]
    a = torch.zeros(3 * r, d_in, dtype=ref_a.dtype)
    b = torch.zeros(3 * d_out, 3 * r, dtype=ref_b.dtype)
    for i, part in enumerate("qkv"):
        if part in parts:
            a[i * r:(i + 1) * r] = parts[part][0].detach()
            b[i * d_out:(i + 1) * d_out, i * r:(i + 1) * r] = parts[part][1].detach()
    return a, b


def _fan_in_fan_out(handle: DeltaHandle, fused: dict) -> bool:
    """PEFT's flag for (in, out) weights: true on GPT-2 (Conv1D), whichever kind of model we hold."""
    return bool(fused) or _hf_fuses_qkv(handle.model) or any(w.fan_in_fan_out for _, w in handle._method.sites)


def _peft_version() -> str:
    try:
        import peft
        return str(peft.__version__)
    except ImportError:
        return "0.0.0"


# --------------------------------------------------------------------------------------------- load
def _read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); save the adapter again.") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a {type(config).__name__}, not an object; save the adapter again.")
    return config


def read_peft_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict; CheckpointError for anything but a LoRA or prefix config we support."""
    path = folder / PEFT_CONFIG_FILE
    config = _read_json(path)
    kind = config.get("peft_type")
    if kind == "PREFIX_TUNING":
        return _check_prefix_config(config, path)
    if kind == "IA3":
        return _check_ia3_config(config, path)
    if kind == "PROMPT_TUNING":
        raise CheckpointError(f"{path}: PEFT method 'PROMPT_TUNING' is a soft prompt, not a delta on the model; "
                              f"load it into a SoftTemplate with promptdelta.import_prompt_tuning(template, folder).")
    if kind != "LORA":
        raise CheckpointError(f"{path}: PEFT method {kind!r} is not one promptdelta reads (LORA, IA3, PREFIX_TUNING, and "
                              f"PROMPT_TUNING through import_prompt_tuning; see docs/guide/export.md); merge it "
                              f"with PEFT or train the delta with promptdelta.")
    for key, unused in _UNSUPPORTED.items():
        if key in config and config[key] not in unused:
            raise CheckpointError(f"{path}: PEFT option {key}={config[key]!r:.60} has no promptdelta counterpart; "
                                  f"save the adapter without it (or merge it with PEFT's merge_and_unload).")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: PEFT option bias={config['bias']!r} (trained biases) is not supported; "
                              f"only bias='none' loads.")
    for key, ok in (("r", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                    ("lora_alpha", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                     and math.isfinite(v) and v > 0),
                    ("lora_dropout", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1),
                    ("use_rslora", lambda v: isinstance(v, bool))):
        if key in config and not ok(config[key]):
            raise CheckpointError(f"{path}: {key}={config[key]!r:.60} is out of range or of the wrong type; "
                                  f"save the adapter again.")
    pattern = config.get("alpha_pattern") or {}
    if not isinstance(pattern, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and v > 0 for k, v in pattern.items()):
        raise CheckpointError(f"{path}: alpha_pattern={pattern!r:.60} should map module names to positive "
                              f"numbers; save the adapter again.")
    return config


def load_peft(model: nn.Module, path: str | Path, name: str | None = None) -> DeltaHandle:
    """Attach the LoRA adapter in the PEFT folder ``path`` to ``model`` (native backbone or transformers model)
    and load its weights. Module names are matched under canonical names, so an adapter trained with PEFT on
    ``BertModel`` loads onto ``BertForMaskedLM`` or the native BERT with the same weights."""
    folder = Path(path)
    if not (folder / PEFT_WEIGHTS_FILE).is_file():
        raise MissingFileError(f"{folder / PEFT_WEIGHTS_FILE} is missing; a PEFT folder needs {PEFT_CONFIG_FILE} "
                               f"and {PEFT_WEIGHTS_FILE} (the .bin format is not read: re-save with safetensors).")
    config = read_peft_config(folder)
    raw = _read_weights(folder / PEFT_WEIGHTS_FILE)
    if config["peft_type"] == "PREFIX_TUNING":
        return _load_prefix(model, folder, config, raw, name)
    if config["peft_type"] == "IA3":
        return _load_ia3(model, folder, raw, name)
    pairs = _scaled(_lora_pairs(raw, folder), config)    # HF module -> (A (r, in), B (out, r), scale)
    if native_family(model) is not None:
        canon = table_namer(_native_table(model))
        pairs = _split_fused(pairs) if _hf_fuses_qkv(model) else pairs
    else:
        canon = canonical_namer(model)
    own = {canon(s.name): s.name for s in iter_sites(model)}
    wanted: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for hf, abs_ in pairs.items():
        target = own.get(canon(hf))
        if target is None:
            raise CheckpointError(f"{folder}: the adapter adapts {hf!r}, which {type(model).__name__} does not have; "
                                  f"load it onto the model it was trained for.")
        wanted[target] = abs_
    ranks, scales = {a.shape[0] for a, _, _ in wanted.values()}, {sc for _, _, sc in wanted.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise CheckpointError(f"{folder}: the adapter's modules have different ranks {sorted(ranks)} or scales "
                              f"{sorted(scales)} (rank_pattern / alpha_pattern); promptdelta's LoRA has one rank "
                              f"and one alpha per delta.")
    r, rslora = ranks.pop(), bool(config.get("use_rslora", False))
    alpha = scales.pop() * (math.sqrt(r) if rslora else r)
    exact = "re:(?:" + "|".join(re.escape(t) for t in wanted) + ")"
    handle = attach(model, "lora", name=name or "peft", targets=exact, r=r, alpha=alpha,
                    dropout=float(config.get("lora_dropout", 0.0)), rslora=rslora)
    try:
        handle.load_state_dict({f"{t}.{k}": v for t, (a, b, _) in wanted.items()
                                for k, v in (("lora_A", a), ("lora_B", b))})
    except BaseException:
        handle.detach()
        raise
    logger.info("loaded PEFT LoRA adapter %s onto %d modules as delta %r", folder, len(wanted), handle.name)
    return handle


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scaled(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
            config: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Each module's LoRA with its scale, alpha_m / r_m (alpha_m / sqrt(r_m) with rslora), r_m its A's rows."""
    alpha = float(config.get("lora_alpha", 8))
    root = math.sqrt if config.get("use_rslora") else float
    return {m: (a, b, float(_pattern_value(config.get("alpha_pattern"), m, alpha)) / root(a.shape[0]))
            for m, (a, b) in pairs.items()}


def _lora_pairs(raw: dict[str, torch.Tensor], folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    a_keys: dict[str, torch.Tensor] = {}
    b_keys: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            what = "LoRA on embeddings" if "lora_embedding" in key else (
                "DoRA" if "magnitude" in key else "a tensor that is not a LoRA A/B matrix")
            raise CheckpointError(f"{folder / PEFT_WEIGHTS_FILE}: {key} is {what}, which promptdelta does not load.")
        if t.dim() != 2 or not t.is_floating_point():
            raise CheckpointError(f"{folder / PEFT_WEIGHTS_FILE}: {key} has shape {tuple(t.shape)} ({t.dtype}); a "
                                  f"LoRA matrix is a 2-D float tensor: save the adapter again.")
        (a_keys if m.group("ab") == "A" else b_keys)[m.group("mod")] = t
    if not a_keys or set(a_keys) != set(b_keys):
        raise CheckpointError(f"{folder / PEFT_WEIGHTS_FILE}: LoRA A and B matrices do not pair up "
                              f"({sorted(set(a_keys) ^ set(b_keys))[:3]}); save the adapter again.")
    return {m: (a_keys[m], b_keys[m]) for m in sorted(a_keys)}


def _split_fused(pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """GPT-2's fused c_attn LoRA -> q/k/v LoRAs of the native backbone: B split by output rows, A shared; a
    block-diagonal B (as ``save_peft`` writes) gives each part its own rows of A and keeps the rank r, and an
    all-zero part is left out. The scale is unchanged in both cases (our alpha follows the rank)."""
    out = {}
    for mod, (a, b, scale) in pairs.items():
        if not mod.endswith(".c_attn"):
            out[mod] = (a, b, scale)
            continue
        d, rank = b.shape[0] // 3, a.shape[0]
        blocks = [b[i * d:(i + 1) * d] for i in range(3)]
        diag = rank % 3 == 0 and all(
            not blk[:, :i * (rank // 3)].any() and not blk[:, (i + 1) * (rank // 3):].any() for i, blk in enumerate(blocks))
        for i, part in enumerate("qkv"):
            if diag:
                cols = slice(i * (rank // 3), (i + 1) * (rank // 3))
                pa, pb = a[cols], blocks[i][:, cols]
                if not pb.any() and not pa.any():
                    continue
                out[f"{mod}_{part}"] = (pa, pb, scale)
            else:
                out[f"{mod}_{part}"] = (a, blocks[i], scale)
    return out


# --------------------------------------------------------------------------------------------- prompt tuning
_TASK_BY_KIND = {"mlm": "FEATURE_EXTRACTION", "clm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


def _prompt_rows(template: Any) -> torch.Tensor:
    """The n prompt-tuning vectors of a SoftTemplate: the first ``num_tokens`` rows of ``soft_embeds``."""
    n = getattr(template, "num_tokens", None)
    embeds = getattr(template, "soft_embeds", None)
    if not isinstance(n, int) or not isinstance(embeds, torch.Tensor) or embeds.dim() != 2:
        raise DeltaError(f"{type(template).__name__} is not a SoftTemplate (prompt tuning: num_tokens soft vectors "
                         f"before the text); only a SoftTemplate has PEFT's PROMPT_TUNING format.")
    return embeds[:n]   # (n, H)


def export_prompt_tuning(template: Any, path: str | Path, task_type: str | None = None,
                         overwrite: bool = False) -> Path:
    """Write a SoftTemplate's soft prompt (Lester et al. 2021) as PEFT's PROMPT_TUNING adapter folder:
    ``prompt_embeddings`` (n, H) and a config with ``num_virtual_tokens`` = n, ``token_dim`` = H.

    PEFT puts the n vectors before the whole input, special tokens included (``p_1..p_n [CLS] x [SEP]``);
    our SoftTemplate puts them after a leading special token (``[CLS] p_1..p_n x [SEP]``): the same for
    models without one (GPT-2, Llama, T5's encoder), one position apart for BERT / RoBERTa.
    ``task_type`` defaults from the template's kind (mlm: FEATURE_EXTRACTION, clm: CAUSAL_LM, seq2seq:
    SEQ_2_SEQ_LM)."""
    rows = _prompt_rows(template).detach().to("cpu").contiguous()
    folder = _prepare_folder(path, overwrite)
    kind = getattr(template, "kind", None)
    config = {"peft_type": "PROMPT_TUNING", "task_type": task_type or _TASK_BY_KIND.get(kind, "FEATURE_EXTRACTION"),
              "num_virtual_tokens": int(rows.shape[0]), "token_dim": int(rows.shape[1]),
              "num_transformer_submodules": 2 if kind == "seq2seq" else 1, "num_attention_heads": None,
              "num_layers": None, "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
              "tokenizer_name_or_path": None, "tokenizer_kwargs": None, "base_model_name_or_path": None,
              "inference_mode": True, "modules_to_save": None, "peft_version": _peft_version()}
    atomic_save_safetensors(folder / PEFT_WEIGHTS_FILE, {"prompt_embeddings": rows}, metadata={"format": "pt"})
    atomic_write_json(folder / PEFT_CONFIG_FILE, config)
    return folder


def import_prompt_tuning(template: Any, path: str | Path) -> Any:
    """Copy the soft prompt of a PEFT PROMPT_TUNING folder into a SoftTemplate with the same ``num_tokens``
    and width (in place; returns the template)."""
    folder = Path(path)
    if not (folder / PEFT_CONFIG_FILE).is_file() or not (folder / PEFT_WEIGHTS_FILE).is_file():
        raise MissingFileError(f"{folder} is not a PEFT folder: it needs {PEFT_CONFIG_FILE} and {PEFT_WEIGHTS_FILE}.")
    config = _read_json(folder / PEFT_CONFIG_FILE)
    if config.get("peft_type") != "PROMPT_TUNING":
        kind = config.get("peft_type")
        raise CheckpointError(f"{folder}: PEFT method {kind!r} is not PROMPT_TUNING; load LoRA folders with "
                              f"load_delta(model, folder).")
    if config.get("num_transformer_submodules", 1) not in (1, None):
        raise CheckpointError(f"{folder}: num_transformer_submodules={config['num_transformer_submodules']} "
                              f"(an encoder-decoder prompt); promptdelta's SoftTemplate holds one prompt.")
    prompt = _read_weights(folder / PEFT_WEIGHTS_FILE).get("prompt_embeddings")
    rows = _prompt_rows(template)
    if prompt is None or tuple(prompt.shape) != tuple(rows.shape):
        got = None if prompt is None else tuple(prompt.shape)
        raise CheckpointError(f"{folder}: prompt_embeddings has shape {got}, the template's prompt "
                              f"{tuple(rows.shape)}; build the SoftTemplate with num_tokens={config.get('num_virtual_tokens')}"
                              f" on the backbone the prompt was trained for.")
    with torch.no_grad():
        rows.copy_(prompt.to(rows.dtype))
    return template


# --------------------------------------------------------------------------------------------- prefix tuning
_POSITIONS = ("PEFT feeds prefixes as a key/value cache, so transformers numbers the input's positions from P "
              "(the prefix length); promptdelta's prefix delta numbers them from 0. Outputs agree when the "
              "model with promptdelta's prefix gets position_ids starting at P")


def _save_prefix(handle: DeltaHandle, folder: Path) -> Path:
    """A prefix delta (plain prefixes) as PEFT PREFIX_TUNING without projection: ``prompt_embeddings``
    (P, 2 L nh hd), laid out as PEFT's view(P, 2L, nh, hd).permute(2, 0, 1, 3) expects (layer l's keys
    at 2l, values at 2l + 1)."""
    config, tensors = handle._method.export_state()
    parts = sorted({k.split(".")[1] for k in tensors})
    if parts != ["layers"]:
        raise DeltaError(f"prefix delta {handle.name!r} has the parts {parts} (an encoder-decoder); PEFT's prefix "
                         f"format holds one prefix for every attention layer: save it with format='promptdelta'.")
    keys, values = tensors["prefix.layers.keys"], tensors["prefix.layers.values"]   # (L, nh, P, hd) each
    L, nh, P, hd = keys.shape
    kv = torch.stack([keys, values], dim=1).reshape(2 * L, nh, P, hd)               # (2L, nh, P, hd)
    rows = kv.permute(2, 0, 1, 3).reshape(P, 2 * L * nh * hd).contiguous()          # (P, 2L nh hd)
    kind = getattr(handle.model, "kind", None)
    peft_config = {"peft_type": "PREFIX_TUNING", "task_type": _TASK_BY_KIND.get(kind, "FEATURE_EXTRACTION"),
                   "num_virtual_tokens": P, "token_dim": nh * hd, "num_layers": L, "num_attention_heads": nh,
                   "num_transformer_submodules": 1, "encoder_hidden_size": nh * hd, "prefix_projection": False,
                   "base_model_name_or_path": None, "inference_mode": True, "modules_to_save": None,
                   "peft_version": _peft_version()}
    atomic_save_safetensors(folder / PEFT_WEIGHTS_FILE, {"prompt_embeddings": rows}, metadata={"format": "pt"})
    atomic_write_json(folder / PEFT_CONFIG_FILE, peft_config)
    if native_family(handle.model) is not None or encoder_only(handle.model):   # a transformers decoder: no shift
        logger.warning("saved prefix delta %r in PEFT's format to %s. %s.", handle.name, folder, _POSITIONS)
    return folder


def _check_prefix_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    if config.get("prefix_projection"):
        raise CheckpointError(f"{path}: PEFT option prefix_projection=True (the prefix MLP) is not read; save the "
                              f"adapter with prefix_projection=False.")
    if config.get("num_transformer_submodules", 1) not in (1, None):
        raise CheckpointError(f"{path}: num_transformer_submodules={config['num_transformer_submodules']} (an "
                              f"encoder-decoder prefix) is not read; promptdelta's T5 prefix has its own parts.")
    for key in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim"):
        v = config.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CheckpointError(f"{path}: {key}={v!r:.40} should be a positive integer; save the adapter again.")
    return config


def _load_prefix(model: nn.Module, folder: Path, config: dict[str, Any], raw: dict[str, torch.Tensor],
                 name: str | None) -> DeltaHandle:
    P, L, nh = config["num_virtual_tokens"], config["num_layers"], config["num_attention_heads"]
    hd = config["token_dim"] // nh
    rows = raw.get("prompt_embeddings")
    if rows is None or tuple(rows.shape) != (P, 2 * L * nh * hd):
        got = None if rows is None else tuple(rows.shape)
        raise CheckpointError(f"{folder / PEFT_WEIGHTS_FILE}: prompt_embeddings has shape {got}, its config says "
                              f"{(P, 2 * L * nh * hd)}; save the adapter again.")
    kv = rows.view(P, 2 * L, nh, hd).permute(1, 2, 0, 3)                             # (2L, nh, P, hd)
    handle = attach(model, "prefix", name=name or "peft", num_tokens=P, reparam=False)
    try:
        handle.load_state_dict({"prefix.layers.keys": kv[0::2], "prefix.layers.values": kv[1::2]})
    except BaseException:
        handle.detach()
        raise
    if native_family(model) is not None or encoder_only(model):
        logger.warning("loaded PEFT prefix adapter %s as prefix delta %r. %s.", folder, handle.name, _POSITIONS)
    return handle


# --------------------------------------------------------------------------------------------- IA3
def _save_ia3(handle: DeltaHandle, path: str | Path, overwrite: bool, hf_prefix: str | None) -> Path:
    """An IA3 delta as PEFT's IA3 folder: ``<module>.ia3_l`` of shape (out, 1), or (1, in) for the input-scaling
    (feedforward) layers, which the config lists in ``feedforward_modules``."""
    if _hf_fuses_qkv(handle.model):
        raise DeltaError(f"IA3 delta {handle.name!r} is on a native backbone whose transformers model fuses q|k|v "
                         f"(GPT-2's c_attn), which PEFT's IA3 cannot scale per part; save with format='promptdelta'.")
    to_hf = _hf_names(handle.model, hf_prefix)
    tensors, ff = {}, []
    for site, w in handle._method.sites:
        hf = to_hf(site.name)
        if hf is None:
            raise DeltaError(f"module {site.name!r} has no transformers counterpart; save with format='promptdelta'.")
        l = w.ia3_l.detach()
        tensors[f"{_ROOT}{hf}.ia3_l"] = (l.view(1, -1) if w.feedforward else l.view(-1, 1)).contiguous()
        if w.feedforward:
            ff.append(hf)
    folder = _prepare_folder(path, overwrite)
    modules = sorted(k[len(_ROOT):].rsplit(".ia3_l", 1)[0] for k in tensors)
    config = {"peft_type": "IA3", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
              "target_modules": modules, "feedforward_modules": sorted(ff), "fan_in_fan_out": False,
              "modules_to_save": None, "init_ia3_weights": True, "peft_version": _peft_version()}
    atomic_save_safetensors(folder / PEFT_WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    atomic_write_json(folder / PEFT_CONFIG_FILE, config)
    logger.info("saved IA3 delta %r in PEFT's format (%d modules) to %s", handle.name, len(modules), folder)
    return folder


def _check_ia3_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    for key, unused in (("fan_in_fan_out", (False, None)), ("modules_to_save", (None, []))):
        if config.get(key) not in unused:
            raise CheckpointError(f"{path}: PEFT IA3 option {key}={config[key]!r:.60} has no promptdelta "
                                  f"counterpart; save the adapter without it (or merge it with PEFT).")
    return config


def _load_ia3(model: nn.Module, folder: Path, raw: dict[str, torch.Tensor], name: str | None) -> DeltaHandle:
    """Attach "ia3" to the modules the folder's ``<module>.ia3_l`` tensors name; (1, in) vectors scale inputs."""
    if native_family(model) is not None and _hf_fuses_qkv(model):
        raise CheckpointError(f"{folder}: PEFT IA3 adapters for GPT-2 scale the fused c_attn, which the native "
                              f"backbone splits; load it onto the transformers model instead.")
    canon = table_namer(_native_table(model)) if native_family(model) is not None else canonical_namer(model)
    own = {canon(s.name): s for s in iter_sites(model)}
    vectors: dict[str, torch.Tensor] = {}
    ff: list[str] = []
    for key, t in raw.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(?P<mod>.+)\.ia3_l(?:\.[^.]+)?", key)
        if m is None:
            raise CheckpointError(f"{folder}: tensor {key!r} is not an IA3 vector (<module>.ia3_l) although the "
                                  f"config says peft_type 'IA3'; save the adapter again.")
        site = own.get(canon(m.group("mod")))
        if site is None or not isinstance(site.module, nn.Linear) or t.dim() != 2:
            raise CheckpointError(f"{folder}: tensor {key!r} ({tuple(t.shape)}) names no linear layer of "
                                  f"{type(model).__name__}; load the adapter onto the model it was trained for.")
        out_f, in_f = site.module.weight.shape
        if tuple(t.shape) == (1, in_f) and tuple(t.shape) != (out_f, 1):
            ff.append(site.name)
        elif tuple(t.shape) != (out_f, 1):
            raise CheckpointError(f"{folder}: {key!r} has shape {tuple(t.shape)}; {site.name} takes ({out_f}, 1) or "
                                  f"(1, {in_f}); save the adapter again.")
        vectors[site.name] = t.reshape(-1)
    if not vectors:
        raise CheckpointError(f"{folder / PEFT_WEIGHTS_FILE} holds no ia3_l tensor; save the adapter again.")
    exact = lambda names: "re:(?:" + "|".join(re.escape(n) for n in names) + ")"  # noqa: E731
    handle = attach(model, "ia3", name=name or "peft", targets=exact(vectors), feedforward=exact(ff) if ff else [])
    try:
        handle.load_state_dict({f"{n}.ia3_l": v for n, v in vectors.items()})
    except BaseException:
        handle.detach()
        raise
    logger.info("loaded PEFT IA3 adapter %s onto %d modules as delta %r", folder, len(vectors), handle.name)
    return handle
