"""Delta checkpoints between transformers Llama-family models (Llama, Qwen2, Mistral: backbones/llama.py) and
the native backbone with the same weights, both ways. LoRA, IA3, adapters and BitFit carry over with equal
outputs; a prefix names the same attention modules on both sides (``model.layers.{i}.self_attn`` is
``layers.{i}.attn`` in LLAMA_KEYS) but numbers the tokens after it differently (a transformers decoder's cache:
P, P + 1, ...; the native backbone: 0, 1, ...), so loading it across is refused in one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from delta_helpers import perturb
from test_crossload_common import build, crossload, ids, logits, native_of

from promptdelta.deltas import attach, deltas_of, load_delta
from promptdelta.errors import CheckpointError, ConfigError, DeltaError

P = 3
CASES = [("llama", m) for m in ("lora", "ia3", "adapter", "bitfit", "ladder", "s3delta")] + [("qwen2", "lora"),
                                                                                 ("mistral", "adapter")]


@pytest.mark.parametrize("arch, method", CASES, ids=[f"{m}-{a}" for a, m in CASES])
def test_a_delta_checkpoint_moves_between_transformers_and_the_native_backbone(arch, method, tmp_path: Path):
    # Llama's linear layers have no bias of their own; LoRA's impl="plain": no wait for the C++ kernel's build
    kw = {"bitfit": {"add_biases": True}, "lora": {"impl": "plain"}}.get(method, {})
    on_native, on_hf = crossload(arch, method, tmp_path, **kw)
    assert on_native.targets[0].startswith("layers.0") and on_hf.targets[0].startswith("model.layers.0")
    # a ladder sits on the blocks: failed before LLAMA_KEYS named model.layers.{i} layers.{i}


def test_a_prefix_names_the_same_attention_modules_and_is_refused_across(tmp_path: Path):
    """Saved targets are canonical on both sides (failed before LLAMA_KEYS named ``layers.{i}.self_attn``).
    Across, the prefix is refused in one line: the only difference is the numbering, as the native backbone
    fed the same prefixes with positions P, P + 1, ... gives the transformers outputs."""
    hf = build("llama")
    native = native_of(hf)
    handle = attach(hf, "prefix", num_tokens=P, reparam=False)
    perturb(handle.parameters(), scale=0.5)
    want = logits(hf)
    handle.save(tmp_path / "hf")
    meta = json.loads((tmp_path / "hf" / "delta.json").read_text())
    assert meta["targets"] == ["layers.0.attn", "layers.1.attn"] and meta["config"]["positions"] == "after_prefix"
    with pytest.raises(CheckpointError, match=r"numbered P, P \+ 1, .* but LlamaModel numbers them 0, 1, ") as err:
        load_delta(native, tmp_path / "hf")
    assert "\n" not in str(err.value) and deltas_of(native) == {}

    same = attach(native, "prefix", num_tokens=P, reparam=False)   # the same prefixes, tokens numbered from P
    same.load_state_dict(handle.state_dict())
    T = ids().shape[1]
    torch.testing.assert_close(logits(native, position_ids=torch.arange(P, P + T)[None]), want, rtol=1e-5, atol=1e-5)
    assert (logits(native) - want).abs().max() > 1e-3

    same.save(tmp_path / "native")
    assert json.loads((tmp_path / "native" / "delta.json").read_text())["targets"] == ["layers.0.attn", "layers.1.attn"]
    fresh = build("llama")
    with pytest.raises(CheckpointError, match=r"numbered 0, 1, .* but LlamaForCausalLM numbers them P, P \+ 1") as err:
        load_delta(fresh, tmp_path / "native")
    assert "\n" not in str(err.value) and deltas_of(fresh) == {}


def test_an_intrinsic_checkpoint_moves_between_transformers_and_the_native_backbone(tmp_path: Path):
    """Each projection is seeded from the tensor's canonical name (model.layers.0.self_attn.q_proj and
    layers.0.attn.q_proj seed the same P), so the same d gives the same update on both sides."""
    crossload("llama", "intrinsic", tmp_path)


def rewrite(folder: Path, meta: dict) -> None:
    """delta.json as an older promptdelta wrote it, with the manifest's checksum to match."""
    (folder / "delta.json").write_text(json.dumps(meta))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["delta.json"] = {"bytes": (folder / "delta.json").stat().st_size,
                                       "sha256": hashlib.sha256((folder / "delta.json").read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_an_intrinsic_folder_saved_before_the_names_field_loads_as_it_was_saved(tmp_path: Path):
    """delta.json without `names` (saved before 2026-12-07) was seeded from module names: it loads with
    names='module' and gives its own outputs again; read as canonical it would silently give others."""
    hf = build("llama")
    handle = attach(hf, "intrinsic", dim=8, names="module")
    perturb(handle.parameters())
    want = logits(hf)
    handle.save(tmp_path / "old")
    handle.detach()
    meta = json.loads((tmp_path / "old" / "delta.json").read_text())
    assert meta["config"].pop("names") == "module"
    rewrite(tmp_path / "old", meta)
    again = load_delta(hf, tmp_path / "old")
    assert again._method.config.names == "module"
    torch.testing.assert_close(logits(hf), want, atol=1e-5, rtol=0)
    again.detach()
    meta["config"]["names"] = "canonical"
    rewrite(tmp_path / "old", meta)
    load_delta(hf, tmp_path / "old")
    assert (logits(hf) - want).abs().max() > 1e-4


def test_the_prefix_positions_field_is_checked():
    """positions=None (every checkpoint saved before the field existed) takes the model's own numbering; a
    named one must be the model's; anything else is a ConfigError naming the choices."""
    native = native_of(build("llama"))
    attach(native, "prefix", num_tokens=2, positions="from_zero").detach()
    attach(native, "prefix", num_tokens=2).detach()
    with pytest.raises(ConfigError, match=r"prefix positions='zero' is not one of \('from_zero', 'after_prefix'\)"):
        attach(native, "prefix", num_tokens=2, positions="zero")
    with pytest.raises(DeltaError, match="numbered P, P \\+ 1, .* but LlamaModel numbers them 0, 1, "):
        attach(native, "prefix", num_tokens=2, positions="after_prefix")
    assert deltas_of(native) == {}
