"""Native T5 / T5 v1.1: parity with transformers (hidden states, logits, loss, generation), KV cache,
prefix_kv, inputs_embeds, to_hf round trip, key-table errors, config and input checks."""

import pytest
import torch
import transformers
from torch import nn

from promptdelta.backbones import loading
from promptdelta.backbones.keymap import hf_to_native_state
from promptdelta.backbones.t5 import T5Config, T5Model, relative_position_bucket, t5_from_hf
from promptdelta.errors import BackboneError, ConfigError

ATOL = 1e-5  # fp32, same math in a different order
TINY = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0)
VARIANTS = {"t5": {}, "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


def make_hf(variant="t5", seed=0, **overrides):
    """A tiny random T5ForConditionalGeneration; weights spread (std 0.3) so greedy decoding is not constant."""
    kw = {**TINY, **VARIANTS[variant], **overrides}
    torch.manual_seed(seed)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**kw))
    if kw.get("tie_word_embeddings") is False:  # transformers >= 5 ties the head anyway; untie it as v1.1 is
        hf.config.tie_word_embeddings = False
        hf.lm_head.weight = nn.Parameter(hf.lm_head.weight.detach().clone())
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" not in name:
                p.normal_(0.0, 0.3)
            else:
                p.uniform_(0.5, 1.5)
    return hf.eval()


def batch(B=3, S=11, T=6, seed=1):
    """Encoder ids/mask and decoder ids/mask, both with right padding in some rows."""
    g = torch.Generator().manual_seed(seed)
    ids, dec = torch.randint(2, 99, (B, S), generator=g), torch.randint(2, 99, (B, T), generator=g)
    mask, dmask = torch.ones(B, S, dtype=torch.long), torch.ones(B, T, dtype=torch.long)
    mask[1, 7:], mask[2, 4:], dmask[1, 4:] = 0, 0, 0
    ids[mask == 0], dec[dmask == 0] = 0, 0
    return ids, mask, dec, dmask


def max_diff_at(a, b, keep):
    return (a - b)[keep].abs().max().item()


def assert_logits_close(a, b):
    """fp32 tolerance relative to the logit scale (the untied v1.1 head gives logits in the tens)."""
    torch.testing.assert_close(a, b, atol=ATOL * max(1.0, b.abs().max().item()), rtol=0)


@pytest.fixture(params=sorted(VARIANTS))
def pair(request):
    hf = make_hf(request.param)
    return hf, t5_from_hf(hf.config, hf.state_dict()).eval()


def test_hidden_states_and_logits_match_hf(pair):
    hf, model = pair
    ids, mask, dec, dmask = batch()
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask,
              output_hidden_states=True)
    ours, ref = model(**kw), hf(**kw)
    assert len(ours.encoder_hidden_states) == len(ref.encoder_hidden_states) == 3
    assert len(ours.hidden_states) == len(ref.decoder_hidden_states) == 3
    for a, b in zip(ours.encoder_hidden_states, ref.encoder_hidden_states):
        assert max_diff_at(a, b, mask.bool()) <= ATOL
    for a, b in zip(ours.hidden_states, ref.decoder_hidden_states):
        assert max_diff_at(a, b, dmask.bool()) <= ATOL
    assert max_diff_at(ours.encoder_last_hidden_state, ref.encoder_last_hidden_state, mask.bool()) <= ATOL
    assert max_diff_at(ours.last_hidden_state, ref.decoder_hidden_states[-1], dmask.bool()) <= ATOL
    assert max_diff_at(ours.logits, ref.logits, dmask.bool()) <= ATOL * ref.logits.abs().max().item()
    assert ours.logits.abs().max() > 1.0  # the comparison is not between near-zero tensors


def test_loss_matches_hf(pair):
    hf, model = pair
    ids, mask, dec, dmask = batch()
    labels = dec.masked_fill(dmask == 0, -100)
    ours = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(ours.loss, ref.loss, atol=ATOL, rtol=1e-6)
    assert_logits_close(ours.logits, ref.logits)  # labels shifted right the same way
    assert torch.equal(model.shift_right(labels)[:, 0], torch.zeros(3, dtype=torch.long))


def test_tied_head_rescales_and_untied_head_does_not():
    for variant, tied in (("t5", True), ("v1.1", False)):
        hf = make_hf(variant)
        model = t5_from_hf(hf.config, hf.state_dict())
        assert model.config.tie_word_embeddings is tied
        assert (model.lm_head.weight is model.embed_tokens.weight) is tied
        out = model(input_ids=batch()[0], decoder_input_ids=batch()[2])
        scale = 32 ** -0.5 if tied else 1.0
        torch.testing.assert_close(out.logits, model.lm_head(out.last_hidden_state * scale))


