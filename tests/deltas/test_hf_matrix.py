"""Deltas on live transformers models of ten architectures, unconverted: LoRA, adapter, BitFit and intrinsic
attach with their *default* targets (found from the module structure or the family's key table), with
``targets="all-linear"`` and with ``modules_to_save``; each passes the delta contract
(``delta_helpers.check_delta_invariants``). Tiny random configs: 2 layers, hidden 32."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from delta_helpers import V, check_delta_invariants, snapshot, assert_same_state
from torch import nn

from promptdelta.deltas import attach, deltas_of
from promptdelta.deltas.sites import canonical_aliases, match_targets
from promptdelta.deltas.structure import output_head, output_heads
from promptdelta.errors import DeltaError

_DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {   # architecture -> (model class, config)
    "bert": (tf.BertForMaskedLM, lambda: tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=37,
                                                        max_position_embeddings=64)),
    "roberta": (tf.RobertaForMaskedLM, lambda: tf.RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                                 num_attention_heads=4, intermediate_size=37,
                                                                 max_position_embeddings=66, pad_token_id=1,
                                                                 bos_token_id=0, eos_token_id=2)),
    "distilbert": (tf.DistilBertForMaskedLM, lambda: tf.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4,
                                                                          hidden_dim=37, max_position_embeddings=64)),
    "gpt2": (tf.GPT2LMHeadModel, lambda: tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                        bos_token_id=0, eos_token_id=0)),
    "t5": (tf.T5ForConditionalGeneration, lambda: tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                                               num_heads=4, feed_forward_proj="gated-gelu",
                                                               relative_attention_num_buckets=8,
                                                               decoder_start_token_id=0, pad_token_id=0,
                                                               eos_token_id=1)),
    "llama": (tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**_DEC)),
    "qwen2": (tf.Qwen2ForCausalLM, lambda: tf.Qwen2Config(**_DEC)),
    "mistral": (tf.MistralForCausalLM, lambda: tf.MistralConfig(**_DEC, sliding_window=4)),
    "gemma": (tf.GemmaForCausalLM, lambda: tf.GemmaConfig(**_DEC, head_dim=8)),
    "phi3": (tf.Phi3ForCausalLM, lambda: tf.Phi3Config(**_DEC)),
}
ARCHS = list(CONFIGS)
METHODS = ["lora", "adapter", "bitfit", "intrinsic"]
FAST = {("lora", "llama"), ("adapter", "phi3"), ("bitfit", "llama"), ("intrinsic", "gemma"), ("lora", "gpt2"),
        ("adapter", "distilbert"), ("bitfit", "t5"), ("intrinsic", "qwen2")}   # the default-suite subset


def build(arch: str, seed: int = 0, cls: type | None = None) -> nn.Module:
    model_cls, config = CONFIGS[arch]
    torch.manual_seed(seed)
    return (cls or model_cls)(config()).eval()


def ids() -> torch.Tensor:
    return torch.randint(3, V, (3, 7), generator=torch.Generator().manual_seed(1))   # (B, T)


def out(model: nn.Module, grad: bool = False) -> torch.Tensor:
    """Logits of a batch whose first row ends in two pads (T5: 4 decoder positions)."""
    x = ids()
    mask = torch.ones_like(x)
    mask[0, -2:] = 0
    kw = {"decoder_input_ids": x[:, :4]} if model.config.is_encoder_decoder else {}
    with torch.set_grad_enabled(grad):
        return model(input_ids=x, attention_mask=mask, **kw).logits


def _cells(methods, archs):
    return [pytest.param(m, a, marks=() if (m, a) in FAST else pytest.mark.slow, id=f"{m}-{a}")
            for m in methods for a in archs]


@pytest.mark.parametrize("method, arch", _cells(METHODS, ARCHS))
def test_default_targets_pass_the_delta_contract(method, arch, tmp_path):
    check_delta_invariants(lambda: build(arch), out, method, tmp_path / "d")


@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_are_found_from_the_structure(arch):
    """Attention q/k/v/o and the FFN in/out layers of every block get native names; the head gets none."""
    model = build(arch)
    aliases = canonical_aliases(model)
    natives = {a for names in aliases.values() for a in names}
    stack = "encoder.layers" if model.config.is_encoder_decoder else "layers"
    for i in range(2):
        for role in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.fc1", "mlp.fc2"):
            assert f"{stack}.{i}.{role}" in natives, (arch, i, role)
    head = output_head(model)
    assert all(s.module is not head for s in match_targets(model, ["q_proj", "fc1", "fc2", "o_proj"]))


ALL_LINEAR_FAST = {("lora", "gpt2"), ("bitfit", "phi3")}


@pytest.mark.parametrize("method, arch", [pytest.param(m, a, marks=() if (m, a) in ALL_LINEAR_FAST else
                                                       pytest.mark.slow, id=f"{m}-{a}")
                                          for m in ("lora", "bitfit") for a in ARCHS])
def test_all_linear(method, arch, tmp_path):
    model = build(arch)
    head = output_head(model)
    heads = output_heads(model)
    linear = [m for m in model.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    handle = attach(model, method, targets="all-linear", add_biases=True) if method == "bitfit" else \
        attach(model, method, targets="all-linear")
    assert heads == [head] and len(handle.targets) == len([m for m in linear if m is not head]) == len(linear) - 1
    handle.detach()
    kw = {"add_biases": True} if method == "bitfit" else {}
    check_delta_invariants(lambda: build(arch), out, method, tmp_path / "d", targets="all-linear", **kw)


SEQ_CLS = {"bert": tf.BertForSequenceClassification, "roberta": tf.RobertaForSequenceClassification,
           "distilbert": tf.DistilBertForSequenceClassification, "gpt2": tf.GPT2ForSequenceClassification,
           "llama": tf.LlamaForSequenceClassification, "qwen2": tf.Qwen2ForSequenceClassification,
           "mistral": tf.MistralForSequenceClassification, "gemma": tf.GemmaForSequenceClassification,
           "phi3": tf.Phi3ForSequenceClassification}
HEADS = {"bert": "classifier", "roberta": "classifier", "distilbert": "classifier", "t5": "decoder.final_layer_norm"}
SAVE_FAST = ("bert", "gpt2", "t5")   # the default-suite subset: encoder, Conv1D decoder, encoder-decoder


def build_task_model(arch: str) -> nn.Module:
    """A fresh *ForSequenceClassification model (T5: the seq2seq LM, whose decoder's final norm is saved)."""
    if arch not in SEQ_CLS:
        return build(arch)
    model_cls, config = CONFIGS[arch]
    cfg = config()
    if cfg.pad_token_id is None:   # GPT-2: a batch > 1 needs a pad id to find each row's last token
        cfg.pad_token_id = 0
    torch.manual_seed(0)
    return SEQ_CLS[arch](cfg).eval()


@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a in SAVE_FAST else pytest.mark.slow)
                                  for a in ARCHS])
