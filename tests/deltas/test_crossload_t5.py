"""Delta checkpoints between a transformers T5 (T5ForConditionalGeneration) and the native T5 with the same
weights, both ways: LoRA (on self- and cross-attention), IA3, adapters and BitFit carry over with equal outputs.
The attention modules have canonical names too (``...SelfAttention`` is ``{encoder,decoder}.layers.{i}.attn``,
``...EncDecAttention`` is ``decoder.layers.{i}.cross_attn``), so a prefix's targets read the same on both
sides; a prefix is refused across in one line (transformers: the decoder's self-attention only, tokens
numbered after it; native: encoder, decoder and cross-attention prefixes, tokens from 0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_crossload_common import build, crossload, native_of

from promptdelta.deltas import attach, deltas_of, load_delta
from promptdelta.deltas.fingerprint import canonical_namer
from promptdelta.errors import CheckpointError


@pytest.mark.parametrize("method, cfg", [("lora", {"impl": "plain"}), ("ia3", {}), ("adapter", {}), ("bitfit", {}),
                                         ("s3delta", {})], ids=["lora", "ia3", "adapter", "bitfit", "s3delta"])
def test_a_delta_checkpoint_moves_between_transformers_and_the_native_backbone(method, cfg, tmp_path: Path):
    on_native, on_hf = crossload("t5", method, tmp_path, **cfg)
    assert on_native.targets[0].startswith("encoder.layers.0.") and on_hf.targets[0].startswith("encoder.block.0.")
    if method == "lora":   # q_proj / v_proj: the decoder's cross-attention too
        assert "decoder.layers.1.cross_attn.v_proj" in on_native.targets
        assert "decoder.block.1.layer.1.EncDecAttention.v" in on_hf.targets


def test_the_attention_modules_have_canonical_names():
    """Failed before the T5 key table named the attention modules themselves (only their projections)."""
    namer = canonical_namer(build("t5"))
    assert namer("encoder.block.1.layer.0.SelfAttention") == "encoder.layers.1.attn"
    assert namer("decoder.block.0.layer.0.SelfAttention") == "decoder.layers.0.attn"
    assert namer("decoder.block.1.layer.1.EncDecAttention") == "decoder.layers.1.cross_attn"
    assert namer("decoder.block.1.layer.1.EncDecAttention.q") == "decoder.layers.1.cross_attn.q_proj"


def test_a_prefix_is_refused_across_in_one_line(tmp_path: Path):
    hf = build("t5")
    native = native_of(hf)
    attach(hf, "prefix", num_tokens=3, reparam=False).save(tmp_path / "hf")
    attach(native, "prefix", num_tokens=3, reparam=False).save(tmp_path / "native")
    assert json.loads((tmp_path / "hf" / "delta.json").read_text())["targets"] == ["decoder.layers.0.attn",
                                                                                 "decoder.layers.1.attn"]
    for model, folder in ((native_of(build("t5")), "hf"), (build("t5"), "native")):
        with pytest.raises(CheckpointError, match=r"this prefix was trained with the tokens after it numbered") as err:
            load_delta(model, tmp_path / folder)
        assert "\n" not in str(err.value) and deltas_of(model) == {}


def test_a_ladder_is_refused_across_in_one_line(tmp_path: Path):
    """The T5 blocks keep their own names (the transformers block's ``layer`` list stands for the native block
    in target matching), so a ladder on the blocks is refused by name rather than loaded on other modules."""
    hf = build("t5")
    native = native_of(hf)
    attach(hf, "ladder").save(tmp_path / "hf")
    attach(native, "ladder").save(tmp_path / "native")
    for model, folder, block in ((native_of(build("t5")), "hf", "encoder.block.0"),
                                 (build("t5"), "native", "encoder.layers.0")):
        with pytest.raises(CheckpointError, match=rf"sits on {block} \(\d of its \d modules\), which this "
                                                  rf"{type(model).__name__} has no module for") as err:
            load_delta(model, tmp_path / folder)
        assert "\n" not in str(err.value) and deltas_of(model) == {}
