"""Delta checkpoints between transformers BertModel / RobertaModel and the native backbones with the same
weights, both ways, for the deltas besides the prefix (tests/deltas/test_prefix_hf_encoders.py): LoRA, IA3,
adapters, BitFit, S3Delta, UniPELT (with its prefix: encoders number the tokens from 0 on both sides) and the
ladder, which sits on the blocks: BERT_KEYS / ROBERTA_KEYS name them (``encoder.layer.{i}`` -> ``layers.{i}``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from delta_helpers import perturb
from test_crossload_common import CONFIGS, crossload, ids, native_of
from torch import nn

from promptdelta.deltas import attach, load_delta


CASES = [("bert", m) for m in ("lora", "ia3", "adapter", "bitfit", "s3delta", "unipelt", "ladder")] + [
    ("roberta", m) for m in ("lora", "unipelt", "ladder")]


@pytest.mark.parametrize("arch, method", CASES, ids=[f"{m}-{a}" for a, m in CASES])
def test_a_delta_checkpoint_moves_between_transformers_and_the_native_backbone(arch, method, tmp_path: Path):
    cfg = {"impl": "plain"} if method == "lora" else {}   # the same checkpoint; no wait for the C++ kernel's build
    on_native, on_hf = crossload(arch, method, tmp_path, **cfg)
    assert on_native.targets[0].startswith(("layers.0", "embeddings")) and "encoder.layer.0" in " ".join(on_hf.targets)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_a_ladder_moves_between_masked_lm_models_with_padding(arch, tmp_path: Path):
    """The MLM classes nest the encoder under ``bert.`` / ``roberta.``; a padded row goes through the side
    network's attention mask the same way on both sides (real tokens compared, 1e-5)."""
    torch.manual_seed(0)
    cls = {"bert": tf.BertForMaskedLM, "roberta": tf.RobertaForMaskedLM}[arch]
    hf = cls(CONFIGS[arch][1]()).eval()
    native = native_of(hf)
    x = ids()
    mask = torch.ones_like(x)
    mask[1, 4:] = 0

    def out(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=x, attention_mask=mask).logits[mask.bool()]   # (real tokens, V)

    for source, target, folder in ((hf, native, "from-hf"), (native, cls(CONFIGS[arch][1]()).eval(), "from-native")):
        if folder == "from-native":
            target.load_state_dict(hf.state_dict())
        handle = attach(source, "ladder")
        perturb(handle.parameters(), scale=0.5)
        want = out(source)
        handle.save(tmp_path / folder)
        handle.detach()
        base = out(target)
        loaded = load_delta(target, tmp_path / folder)
        torch.testing.assert_close(out(target), want, rtol=1e-5, atol=1e-5)
        assert (want - base).abs().max() > 1e-3, "the ladder should move the outputs"
        loaded.detach()
