"""Native BERT: parity with transformers, inputs_embeds, prefix_kv, config checks, key table, to_hf."""

import math

import pytest
import torch
import transformers

from promptdelta.backbones import BertConfig, BertModel
from promptdelta.backbones.bert import BERT_KEYS, bert_from_hf
from promptdelta.backbones.keymap import hf_to_native_state
from promptdelta.errors import BackboneError, ConfigError

ATOL = 1e-5  # fp32, same math in a different order (SDPA vs HF's attention)


def hf_config(**overrides):
    kw = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=64)
    return transformers.BertConfig(**{**kw, **overrides})


def make_hf(cls=transformers.BertModel, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(hf_config(**overrides)).eval()


def batch(B=3, T=9, vocab=99, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0  # padding in the batch
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = torch.randint(0, 2, (B, T), generator=g)
    return ids, mask, types


def assert_close_at(a, b, keep, atol=ATOL):
    """Compare only non-pad positions: HF and we may differ at padded queries (both are garbage there)."""
    assert (a - b)[keep].abs().max().item() <= atol


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_new"])
def test_matches_hf_bert_model(act):
    hf = make_hf(hidden_act=act, initializer_range=0.3)  # large weights: pre-activations of order 1
    model = bert_from_hf(hf.config, hf.state_dict()).eval()
    ids, mask, types = batch()
    ours = model(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    assert len(ours.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(ours.hidden_states, ref.hidden_states):
        assert_close_at(a, b, mask.bool())
    assert_close_at(ours.last_hidden_state, ref.last_hidden_state, mask.bool())
    torch.testing.assert_close(ours.pooler_output, ref.pooler_output, atol=ATOL, rtol=0)
    assert ours.logits is None and not model.has_lm_head


def test_matches_hf_masked_lm():
    hf = make_hf(transformers.BertForMaskedLM)
    model = bert_from_hf(hf.config, hf.state_dict()).eval()
    assert model.has_lm_head and model.pooler is None
    assert model.lm_head.decoder.weight is model.input_embeddings().weight  # tied
    ids, mask, types = batch()
    ours = model(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    for a, b in zip(ours.hidden_states, ref.hidden_states):
        assert_close_at(a, b, mask.bool())
    assert ours.logits.shape == (3, 9, 99)
    assert_close_at(ours.logits, ref.logits, mask.bool())


def test_position_ids_are_used():
    hf = make_hf()
    model = bert_from_hf(hf.config, hf.state_dict()).eval()
    ids, mask, _ = batch()
    pos = torch.arange(9).flip(0).expand(3, 9)
    ours = model(ids, attention_mask=mask, position_ids=pos).last_hidden_state
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    assert_close_at(ours, ref, mask.bool())
    assert not torch.allclose(ours, model(ids, attention_mask=mask).last_hidden_state)


def tiny_native(**overrides):
    torch.manual_seed(0)
    cfg = BertConfig(**{**dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                               max_position_embeddings=64), **overrides})
    return BertModel(cfg).eval()


def test_inputs_embeds_equals_input_ids():
    model = tiny_native(has_lm_head=True)
    ids, mask, types = batch()
    a = model(ids, attention_mask=mask, token_type_ids=types)
    b = model(inputs_embeds=model.input_embeddings()(ids), attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=0, rtol=0)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)


def test_no_mask_equals_all_ones_mask():
    model = tiny_native()
    ids, _, _ = batch()
    a = model(ids).last_hidden_state
    b = model(ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def random_prefix(model, B, P, seed=3):
    g = torch.Generator().manual_seed(seed)
    shape = (B, model.config.num_heads, P, model.config.head_dim)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in model.layers]


def test_zero_length_prefix_is_identity():
    model = tiny_native()
    ids, mask, _ = batch()
    a = model(ids, attention_mask=mask).last_hidden_state
    b = model(ids, attention_mask=mask, prefix_kv=random_prefix(model, 3, 0)).last_hidden_state
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def reference_layer(layer, x, mask, pk, pv):
    """One BERT layer with prefix keys/values, written out by hand (no SDPA)."""
    B, T, H = x.shape
    nh, hd = pk.shape[1], pk.shape[3]
    split = lambda t: t.view(B, T, nh, hd).transpose(1, 2)  # noqa: E731  (B, nh, T, hd)
    q, k, v = split(layer.attn.q_proj(x)), split(layer.attn.k_proj(x)), split(layer.attn.v_proj(x))
    k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)                    # (B, nh, P + T, hd)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)                         # (B, nh, T, P + T)
    keep = torch.cat([torch.ones(B, pk.shape[2], dtype=torch.bool), mask.bool()], 1)
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H)
    x = layer.attn_norm(x + layer.attn.o_proj(y))
    return layer.mlp_norm(x + layer.mlp.fc2(torch.nn.functional.gelu(layer.mlp.fc1(x))))


def test_prefix_matches_hand_computed_reference():
    model = tiny_native()
    ids, mask, _ = batch()
    prefix = random_prefix(model, 3, 4)
    out = model(ids, attention_mask=mask, prefix_kv=prefix, output_hidden_states=True)
    x = out.hidden_states[0]
    for i, layer in enumerate(model.layers):
        x = reference_layer(layer, x, mask, *prefix[i])
        assert_close_at(out.hidden_states[i + 1], x, mask.bool())
    plain = model(ids, attention_mask=mask).last_hidden_state
    assert (plain - out.last_hidden_state)[mask.bool()].abs().max() > 1e-3  # the prefix does matter


def test_prefix_batch_one_broadcasts_and_gets_gradients():
    model = tiny_native()
    ids, mask, _ = batch()
    prefix = [(k.requires_grad_(), v.requires_grad_()) for k, v in random_prefix(model, 1, 2)]
    out = model(ids, attention_mask=mask, prefix_kv=prefix).last_hidden_state
    expanded = [(k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1)) for k, v in prefix]
    torch.testing.assert_close(out, model(ids, attention_mask=mask, prefix_kv=expanded).last_hidden_state)
    out.sum().backward()
    assert all(k.grad is not None and k.grad.abs().sum() > 0 for k, _ in prefix)


