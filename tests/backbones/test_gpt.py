"""Native GPT-2 against transformers.GPT2LMHeadModel on a tiny random config (fp32, max abs diff <= 1e-5)."""

import logging

import pytest
import torch

from promptdelta.backbones.gpt import GPT2Config, GPT2Model, gpt2_from_hf
from promptdelta.errors import BackboneError, ConfigError

TOL = dict(atol=1e-5, rtol=0)  # fp32: same math, only summation order differs


def _hf_config(**kw):
    import transformers

    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64, **kw)


@pytest.fixture(scope="module")
def pair():
    import transformers

    logging.getLogger("promptdelta.backbones.gpt").setLevel(logging.ERROR)  # tiny vocab: EOS 50256 -> None
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(_hf_config()).eval()
    return hf, GPT2Model.from_hf(hf).eval()


def _left_padded(lengths, total, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n:] = 1
        ids[row, : total - n] = 0
    return ids, mask


def test_contract_and_module_names(pair):
    _, model = pair
    assert (model.family, model.kind, model.has_lm_head) == ("gpt2", "clm", True)
    assert model.lm_head.weight is model.input_embeddings().weight  # tied
    names = dict(model.named_modules())
    for name in ("layers.1.attn.q_proj", "layers.1.attn.k_proj", "layers.1.attn.v_proj", "layers.1.attn.o_proj",
                 "layers.1.attn_norm", "layers.1.mlp_norm", "layers.1.mlp.fc1", "layers.1.mlp.fc2", "final_norm",
                 "embeddings.word_embeddings", "lm_head"):
        assert name in names, name
    assert model.config.hidden_size == 32 and model.config.eos_token_id is None


@torch.no_grad()
def test_hidden_states_and_logits_match_hf(pair):
    hf, model = pair
    ids = torch.randint(0, 99, (3, 11), generator=torch.Generator().manual_seed(0))
    ref = hf(ids, output_hidden_states=True)
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(mine, theirs, **TOL)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    assert out.hidden_states[-1] is out.last_hidden_state and out.past_key_values is None


@torch.no_grad()
def test_left_padding_matches_unpadded_single_runs(pair):
    hf, model = pair
    ids, mask = _left_padded([9, 4, 1], total=9)
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert torch.isfinite(out.logits).all()  # padding queries see no key: finite, not NaN
    for row, n in enumerate([9, 4, 1]):
        ref = hf(ids[row:row + 1, 9 - n:], output_hidden_states=True)
        for mine, theirs in zip(out.hidden_states, ref.hidden_states):
            torch.testing.assert_close(mine[row:row + 1, 9 - n:], theirs, **TOL)
        torch.testing.assert_close(out.logits[row:row + 1, 9 - n:], ref.logits, **TOL)


@torch.no_grad()
def test_kv_cache_incremental_equals_full_forward(pair):
    _, model = pair
    ids, mask = _left_padded([10, 6], total=10, seed=3)
    full = model(ids, attention_mask=mask).logits  # (B, 10, V)
    out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
    steps = [out.logits]
    for t in range(6, 10):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values,
                    use_cache=True)
        steps.append(out.logits)
    assert out.past_key_values[0][0].shape == (2, 4, 10, 8)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], **TOL)


@torch.no_grad()
def test_greedy_generate_equals_hf_with_left_padding_and_eos(pair):
    hf, model = pair
    ids, mask = _left_padded([7, 3, 5], total=7, seed=4)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    eos = int(free[0, 7 + 2])  # a token row 0 really produces at step 3: row 0 must stop there
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                      pad_token_id=0)
    mine = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(mine, ref)
    first = (mine[0, 7:] == eos).nonzero()[0, 0]
    assert (mine[0, 7 + first + 1:] == 0).all() and first < 3 + 1


@torch.no_grad()
def test_sampling_equals_hf_from_the_same_seed(pair):
    hf, model = pair
    ids, mask = _left_padded([6, 2], total=6, seed=5)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=0.7,
              pad_token_id=0)
    torch.manual_seed(3)
    ref = hf.generate(ids, **kw)
    torch.manual_seed(3)
    assert torch.equal(model.generate(ids, **kw), ref)


