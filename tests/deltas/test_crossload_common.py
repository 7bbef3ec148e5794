"""Delta checkpoints between a live transformers model and the native backbone with the same weights
(``load_backbone(model)``): the shared pieces of tests/deltas/test_crossload_<family>.py, and the check they
all rest on: both sides fingerprint the same base tensors under the same canonical names and digests.
Tiny random models from transformers configs (2 layers, hidden 32)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers as tf
from delta_helpers import V, perturb
from torch import nn

from promptdelta.backbones import load_backbone
from promptdelta.deltas import DeltaHandle, attach, load_delta, model_fingerprint

_DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            initializer_range=0.3)   # large weights: a delta moves the outputs well beyond the tolerance
CONFIGS = {   # arch -> (transformers model class, config)
    "bert": (tf.BertModel, lambda: tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                  intermediate_size=37, max_position_embeddings=64)),
    "roberta": (tf.RobertaModel, lambda: tf.RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=4, intermediate_size=37,
                                                           max_position_embeddings=66, pad_token_id=1)),
    "llama": (tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**_DEC)),
    "qwen2": (tf.Qwen2ForCausalLM, lambda: tf.Qwen2Config(**_DEC)),
    "mistral": (tf.MistralForCausalLM, lambda: tf.MistralConfig(**_DEC)),
    "gpt2": (tf.GPT2LMHeadModel, lambda: tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                        bos_token_id=0, eos_token_id=0, initializer_range=0.3)),
    "t5": (tf.T5ForConditionalGeneration, lambda: tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                                               num_heads=4, feed_forward_proj="gated-gelu",
                                                               relative_attention_num_buckets=8, decoder_start_token_id=0,
                                                               pad_token_id=0, eos_token_id=1)),
}


def build(arch: str, seed: int = 0) -> nn.Module:
    model_cls, config = CONFIGS[arch]
    torch.manual_seed(seed)
    return model_cls(config()).eval()


def native_of(hf: nn.Module) -> nn.Module:
    """The native backbone with ``hf``'s weights (a copy: the transformers model stays as it is)."""
    return load_backbone(copy.deepcopy(hf))[0].eval()


def ids() -> torch.Tensor:
    return torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(1))   # (B, T)


def logits(model: nn.Module, **kw) -> torch.Tensor:
    """(B, T, V) logits of ``ids()`` (T5: 4 decoder positions); an encoder without a head: (B, T, H) states."""
    x = ids()
    if "T5" in type(model).__name__:
        kw["decoder_input_ids"] = x[:, :4]
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=torch.ones_like(x), **kw)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def crossload(arch: str, method: str, tmp_path: Path, **cfg) -> tuple[DeltaHandle, DeltaHandle]:
    """Save a perturbed ``method`` delta on the transformers model, load it on the native backbone, and one made
    on the native backbone onto a fresh transformers model: outputs equal to 1e-5 both ways, and the delta
    changes them. Returns the two loaded handles (on native, on transformers)."""
    hf = build(arch)
    native = native_of(hf)
    base = logits(native)
    handle = attach(hf, method, **cfg)
    perturb(handle.parameters(), scale=0.5)
    want = logits(hf)
    handle.save(tmp_path / "from-hf")
    on_native = load_delta(native, tmp_path / "from-hf")
    torch.testing.assert_close(logits(native), want, rtol=1e-5, atol=1e-5)
    assert (want - base).abs().max() > 1e-3, "the delta should move the outputs"
    on_native.detach()

    back = attach(native, method, **cfg)
    perturb(back.parameters(), scale=0.5, seed=7)
    want = logits(native)
    back.save(tmp_path / "from-native")
    fresh = build(arch)
    on_hf = load_delta(fresh, tmp_path / "from-native")
    torch.testing.assert_close(logits(fresh), want, rtol=1e-5, atol=1e-5)
    assert sorted(n for n, _ in on_hf.named_parameters()) and on_hf.targets and len(on_hf.targets) == len(back.targets)
    return on_native, on_hf


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_both_sides_fingerprint_the_same_tensors(arch):
    """The same base tensors under the same canonical names and digests on the transformers model and on the
    native backbone built from it: what lets load_delta's architecture and weight checks pass across. GPT-2
    needed its key table's ``fused`` entry: the transformers c_attn is fingerprinted as q_proj, k_proj and
    v_proj (each third of the rows of its transposed Conv1D weight)."""
    hf = build(arch)
    ours, theirs = model_fingerprint(native_of(hf))["tensors"], model_fingerprint(hf)["tensors"]
    assert sorted(theirs) == sorted(ours)
    assert {n: v for n, v in theirs.items() if v != ours[n]} == {}