def test_dropout_only_in_train_mode():
    model = tiny_native(hidden_dropout_prob=0.3, attention_dropout_prob=0.3)
    ids, mask, _ = batch()
    a, b = model(ids, attention_mask=mask).last_hidden_state, model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    model.train()
    c, d = model(ids, attention_mask=mask).last_hidden_state, model(ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(c, d)


def test_canonical_module_names():
    names = dict(tiny_native(has_lm_head=True).named_modules())
    for name in ("embeddings.word_embeddings", "layers.1.attn.q_proj", "layers.1.attn.k_proj",
                 "layers.1.attn.v_proj", "layers.1.attn.o_proj", "layers.1.attn_norm", "layers.1.mlp.fc1",
                 "layers.1.mlp.fc2", "layers.1.mlp_norm", "pooler.dense", "lm_head.dense", "lm_head.norm",
                 "lm_head.decoder"):
        assert name in names, name
    model = tiny_native()
    assert (model.family, model.kind) == ("bert", "mlm") and "lm_head.decoder" not in dict(model.named_modules())


# ---- bad inputs ------------------------------------------------------------------------------------------

def test_ids_and_embeds_both_or_neither():
    model = tiny_native()
    ids, _, _ = batch()
    with pytest.raises(BackboneError, match="both.*Fix: pass exactly one"):
        model(ids, inputs_embeds=model.input_embeddings()(ids))
    with pytest.raises(BackboneError, match="neither.*Fix: pass exactly one"):
        model()


@pytest.mark.parametrize("bad", ["length", "heads", "kv_mismatch", "batch"])
def test_bad_prefix_kv(bad):
    model = tiny_native()
    ids, mask, _ = batch()
    prefix = random_prefix(model, 3, 2)
    if bad == "length":
        prefix = prefix[:1]
    elif bad == "heads":
        prefix[0] = (torch.zeros(3, 2, 2, 8), torch.zeros(3, 2, 2, 8))
    elif bad == "kv_mismatch":
        prefix[1] = (prefix[1][0], prefix[1][1][:, :, :1])
    else:
        prefix[0] = (torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8))
    with pytest.raises(BackboneError, match="prefix_kv.*Fix:"):
        model(ids, attention_mask=mask, prefix_kv=prefix)


def test_bad_forward_inputs():
    model = tiny_native()
    ids, mask, _ = batch()
    with pytest.raises(BackboneError, match="attention_mask.*Fix:"):
        model(ids, attention_mask=mask[:, :4])
    with pytest.raises(BackboneError, match="max_position_embeddings=64. Fix: truncate"):
        model(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(BackboneError, match="id 99 .*Fix: use the tokenizer"):
        model(torch.tensor([[1, 99]]))


@pytest.mark.parametrize("field,value", [
    ("hidden_size", 0), ("num_layers", -1), ("vocab_size", 2.5), ("num_heads", 5), ("layer_norm_eps", 0.0),
    ("pad_token_id", 99), ("hidden_act", "swish"), ("hidden_dropout_prob", 1.0), ("attention_dropout_prob", -0.1),
    ("has_pooler", "yes"), ("type_vocab_size", 0),
])
def test_config_validation_names_field(field, value):
    kw = dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37)
    with pytest.raises(ConfigError, match=rf"BertConfig\.{field}=.*Fix: set {field} to"):
        BertConfig(**{**kw, field: value})


def test_presets_and_overrides():
    cfg = BertConfig.from_name("minilm", has_pooler=False)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.has_pooler) == (384, 6, 12, 32, False)
    with pytest.raises(ConfigError, match="unknown BERT preset 'nope'.*Fix: use one of.*minilm"):
        BertConfig.from_name("nope")
    with pytest.raises(ConfigError, match=r"unknown BertConfig field\(s\) \['layers'\].*Fix"):
        BertConfig.from_name("minilm", layers=3)