def test_modules_to_save_trains_and_saves_the_task_head(arch, tmp_path):
    head = HEADS.get(arch, "score")
    model = build_task_model(arch)
    original = model.get_submodule(head)
    handle = attach(model, "lora", modules_to_save=[head])
    keys = [k for k, _ in handle.named_parameters() if ".saved." in k]
    assert keys and all(k.startswith(f"{head}.saved.") for k in keys)
    check_delta_invariants(lambda: build_task_model(arch), out, "lora", tmp_path / "d", modules_to_save=[head])
    handle.detach()
    assert model.get_submodule(head) is original and all(p.requires_grad for p in original.parameters())


def test_modules_to_save_without_it_the_fresh_head_stays_frozen():
    model = build("bert", cls=tf.BertForSequenceClassification)
    attach(model, "lora")
    assert not model.classifier.weight.requires_grad          # why modules_to_save exists
    model = build("bert", cls=tf.BertForSequenceClassification)
    h = attach(model, "lora", modules_to_save=["classifier"])
    assert model.classifier.copy.weight.requires_grad and not model.classifier.base.weight.requires_grad
    with h.disabled():
        base = out(model)
    with torch.no_grad():
        model.classifier.copy.weight.add_(1.0)
    assert not torch.allclose(out(model), base)
    with h.disabled():
        assert torch.equal(out(model), base)