@torch.no_grad()
def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(pair):
    _, model = pair
    ids, mask = _left_padded([5, 3], total=5, seed=6)
    draw = lambda seed, **kw: model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True,  # noqa
                                             temperature=2.0, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(draw(11), draw(11))
    assert not torch.equal(draw(11), draw(12))
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(draw(13, top_k=1), greedy)


@torch.no_grad()
def test_prefix_kv_equals_prepending_the_tokens(pair):
    _, model = pair
    g = torch.Generator().manual_seed(7)
    extra, ids = torch.randint(0, 99, (2, 4), generator=g), torch.randint(0, 99, (2, 6), generator=g)
    full = model(torch.cat([extra, ids], dim=1)).logits[:, 4:]                  # (B, 6, V)
    prefix = model(extra, use_cache=True).past_key_values                      # the projected k/v of `extra`
    out = model(ids, prefix_kv=prefix, position_ids=torch.arange(4, 10).expand(2, 6)).logits
    torch.testing.assert_close(out, full, **TOL)
    plain = model(ids, position_ids=torch.arange(4, 10).expand(2, 6)).logits
    assert (plain - full).abs().max() > 1e-3  # the prefix really matters


@torch.no_grad()
def test_prefix_kv_broadcasts_batch_one_and_works_in_generate(pair):
    _, model = pair
    prefix = [(torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8)) for _ in range(2)]
    ids, mask = _left_padded([5, 2], total=5, seed=8)
    out = model(ids, attention_mask=mask, prefix_kv=prefix).logits
    single = model(ids[1:, 3:], prefix_kv=prefix).logits
    torch.testing.assert_close(out[1:, 3:], single, **TOL)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=1, prefix_kv=prefix)
    assert torch.equal(gen[:, -1], out[:, -1].argmax(-1))


