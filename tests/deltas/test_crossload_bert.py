"""Delta checkpoints between transformers BertModel / RobertaModel and the native backbones with the same
weights, both ways, for the deltas besides the prefix (tests/deltas/test_prefix_hf_encoders.py): LoRA, IA3,
adapters, BitFit, S3Delta and UniPELT (with its prefix: encoders number the tokens from 0 on both sides).
A ladder sits on the blocks (``encoder.layer.{i}``), which BERT_KEYS / ROBERTA_KEYS do not name yet: refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_crossload_common import build, crossload, native_of

from promptdelta.deltas import attach, deltas_of, load_delta
from promptdelta.errors import CheckpointError

CASES = [("bert", m) for m in ("lora", "ia3", "adapter", "bitfit", "s3delta", "unipelt")] + [("roberta", "lora"),
                                                                                            ("roberta", "unipelt")]


@pytest.mark.parametrize("arch, method", CASES, ids=[f"{m}-{a}" for a, m in CASES])
def test_a_delta_checkpoint_moves_between_transformers_and_the_native_backbone(arch, method, tmp_path: Path):
    cfg = {"impl": "plain"} if method == "lora" else {}   # the same checkpoint; no wait for the C++ kernel's build
    on_native, on_hf = crossload(arch, method, tmp_path, **cfg)
    assert on_native.targets[0].startswith(("layers.0", "embeddings")) and "encoder.layer.0" in " ".join(on_hf.targets)


def test_a_ladder_is_refused_across_in_one_line(tmp_path: Path):
    attach(build("bert"), "ladder").save(tmp_path / "hf")
    model = native_of(build("bert"))
    with pytest.raises(CheckpointError, match=r"sits on encoder\.layer\.0 \(2 of its 2 modules\), which this "
                                              r"BertModel has no module for") as err:
        load_delta(model, tmp_path / "hf")
    assert "\n" not in str(err.value) and deltas_of(model) == {}
