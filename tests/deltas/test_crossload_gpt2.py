"""Delta checkpoints between a transformers GPT-2 (GPT2LMHeadModel: Conv1D layers, one fused c_attn for q, k
and v) and the native GPT-2 with the same weights (separate q_proj, k_proj, v_proj), both ways.

Deltas on modules both sides share (c_proj = o_proj, c_fc = fc1, mlp.c_proj = fc2) carry over with equal
outputs. The key table's ``fused`` entry fingerprints c_attn as its three parts, so the base-weight check sees
q/k/v on both sides; a delta ON c_attn (LoRA's default q_proj/v_proj targets, BitFit's biases) or on the split
q/k/v cannot be carried over and is refused in one line, as is a prefix (tokens numbered after it on the
transformers side, from 0 on the native one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from delta_helpers import perturb
from test_crossload_common import build, crossload, native_of

from promptdelta.deltas import attach, deltas_of, load_delta
from promptdelta.errors import CheckpointError

SHARED = ["o_proj", "fc1", "fc2"]   # c_proj, mlp.c_fc, mlp.c_proj on the transformers side
# LoRA with impl="plain": the checkpoint is the same, and the test does not wait for the C++ kernel's build


@pytest.mark.parametrize("method, cfg", [("adapter", {}), ("lora", {"targets": SHARED, "impl": "plain"}),
                                         ("bitfit", {"targets": SHARED}), ("ladder", {})],
                         ids=["adapter", "lora", "bitfit", "ladder"])
def test_a_delta_on_shared_modules_moves_between_transformers_and_the_native_backbone(method, cfg, tmp_path: Path):
    on_native, on_hf = crossload("gpt2", method, tmp_path, **cfg)
    assert on_native.targets[0].startswith("layers.0") and on_hf.targets[0].startswith("transformer.h.0")
    # a ladder sits on the blocks: failed before GPT2_KEYS named h.{i} layers.{i}


def test_the_fused_c_attn_is_checked_part_by_part(tmp_path: Path):
    """A native adapter checkpoint on a transformers GPT-2 whose c_attn alone differs is refused, naming the
    part (q_proj); before the key table's ``fused`` entry c_attn matched no native tensor and was not compared,
    so it loaded silently on other attention weights."""
    hf = build("gpt2")
    native = native_of(hf)
    perturb(attach(native, "adapter").parameters())
    native_handle = next(iter(deltas_of(native).values()))
    native_handle.save(tmp_path / "a")
    with torch.no_grad():
        hf.transformer.h[0].attn.c_attn.weight[:, :4] += 0.1    # (in, 3 out): columns 0..3 are q's first rows
    with pytest.raises(CheckpointError, match=r"other pretrained weights .*\(1 of \d+ tensors differ, e\.g\. "
                                              r"layers\.0\.attn\.q_proj\.weight\)") as err:
        load_delta(hf, tmp_path / "a")
    assert "\n" not in str(err.value) and deltas_of(hf) == {}


@pytest.mark.parametrize("direction", ["hf->native", "native->hf"])
def test_a_delta_on_the_fused_or_split_qkv_is_refused_in_one_line(direction, tmp_path: Path):
    hf = build("gpt2")
    native = native_of(hf)
    src, dst = (hf, native) if direction == "hf->native" else (native, hf)
    attach(src, "lora", targets=["q_proj", "v_proj"]).save(tmp_path / "l")
    part = "layers.0.attn.c_attn" if direction == "hf->native" else "layers.0.attn.q_proj"
    with pytest.raises(CheckpointError, match=rf"sits on {part} \(\d of its \d modules\), which this "
                                              rf"{type(dst).__name__} has no module for") as err:
        load_delta(dst, tmp_path / "l")
    assert "\n" not in str(err.value) and deltas_of(dst) == {}


def test_a_prefix_names_the_same_attention_modules_and_is_refused_across(tmp_path: Path):
    """Saved targets are canonical (failed before GPT2_KEYS named ``h.{i}.attn`` ``layers.{i}.attn``); loading
    across is refused in one line for the token numbering."""
    hf = build("gpt2")
    native = native_of(hf)
    attach(hf, "prefix", num_tokens=3, reparam=False).save(tmp_path / "hf")
    attach(native, "prefix", num_tokens=3, reparam=False).save(tmp_path / "native")
    for folder in ("hf", "native"):
        assert json.loads((tmp_path / folder / "delta.json").read_text())["targets"] == ["layers.0.attn",
                                                                                        "layers.1.attn"]
    for model, folder in ((native_of(build("gpt2")), "hf"), (build("gpt2"), "native")):
        with pytest.raises(CheckpointError, match=r"this prefix was trained with the tokens after it numbered") as err:
            load_delta(model, tmp_path / folder)
        assert "\n" not in str(err.value) and deltas_of(model) == {}