def test_from_hf_config_and_unsupported():
    cfg = BertConfig.from_hf(hf_config(hidden_act="relu", attention_probs_dropout_prob=0.2), has_pooler=False)
    assert (cfg.num_layers, cfg.num_heads, cfg.hidden_act, cfg.attention_dropout_prob) == (2, 4, "relu", 0.2)
    with pytest.raises(BackboneError, match="position_embedding_type='relative_key'.*Fix"):
        BertConfig.from_hf(hf_config(position_embedding_type="relative_key"))
    with pytest.raises(BackboneError, match="decoder.*Fix"):
        BertConfig.from_hf(hf_config(is_decoder=True))


# ---- key table ---------------------------------------------------------------------------------------------

def test_key_table_maps_both_ways():
    assert BERT_KEYS.to_native("bert.encoder.layer.11.attention.self.query.weight") == "layers.11.attn.q_proj.weight"
    assert BERT_KEYS.to_native("encoder.layer.0.output.LayerNorm.bias") == "layers.0.mlp_norm.bias"
    assert BERT_KEYS.to_native("cls.predictions.bias") == "lm_head.decoder.bias"
    assert BERT_KEYS.to_native("encoder.layer.0.attention.self.query.weight.extra") is None
    assert BERT_KEYS.to_hf("layers.3.attn.o_proj.bias") == "encoder.layer.3.attention.output.dense.bias"
    assert BERT_KEYS.is_ignored("bert.embeddings.position_ids") and BERT_KEYS.is_ignored("cls.seq_relationship.bias")


def test_ignored_and_tied_keys_are_accepted():
    hf = make_hf(transformers.BertForMaskedLM)
    state = dict(hf.state_dict())
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]
    state["cls.seq_relationship.weight"] = torch.zeros(2, 32)
    del state["cls.predictions.decoder.weight"]  # tied: old checkpoints leave it out
    model = bert_from_hf(hf.config, state)
    torch.testing.assert_close(model.lm_head.decoder.weight, hf.cls.predictions.decoder.weight)


def test_missing_unexpected_and_shape_mismatch_named():
    hf = make_hf()
    model = BertModel(BertConfig.from_hf(hf.config))
    state = dict(hf.state_dict())
    del state["encoder.layer.1.attention.self.key.weight"]
    state["encoder.layer.0.attention.self.value.bias"] = torch.zeros(31)
    state["classifier.weight"] = torch.zeros(2, 32)
    state["encoder.layer.7.output.dense.weight"] = torch.zeros(32, 37)
    with pytest.raises(BackboneError) as info:
        hf_to_native_state(state, BERT_KEYS, model)
    text = str(info.value)
    assert "missing from the checkpoint (1)" in text and "layers.1.attn.k_proj.weight" in text
    assert "encoder.layer.1.attention.self.key.weight" in text
    assert "unexpected in the checkpoint (no place in the model) (2)" in text
    assert "classifier.weight" in text and "encoder.layer.7.output.dense.weight (-> layers.7.mlp.fc2.weight)" in text
    assert "encoder.layer.0.attention.self.value.bias -> layers.0.attn.v_proj.bias: (31,) vs (32,)" in text
    assert "Fix:" in text


def test_tied_decoder_shape_mismatch_named():
    hf = make_hf(transformers.BertForMaskedLM)
    model = BertModel(BertConfig.from_hf(hf.config, has_pooler=False, has_lm_head=True))
    state = dict(hf.state_dict())
    state["cls.predictions.decoder.weight"] = torch.zeros(98, 32)
    with pytest.raises(BackboneError, match=r"cls.predictions.decoder.weight -> lm_head.decoder.weight: \(98, 32\)"):
        hf_to_native_state(state, BERT_KEYS, model)


# ---- export ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pooler,head", [(True, False), (False, False), (False, True), (True, True)])
def test_to_hf_round_trip(pooler, head):
    model = tiny_native(has_pooler=pooler, has_lm_head=head)
    hf = model.to_hf()
    assert not hf.training
    ids, mask, types = batch()
    ours = model(ids, attention_mask=mask, token_type_ids=types)
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if head:
        assert_close_at(ours.logits, ref.logits, mask.bool())
    else:
        assert_close_at(ours.last_hidden_state, ref.last_hidden_state, mask.bool())
    if pooler:
        back = bert_from_hf(hf.config, hf.state_dict())
        assert back.has_lm_head == head and back.pooler is not None
        for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
            assert torch.equal(a, b), name


def test_hf_native_hf_state_dict_identical():
    hf = make_hf(transformers.BertForMaskedLM)
    again = bert_from_hf(hf.config, hf.state_dict()).to_hf()
    assert type(again) is transformers.BertForMaskedLM
    ref, got = hf.state_dict(), again.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