def test_modules_to_save_refuses_a_module_holding_the_delta_targets():
    model = build("bert", cls=tf.BertForSequenceClassification)
    snap = snapshot(model)
    with pytest.raises(DeltaError, match="modules_to_save names 'bert.encoder.layer.0'.*own targets"):
        attach(model, "lora", modules_to_save=["bert.encoder.layer.0"])
    assert deltas_of(model) == {}
    assert_same_state(model, snap)


def test_a_failed_attach_leaves_nothing_attached(monkeypatch):
    """The adapter fails on its second module: the first wrapper comes out again, flags are restored."""
    from promptdelta.deltas import adapter as adapter_mod

    model = build("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    snap, base = snapshot(model), out(model)
    calls = []
    real = adapter_mod.AdapterWrapper.__init__

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        real(self, *a, **k)
    monkeypatch.setattr(adapter_mod.AdapterWrapper, "__init__", flaky)
    with pytest.raises(DeltaError, match=r"adapter could not be attached to LlamaForCausalLM \(RuntimeError: boom\); "
                                         r"nothing was attached"):
        attach(model, "adapter")
    assert len(calls) == 2 and deltas_of(model) == {}
    assert_same_state(model, snap)
    assert torch.equal(out(model), base)
    assert not any(type(m).__name__ == "AdapterWrapper" for m in model.modules())


def test_parallel_adapter_on_transformers_bert():
    """BERT splits its FFN over two modules, so the default 'mlp' target is refused by name; a sublayer that
    keeps its in/out sizes works, and one that does not is refused at forward with the module named."""
    model = build("bert")
    with pytest.raises(DeltaError, match=r"targets \['mlp'\] match no module"):
        attach(model, "adapter", placement="parallel")
    assert deltas_of(model) == {}
    h = attach(model, "adapter", placement="parallel", targets="re:.*layer\\.\\d+\\.intermediate")
    assert h.targets == ["bert.encoder.layer.0.intermediate", "bert.encoder.layer.1.intermediate"]
    out(model, grad=True).square().mean().backward()
    h.detach()


def test_bitfit_adds_zero_biases_on_bias_free_llama():
    model = build("llama")
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    h = attach(model, "bitfit")
    assert h.num_parameters() > 0 and all(k.endswith(".bias") for k, _ in h.named_parameters())


# --------------------------------------------------------------------------------------------- prefix through the cache
PREFIX_ARCHS = ["llama", "gpt2", "t5", "qwen2", "phi3", "gemma", "mistral"]


@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a in ("llama", "t5") else pytest.mark.slow)
                                  for a in PREFIX_ARCHS])
def test_prefix_through_the_models_own_cache_equals_real_prefix_tokens(arch):
    """Prefixes set to the keys/values the model computes for P real tokens give the logits of the full
    sequence at the remaining positions: the prefix reaches every layer's attention, masked in, with the
    positions after it (decoder-only; T5: the decoder's self-attention)."""
    model = build(arch)
    x = ids()
    P = 3
    enc_dec = model.config.is_encoder_decoder
    with torch.no_grad():
        if enc_dec:
            full = model(input_ids=x, decoder_input_ids=x[:, :6]).logits[:, P:]
            cache = model(input_ids=x, decoder_input_ids=x[:, :P], use_cache=True).past_key_values.self_attention_cache
        else:
            full = model(input_ids=x).logits[:, P:]
            cache = model(input_ids=x[:, :P], use_cache=True).past_key_values
    handle = attach(model, "prefix", num_tokens=P, reparam=False)
    sets = handle._method.sets["layers"]
    with torch.no_grad():   # batch row 0's prefix for everyone: compare row 0
        sets.keys.copy_(torch.stack([layer.keys[0] for layer in cache.layers]))
        sets.values.copy_(torch.stack([layer.values[0] for layer in cache.layers]))
        kw = {"input_ids": x, "decoder_input_ids": x[:, P:6]} if enc_dec else {"input_ids": x[:, P:]}
        got = model(**kw).logits
    torch.testing.assert_close(got[0], full[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a == "gpt2" else pytest.mark.slow)
                                  for a in ["gpt2", "t5", "llama", "phi3"]])
