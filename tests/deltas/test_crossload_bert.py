"""Delta checkpoints between transformers BertModel / RobertaModel and the native backbones with the same
weights, both ways, for the deltas besides the prefix (tests/deltas/test_prefix_hf_encoders.py): LoRA, IA3,
adapters, BitFit, S3Delta, UniPELT (with its prefix: encoders number the tokens from 0 on both sides) and the
ladder, which sits on the blocks: BERT_KEYS / ROBERTA_KEYS name them (``encoder.layer.{i}`` -> ``layers.{i}``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_crossload_common import crossload


CASES = [("bert", m) for m in ("lora", "ia3", "adapter", "bitfit", "s3delta", "unipelt", "ladder")] + [
    ("roberta", m) for m in ("lora", "unipelt", "ladder")]


@pytest.mark.parametrize("arch, method", CASES, ids=[f"{m}-{a}" for a, m in CASES])
def test_a_delta_checkpoint_moves_between_transformers_and_the_native_backbone(arch, method, tmp_path: Path):
    cfg = {"impl": "plain"} if method == "lora" else {}   # the same checkpoint; no wait for the C++ kernel's build
    on_native, on_hf = crossload(arch, method, tmp_path, **cfg)
    assert on_native.targets[0].startswith(("layers.0", "embeddings")) and "encoder.layer.0" in " ".join(on_hf.targets)