@torch.no_grad()
def test_inputs_embeds_equals_input_ids(pair):
    _, model = pair
    ids, mask = _left_padded([6, 4], total=6, seed=9)
    by_ids = model(ids, attention_mask=mask, output_hidden_states=True)
    by_emb = model(inputs_embeds=model.input_embeddings()(ids), attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(by_emb.logits, by_ids.logits, atol=0, rtol=0)


@torch.no_grad()
def test_to_hf_round_trip(pair):
    hf, model = pair
    back = model.to_hf().eval()
    ids = torch.randint(0, 99, (2, 8), generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=0, rtol=0)
    for key, value in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@torch.no_grad()
def test_untied_head_round_trip_and_parity():
    import transformers

    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(_hf_config(tie_word_embeddings=False)).eval()
    model = GPT2Model.from_hf(hf).eval()
    assert model.lm_head.weight is not model.input_embeddings().weight
    ids = torch.randint(0, 99, (2, 5))
    torch.testing.assert_close(model(ids).logits, hf(ids).logits, **TOL)
    torch.testing.assert_close(model.to_hf()(ids).logits, hf(ids).logits, atol=0, rtol=0)


def test_body_only_checkpoint_and_load_backbone(pair, tmp_path):
    import transformers

    from promptdelta.backbones.loading import load_backbone, register_family, supported_families

    hf, model = pair
    body = transformers.GPT2Model(hf.config)
    body.load_state_dict(hf.transformer.state_dict())
    assert torch.equal(GPT2Model.from_hf(body).lm_head.weight, model.lm_head.weight)  # tied head filled
    if "gpt2" not in supported_families():  # until loading.py registers the family itself
        register_family("gpt2", gpt2_from_hf)
    hf.save_pretrained(tmp_path)
    loaded, tok = load_backbone(tmp_path)
    assert isinstance(loaded, GPT2Model) and tok is None
    ids = torch.randint(0, 99, (1, 6))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_wrong_shape_weight_names_the_key(pair):
    hf, _ = pair
    state = dict(hf.state_dict())
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(32, 100)
    with pytest.raises(BackboneError, match=r"(?s)transformer\.h\.1\.mlp\.c_fc\.weight.*Fix:"):
        gpt2_from_hf(hf.config, state)
    state = dict(hf.state_dict())
    state["transformer.h.0.attn.c_attn.weight"] = torch.zeros(32, 95)
    with pytest.raises(BackboneError, match=r"transformer\.h\.0\.attn\.c_attn\.weight.*Fix:"):
        gpt2_from_hf(hf.config, state)


def test_missing_weight_names_the_key(pair):
    hf, _ = pair
    state = {k: v for k, v in hf.state_dict().items() if k != "transformer.ln_f.bias"}
    with pytest.raises(BackboneError, match=r"(?s)final_norm\.bias \(HF: ln_f\.bias\).*Fix:"):
        gpt2_from_hf(hf.config, state)


def test_unsupported_hf_config_is_refused():
    with pytest.raises(BackboneError, match="scale_attn_by_inverse_layer_idx.*Fix:"):
        GPT2Config.from_hf(_hf_config(scale_attn_by_inverse_layer_idx=True))


@pytest.mark.parametrize("kwargs, field", [
    (dict(hidden_size=30, num_heads=4), "num_heads"), (dict(num_layers=0), "num_layers"),
    (dict(activation="swish"), "activation"), (dict(attn_dropout=1.0), "attn_dropout"),
    (dict(vocab_size=10, eos_token_id=10), "eos_token_id"), (dict(pad_token_id=-1), "pad_token_id"),
])
def test_bad_config_names_field_and_fix(kwargs, field):
    with pytest.raises(ConfigError, match=rf"GPT2Config\.{field}=.*Fix: set {field}"):
        GPT2Config(**kwargs)


def test_presets():
    assert GPT2Config.from_name("gpt2-medium").num_layers == 24
    assert GPT2Config.from_name("gpt2", num_layers=2).intermediate_size == 3072
    with pytest.raises(ConfigError, match="Fix: use one of"):
        GPT2Config.from_name("gpt5")
    with pytest.raises(ConfigError, match="n_layer.*Fix: use only"):
        GPT2Config.from_name("gpt2", n_layer=2)


@pytest.mark.parametrize("call, message", [
    (lambda m: m(), "neither of input_ids and inputs_embeds. Fix"),
    (lambda m: m(torch.tensor([[1, 99]])), "id 99 .*Fix: use the tokenizer"),
    (lambda m: m(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4)), r"\(2, 5\)\. Fix"),
    (lambda m: m(torch.ones(1, 65, dtype=torch.long)), "n_positions=64. Fix: truncate"),
    (lambda m: m(torch.ones(1, 3, dtype=torch.long), prefix_kv=[(torch.zeros(1, 4, 2, 8),) * 2]),
     "prefix_kv has 1 entries.*Fix"),
    (lambda m: m(torch.ones(1, 3, dtype=torch.long), prefix_kv=[(torch.zeros(1, 2, 2, 8),) * 2] * 2),
     r"prefix_kv\[0\].*Fix: pass k and v of shape"),
    (lambda m: m(torch.ones(2, 1, dtype=torch.long),
                 past_key_values=m(torch.ones(1, 3, dtype=torch.long), use_cache=True).past_key_values),
     "past_key_values.*Fix: pass the past_key_values returned"),
    (lambda m: m.generate(torch.ones(1, 60, dtype=torch.long), max_new_tokens=5), "Fix: shorten the prompt"),
    (lambda m: m.generate(torch.ones(1, 3, dtype=torch.long), top_p=2.0), "top_p=2.0.*Fix"),
])
def test_bad_inputs_raise_with_fix(pair, call, message):
    _, model = pair
    with pytest.raises((BackboneError, ConfigError), match=message):
        call(model)


@torch.no_grad()
def test_bfloat16_left_padded_forward_is_finite_and_close(pair):
    _, model = pair
    ids, mask = _left_padded([6, 3], total=6, seed=12)
    ref = model(ids, attention_mask=mask).logits
    low = GPT2Model(model.config).eval()
    low.load_state_dict(model.state_dict())
    out = low.to(torch.bfloat16)(ids, attention_mask=mask).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float()[mask.bool()], ref[mask.bool()], atol=0.05, rtol=0.05)  # bf16: 8 bits


@torch.no_grad()
def test_greedy_generate_20_new_tokens_equals_hf(pair):
    """The issue's bar: 20 new tokens, token for token, on a left-padded batch (no EOS: every step runs)."""
    hf, model = pair
    ids, mask = _left_padded([9, 4, 6], total=9, seed=7)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                      pad_token_id=0)
    mine = model.generate(ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0)
    assert mine.shape == (3, 9 + 20)
    assert torch.equal(mine, ref)