def test_prefix_on_transformers_models_passes_the_delta_contract(arch, tmp_path):
    check_delta_invariants(lambda: build(arch), out, "prefix", tmp_path / "d")


def test_prefix_refuses_encoders_and_cached_decoding():
    for arch in ("distilbert",):   # BERT / RoBERTa take a prefix: tests/deltas/test_prefix_hf_encoders.py
        model = build(arch)
        with pytest.raises(DeltaError, match="keeps none.*load_backbone"):
            attach(model, "prefix")
        assert deltas_of(model) == {}
    model = build("llama")
    attach(model, "prefix", num_tokens=2)
    cache = model(input_ids=ids()[:, :2], use_cache=True).past_key_values
    with pytest.raises(DeltaError, match="cache that already holds tokens"):
        model(input_ids=ids()[:, 2:3], past_key_values=cache)


# --------------------------------------------------------------------------------------------- ladder
LADDER_ARCHS = ["llama", "qwen2", "mistral", "gemma", "distilbert", "bert", "roberta", "gpt2", "phi3", "t5"]


@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a in ("llama", "distilbert", "gpt2", "t5") else pytest.mark.slow)
                                  for a in LADDER_ARCHS])
def test_ladder_on_transformers_models_passes_the_delta_contract(arch, tmp_path):
    check_delta_invariants(lambda: build(arch), out, "ladder", tmp_path / "d")


def test_ladder_side_network_copies_the_block_layout():
    """Llama: pre-norm, RMSNorm, SwiGLU, no biases, causal; DistilBERT: post-norm LayerNorm, bidirectional."""
    from promptdelta.deltas.side import RMSNorm

    side = attach(build("llama"), "ladder")._method.wrapper.side
    block = side.blocks[0]
    assert block.pre_norm and isinstance(block.attn_norm, RMSNorm) and block.mlp.gate is not None and side.causal
    assert block.attn.q_proj.bias is None
    side = attach(build("distilbert"), "ladder")._method.wrapper.side
    block = side.blocks[0]
    assert not block.pre_norm and isinstance(block.attn_norm, nn.LayerNorm) and block.mlp.gate is None
    assert not side.causal


def test_ladder_full_width_side_block_is_the_gpt2_block_through_its_fused_conv1d():
    """reduction=1 keeps every dim, head and unit: the side block pruned from GPT-2's fused c_attn (Conv1D,
    (in, 3H)) computes the backbone block exactly, which fails if the q/k/v thirds or the transpose are wrong."""
    model = build("gpt2")
    seen = []   # (input, output) of each block, (B, T, H)
    hooks = [blk.register_forward_hook(lambda m, a, o: seen.append((a[0], o[0] if isinstance(o, tuple) else o)))
             for blk in model.transformer.h]
    with torch.no_grad():
        model(input_ids=ids())
    for h in hooks:
        h.remove()
    side = attach(model, "ladder", reduction=1)._method.wrapper.side
    for block, (x, y) in zip(side.blocks, seen):
        with torch.no_grad():
            torch.testing.assert_close(block(x, None, True), y, rtol=1e-5, atol=1e-5)


def test_ladder_full_width_side_block_slices_phi3_fused_qkv_and_gate_up():
    """Phi-3 fuses q/k/v (grouped-query: 4 query heads, 2 key/value heads) and gate/up: at reduction=1 the side
    block's q is the first 4*hd rows, k/v the next 2*hd each (one copy per query head), and its MLP computes
    Phi-3's (silu(gate) * up, gate the first half) exactly."""
    model = build("phi3")
    side = attach(model, "ladder", reduction=1)._method.wrapper.side
    layer, block = model.model.layers[0], side.blocks[0]
    w, hd = layer.self_attn.qkv_proj.weight, 8
    rep = lambda t: t.view(2, hd, -1).repeat_interleave(2, 0).reshape(4 * hd, -1)   # noqa: E731
    assert torch.equal(block.attn.q_proj.weight, w[:4 * hd])
    assert torch.equal(block.attn.k_proj.weight, rep(w[4 * hd:6 * hd]))
    assert torch.equal(block.attn.v_proj.weight, rep(w[6 * hd:]))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(block.mlp(x), layer.mlp(x), rtol=1e-5, atol=1e-6)