def test_kv_cache_incremental_equals_full_decode(pair):
    _, model = pair
    ids, mask, dec, _ = batch()
    full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits  # (B, T, V)
    enc = model.encode(ids, mask).last_hidden_state
    out = model(attention_mask=mask, encoder_outputs=enc, decoder_input_ids=dec[:, :2], use_cache=True)
    steps, past = [out.logits], out.past_key_values
    for t in range(2, dec.shape[1]):
        out = model(attention_mask=mask, encoder_outputs=enc, decoder_input_ids=dec[:, t:t + 1],
                    past_key_values=past, use_cache=True)
        steps.append(out.logits)
        past = out.past_key_values
    assert past[0][0].shape[2] == dec.shape[1]  # self-attention cache grew to T
    assert past[0][2].shape[2] == ids.shape[1]  # cross-attention k/v: the encoder length, computed once
    assert_logits_close(torch.cat(steps, dim=1), full)


def test_greedy_generate_matches_hf_on_padded_batch(pair):
    hf, model = pair
    ids, mask, _, _ = batch()
    ours = model.generate(ids, mask, max_new_tokens=8)
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, num_beams=1)
    assert torch.equal(ours, ref)
    assert ours.shape == (3, 9) and torch.all(ours[:, 0] == 0)
    # an EOS that one row emits early: that row stops and is padded, the others go on
    eos = int(ours[0, 2])
    ours = model.generate(ids, mask, max_new_tokens=8, eos_token_id=eos)
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, num_beams=1,
                      eos_token_id=eos)
    assert torch.equal(ours, ref)
    assert ours[0, 2] == eos and torch.all(ours[0, 3:] == 0)


def test_sampling_matches_hf_under_the_same_seed():
    hf = make_hf("v1.1")
    model = t5_from_hf(hf.config, hf.state_dict()).eval()
    ids, mask, _, _ = batch()
    kw = dict(max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, temperature=0.8)
    torch.manual_seed(3)
    ref = hf.generate(input_ids=ids, attention_mask=mask, **kw)
    torch.manual_seed(3)
    assert torch.equal(model.generate(ids, mask, **kw), ref)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(model.generate(ids, mask, generator=g1, **kw), model.generate(ids, mask, generator=g2, **kw))


