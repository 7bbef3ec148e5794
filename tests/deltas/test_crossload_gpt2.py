"""Delta checkpoints between a transformers GPT-2 (GPT2LMHeadModel: Conv1D layers, one fused c_attn for q, k
and v) and the native GPT-2 with the same weights (separate q_proj, k_proj, v_proj), both ways.

Deltas on modules both sides share (c_proj = o_proj, c_fc = fc1, mlp.c_proj = fc2) carry over with equal
outputs. The key table's ``fused`` entry fingerprints c_attn as its three parts, so the base-weight check sees
q/k/v on both sides. A LoRA on c_attn (LoRA's default q_proj/v_proj targets) loads as q/k/v LoRAs, and back when
their A are equal (deltas/fused.py); other deltas on c_attn or the split q/k/v (BitFit's biases), a LoRA with
different A per part, and a prefix (tokens numbered after it on the transformers side, from 0 on the native one)
are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from delta_helpers import perturb
from test_crossload_common import build, crossload, logits, native_of

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


@pytest.mark.parametrize("impl", ["plain", "fused"])
def test_a_lora_on_c_attn_loads_on_the_native_q_k_v_and_back(impl, tmp_path: Path):
    """LoRA's default targets (q_proj, v_proj) sit on the fused c_attn of the transformers GPT-2: the checkpoint
    loads on the native backbone as q/k/v LoRAs (A copied, B cut in row thirds), and a native one with equal A
    loads back as one c_attn LoRA; same logits both ways. Refused before (no c_attn module on the native side)."""
    hf = build("gpt2")
    native = native_of(hf)
    base = logits(native)
    handle = attach(hf, "lora", impl=impl)
    assert handle.targets == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    perturb(handle.parameters(), scale=0.5)
    want = logits(hf)
    assert (want - base).abs().max() > 1e-3, "the delta should move the outputs"
    handle.save(tmp_path / "hf")
    on_native = load_delta(native, tmp_path / "hf")
    assert on_native.targets == [f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qkv"]
    assert {m.impl for m in native.modules() if hasattr(m, "lora_A")} == {impl}
    # the C++ kernel sums in another order than torch on the native side (4.7e-5 at |logits| 5.7; plain: 1.2e-6)
    torch.testing.assert_close(logits(native), want, rtol=1e-5, atol=1e-4 if impl == "fused" else 1e-5)
    on_native.save(tmp_path / "native")    # q/k/v with the same A: fused again into c_attn
    back = build("gpt2")
    on_hf = load_delta(back, tmp_path / "native")
    assert on_hf.targets == handle.targets
    torch.testing.assert_close(logits(back), want, rtol=1e-5, atol=1e-5)


def test_a_native_lora_on_q_v_and_fc1_loads_on_c_attn_with_zeros_for_k(tmp_path: Path):
    hf = build("gpt2")
    native = native_of(hf)
    handle = attach(native, "lora", targets=["q_proj", "v_proj", "fc1"], impl="plain")
    perturb(handle.parameters(), scale=0.5)
    with torch.no_grad():   # one A per layer for q and v: exactly one rank-r LoRA on c_attn
        for i in range(2):
            native.layers[i].attn.v_proj.lora_A.copy_(native.layers[i].attn.q_proj.lora_A)
    want = logits(native)
    handle.save(tmp_path / "n")
    on_hf = load_delta(hf, tmp_path / "n")
    assert on_hf.targets == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")]
    torch.testing.assert_close(logits(hf), want, rtol=1e-5, atol=1e-5)
    k_rows = hf.transformer.h[0].attn.c_attn.lora_B[32:64]   # (H, r): k's third
    assert torch.equal(k_rows, torch.zeros_like(k_rows))


def test_native_q_k_v_loras_with_different_a_are_refused_on_c_attn_in_one_line(tmp_path: Path):
    hf = build("gpt2")
    native = native_of(hf)
    perturb(attach(native, "lora", targets=["q_proj", "v_proj"], impl="plain").parameters(), scale=0.5)
    next(iter(deltas_of(native).values())).save(tmp_path / "n")
    with pytest.raises(CheckpointError, match=r"its LoRAs on layers\.0\.attn\.q_proj, layers\.0\.attn\.v_proj have "
                                              r"different lora_A, so no one LoRA on layers\.0\.attn\.c_attn .* "
                                              r"train with targets both sides share \(e\.g\. o_proj, fc1, fc2\)") as err:
        load_delta(hf, tmp_path / "n")
    assert "\n" not in str(err.value) and deltas_of(hf) == {}


@pytest.mark.parametrize("direction", ["hf->native", "native->hf"])
def test_another_delta_on_the_fused_or_split_qkv_is_refused_in_one_line(direction, tmp_path: Path):
    """Only LoRA is rewritten across the fused c_attn; BitFit's biases there are refused, naming the module."""
    hf = build("gpt2")
    native = native_of(hf)
    src, dst = (hf, native) if direction == "hf->native" else (native, hf)
    attach(src, "bitfit", targets=["q_proj", "v_proj"]).save(tmp_path / "b")
    part = "layers.0.attn.c_attn" if direction == "hf->native" else "layers.0.attn.q_proj"
    with pytest.raises(CheckpointError, match=rf"sits on {part} \(\d of its \d modules\), which this "
                                              rf"{type(dst).__name__} has no module for") as err:
        load_delta(dst, tmp_path / "b")
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