def test_ladder_full_width_side_blocks_are_the_t5_blocks_with_their_relative_position_bias():
    """Transformers T5 through hidden states: at reduction=1 each side encoder block, with the bias read from
    the first block's ``compute_bias``, computes the backbone's encoder block; each side decoder block (causal,
    cross-attending to the encoder's normed output) the decoder block."""
    from promptdelta.deltas.side import side_attention_bias

    model = build("t5")
    seen: dict[str, list] = {"encoder": [], "decoder": []}   # (input, output) per block, (B, T, H)
    hooks = [blk.register_forward_hook(lambda m, a, o, k=k: seen[k].append((a[0], o[0])))
             for k in seen for blk in getattr(model, k).block]
    x = ids()
    with torch.no_grad():
        memory = model(input_ids=x, decoder_input_ids=x[:, :4], output_hidden_states=True).encoder_last_hidden_state
    for h in hooks:
        h.remove()
    side = attach(model, "ladder", reduction=1)._method.wrapper.side
    for stack, causal in (("encoder", False), ("decoder", True)):
        attn = getattr(model, stack).block[0].layer[0].SelfAttention
        for block, (inp, y) in zip(getattr(side, stack).blocks, seen[stack]):
            T = inp.shape[1]
            with torch.no_grad():
                bias = side_attention_bias(None, T, causal, inp.dtype, attn.compute_bias(T, T)[:, block.attn.head_index])
                got = block(inp, bias, causal, memory if causal else None)
            torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5)


def test_ladder_on_the_transformers_t5_encoder_alone(tmp_path):
    """T5EncoderModel: one bidirectional stack with the encoder's bias; the contract on its hidden states."""
    make = lambda: build("t5", cls=tf.T5EncoderModel)   # noqa: E731

    def hidden(model: nn.Module, grad: bool = False) -> torch.Tensor:   # (B, T, H), row 0 ends in two pads
        x = ids()
        mask = torch.ones_like(x)
        mask[0, -2:] = 0
        with torch.set_grad_enabled(grad):
            return model(input_ids=x, attention_mask=mask).last_hidden_state
    side = attach(make(), "ladder")._method.wrapper.side
    assert not side.causal and side.up is not None and side.final_norm is None
    check_delta_invariants(make, hidden, "ladder", tmp_path / "d")


def test_all_linear_leaves_the_saved_modules_to_modules_to_save(tmp_path):
    make = lambda: build("bert", cls=tf.BertForSequenceClassification)   # noqa: E731
    h = attach(make(), "lora", targets="all-linear", modules_to_save=["classifier"])
    assert "classifier" not in h.targets and "bert.pooler.dense" in h.targets
    check_delta_invariants(make, out, "lora", tmp_path / "d", targets="all-linear", modules_to_save=["classifier"])


def test_intrinsic_and_adapter_defaults_cover_attention_and_the_mlp_on_llama():
    """What failed before item 4: the adapter's 'attn.o_proj'/'mlp.fc2' matched nothing, intrinsic skipped the MLP."""
    ends = lambda h: {t.rsplit(".", 1)[-1] for t in h.targets}   # noqa: E731
    assert ends(attach(build("llama"), "intrinsic")) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"}
    assert ends(attach(build("llama"), "adapter")) == {"o_proj", "down_proj"}
    assert ends(attach(build("phi3"), "intrinsic")) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


@pytest.mark.parametrize("arch", ["llama", pytest.param("t5", marks=pytest.mark.slow)])
def test_prefix_generate_without_cache_equals_greedy_forward_and_cached_generate_is_refused(arch):
    model = build(arch)
    attach(model, "prefix", num_tokens=3)
    x = ids()[:2, :5]
    got = model.generate(x, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    enc_dec = model.config.is_encoder_decoder
    seq = torch.zeros(2, 1, dtype=torch.long) if enc_dec else x
    with torch.no_grad():
        for _ in range(4):
            logits = model(input_ids=x, decoder_input_ids=seq).logits if enc_dec else model(input_ids=seq).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert got.tolist() == seq.tolist()
    with pytest.raises(DeltaError, match="cache that already holds tokens"):
        model.generate(x, max_new_tokens=2, do_sample=False, pad_token_id=0)