def _prefix(model, P, B=1, seed=5):
    """Random prefix_kv for every part: per layer (k, v) of shape (B, n_heads, P, d_kv)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    shape = (B, c.num_heads, P, c.d_kv)

    def pairs(n):
        return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(n)]
    return {"encoder": pairs(c.num_layers), "decoder": pairs(c.num_decoder_layers),
            "cross": pairs(c.num_decoder_layers)}


def test_zero_length_prefix_changes_nothing_and_a_prefix_does(pair):
    _, model = pair
    ids, mask, dec, dmask = batch()
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
    base = model(**kw).logits
    assert_logits_close(model(**kw, prefix_kv=_prefix(model, 0)).logits, base)
    prefix = _prefix(model, 3)
    for part in prefix.values():
        for k, v in part:
            k.requires_grad_(True), v.requires_grad_(True)
    for only in ("encoder", "decoder", "cross"):
        out = model(**kw, prefix_kv={only: prefix[only]}).logits
        assert (out - base).abs().max() > 1e-3, only
    model(**kw, prefix_kv=prefix).logits.square().sum().backward()
    for part in prefix.values():
        for k, v in part:
            assert k.grad is not None and k.grad.abs().sum() > 0 and v.grad.abs().sum() > 0


def test_cross_prefix_equals_extra_encoder_positions(pair):
    """Cross-attention has no position bias, so a prefix made from extra encoder states by the layer's own
    k/v projections must equal prepending those states to the encoder output."""
    _, model = pair
    ids, mask, dec, _ = batch()
    enc = model.encode(ids, mask).last_hidden_state  # (B, S, D)
    extra = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(9))  # (B, P, D)
    cross = []
    for layer in model.decoder.layers:
        k, v = layer.cross_attn.k_proj(extra), layer.cross_attn.v_proj(extra)
        cross.append((k.view(3, 2, 4, 8).transpose(1, 2), v.view(3, 2, 4, 8).transpose(1, 2)))
    ours = model(attention_mask=mask, encoder_outputs=enc, decoder_input_ids=dec, prefix_kv={"cross": cross})
    wide_mask = torch.cat([torch.ones(3, 2, dtype=torch.long), mask], dim=1)
    ref = model(attention_mask=wide_mask, encoder_outputs=torch.cat([extra, enc], dim=1), decoder_input_ids=dec)
    assert_logits_close(ours.logits, ref.logits)


def test_prefix_with_kv_cache_and_batch_broadcast(pair):
    _, model = pair
    ids, mask, dec, _ = batch()
    prefix = _prefix(model, 2, B=1)  # batch 1 is broadcast
    full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, prefix_kv=prefix).logits
    expanded = {k: [(a.expand(3, -1, -1, -1), b.expand(3, -1, -1, -1)) for a, b in v] for k, v in prefix.items()}
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                                     prefix_kv=expanded).logits, full)
    enc = model.encode(ids, mask, prefix_kv=prefix).last_hidden_state
    past, steps = None, []
    for t in range(dec.shape[1]):
        out = model(attention_mask=mask, encoder_outputs=enc, decoder_input_ids=dec[:, t:t + 1], prefix_kv=prefix,
                    past_key_values=past, use_cache=True)
        steps.append(out.logits)
        past = out.past_key_values
    assert_logits_close(torch.cat(steps, dim=1), full)


def test_inputs_embeds_equal_input_ids(pair):
    _, model = pair
    ids, mask, dec, dmask = batch()
    emb = model.input_embeddings()
    a = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
    b = model(inputs_embeds=emb(ids), attention_mask=mask, decoder_inputs_embeds=emb(dec),
              decoder_attention_mask=dmask)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)


def test_default_decoder_input_is_the_start_token(pair):
    _, model = pair
    ids, mask, _, _ = batch()
    out = model(input_ids=ids, attention_mask=mask)
    ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.zeros(3, 1, dtype=torch.long))
    assert out.logits.shape == (3, 1, 99)
    torch.testing.assert_close(out.logits, ref.logits, atol=0, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_to_hf_round_trip(variant):
    torch.manual_seed(0)
    model = T5Model(T5Config(**{**TINY, **VARIANTS[variant]})).eval()
    hf = model.to_hf().eval()
    ids, mask, dec, dmask = batch()
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
    assert max_diff_at(model(**kw).logits, hf(**kw).logits, dmask.bool()) <= 1e-4
    back = t5_from_hf(hf.config, hf.state_dict())
    assert back.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert (hf.lm_head.weight is hf.shared.weight) is model.config.tie_word_embeddings


def test_load_backbone_from_saved_folder(tmp_path, monkeypatch):
    hf = make_hf("v1.1")
    hf.save_pretrained(tmp_path)
    monkeypatch.setitem(loading._FAMILIES, "t5", t5_from_hf)
    model, tok = loading.load_backbone(tmp_path)
    assert tok is None and model.family == "t5" and model.kind == "seq2seq"
    ids, mask, dec, dmask = batch()
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
    assert max_diff_at(model(**kw).logits, hf(**kw).logits, dmask.bool()) <= 1e-4


def test_bf16_and_training_mode_run():
    hf = make_hf("v1.1")
    model = t5_from_hf(hf.config, hf.state_dict())
    ids, mask, dec, dmask = batch()
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
    ref = model.eval()(**kw).logits
    low = model.to(torch.bfloat16)(**kw).logits
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float().argmax(-1) == ref.argmax(-1))[dmask.bool()].float().mean() > 0.8
    model.float().train()
    torch.manual_seed(0)
    a = model(**kw, labels=dec).loss
    a.backward()
    assert model.encoder.layers[0].attn.relative_attention_bias.weight.grad.abs().sum() > 0
    assert not torch.equal(a, model(**kw, labels=dec).loss)  # dropout is active in training mode


def test_canonical_module_names_and_no_biases():
    model = T5Model(T5Config(**{**TINY, **VARIANTS["v1.1"]}))
    names = dict(model.named_modules())
    for name in ("encoder.layers.1.attn.q_proj", "encoder.layers.0.attn.o_proj", "encoder.layers.0.mlp.gate",
                 "decoder.layers.1.cross_attn.v_proj", "decoder.layers.0.mlp.fc1", "decoder.layers.1.mlp.fc2",
                 "lm_head", "embed_tokens"):
        assert name in names, name
    assert names["decoder.layers.0.attn.relative_attention_bias"] is not None
    assert names["encoder.layers.1.attn"].relative_attention_bias is None  # only the first layer owns it
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert T5Model(T5Config(**TINY)).encoder.layers[0].mlp.gate is None


def test_relative_position_buckets():
    rel = torch.arange(-30, 31)[None, :]  # key - query
    bi = relative_position_bucket(rel, True, 8, 20)
    causal = relative_position_bucket(rel, False, 8, 20)
    assert bi.min() >= 0 and bi.max() <= 7 and causal.min() >= 0 and causal.max() <= 7
    assert torch.all(causal[0, 30:] == 0)  # every future key shares bucket 0 (the causal mask hides them)
    assert bi[0, 30] == 0 and bi[0, 31] == 5 and bi[0, 29] == 1  # exact buckets near 0, key after query: top half
    assert torch.all(bi[0, :10] == bi[0, 0]) and torch.all(causal[0, :10] == 7)  # beyond max_distance: one bucket
    reference = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    rel = torch.arange(-300, 301)[None, :]
    for bidirectional, buckets, distance in ((True, 32, 128), (False, 32, 128), (True, 8, 20), (False, 6, 5)):
        ours = relative_position_bucket(rel, bidirectional, buckets, distance)
        assert torch.equal(ours, reference(rel, bidirectional, buckets, distance)), (bidirectional, buckets)


def test_shape_mismatch_is_reported_by_key_name():
    hf = make_hf("t5")
    state = dict(hf.state_dict())
    state["decoder.block.1.layer.1.EncDecAttention.k.weight"] = torch.zeros(16, 32)
    with pytest.raises(BackboneError, match=r"decoder\.block\.1\.layer\.1\.EncDecAttention\.k\.weight") as e:
        t5_from_hf(hf.config, state)
    assert "decoder.layers.1.cross_attn.k_proj.weight" in str(e.value) and "Fix:" in str(e.value)


def test_missing_untied_head_is_reported():
    hf = make_hf("v1.1")
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(BackboneError, match=r"lm_head\.weight") as e:
        t5_from_hf(hf.config, state)
    assert "Fix:" in str(e.value)


def test_tied_model_loads_without_a_head_in_the_checkpoint():
    hf = make_hf("t5")
    state = {k: v for k, v in hf.state_dict().items() if k not in ("lm_head.weight", "encoder.embed_tokens.weight")}
    model = T5Model(T5Config.from_hf(hf.config))
    native = hf_to_native_state(state, model.key_table(), model)
    assert torch.equal(native["lm_head.weight"], hf.shared.weight)


@pytest.mark.parametrize("field, value", [("feed_forward_proj", "swiglu"), ("d_kv", 0), ("dropout", 1.5),
                                          ("relative_attention_num_buckets", 2), ("pad_token_id", 99),
                                          ("relative_attention_max_distance", 3), ("tie_word_embeddings", "yes")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field) as e:
        T5Config(**{**TINY, field: value})
    assert "Fix: set " + field in str(e.value)


def test_presets_and_hf_config_conversion():
    cfg = T5Config.from_name("flan-t5-small")
    assert cfg.is_gated and not cfg.tie_word_embeddings and cfg.num_decoder_layers == 8 and cfg.hidden_size == 512
    with pytest.raises(ConfigError, match="Fix: use one of"):
        T5Config.from_name("t5-tiny")
    with pytest.raises(ConfigError, match="d_modle"):
        T5Config.from_name("t5-small", d_modle=8)
    hf_cfg = transformers.T5Config(**{**TINY, "feed_forward_proj": "gated-silu"})
    with pytest.raises(BackboneError, match="feed_forward_proj.*Fix"):
        T5Config.from_hf(hf_cfg)
    assert T5Config.from_hf(transformers.T5Config(**TINY)).num_decoder_layers == 2


def test_bad_inputs_raise_with_a_fix():
    model = T5Model(T5Config(**TINY)).eval()
    ids, mask, dec, _ = batch()
    cases = [
        (dict(input_ids=ids, inputs_embeds=torch.zeros(3, 11, 32)), "exactly one"),
        (dict(input_ids=ids + 99), "tokenizer of this checkpoint"),
        (dict(input_ids=ids, attention_mask=mask[:, :5]), "attention_mask has shape"),
        (dict(input_ids=ids, decoder_input_ids=dec, decoder_attention_mask=mask), "decoder_attention_mask"),
        (dict(input_ids=ids, prefix_kv={"encodr": []}), "unknown part"),
        (dict(input_ids=ids, prefix_kv={"encoder": _prefix(model, 2)["encoder"][:1]}), "one \\(k, v\\) pair"),
        (dict(input_ids=ids, prefix_kv={"cross": [(torch.zeros(3, 4, 2, 5),) * 2] * 2}), "d_kv=8"),
        (dict(input_ids=ids, encoder_outputs=[1, 2]), "model.encode"),
    ]
    for kwargs, message in cases:
        with pytest.raises(BackboneError, match=message) as e:
            model(**kwargs)
        assert "Fix:" in str(e.value), kwargs
    with pytest.raises(ConfigError, match="temperature"):
        model.generate(ids, temperature=0.0, do_sample=True)


def test_greedy_generate_20_new_tokens_equals_hf(pair):
    """The issue's bar: 20 new tokens, token for token, on a padded batch (no EOS: every step runs)."""
    hf, model = pair
    ids, mask, _, _ = batch()
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                      num_beams=1)
    ours = model.generate(ids, mask, max_new_tokens=20)
    assert ours.shape == (ids.shape[0], 21)
    assert torch.equal(ours, ref)
