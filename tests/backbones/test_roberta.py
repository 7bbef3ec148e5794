"""Native RoBERTa: parity with transformers (offset positions, MLM head), inputs_embeds, loading, to_hf, errors."""

import pytest
import torch
import transformers
from transformers.models.roberta.modeling_roberta import RobertaEmbeddings as HFEmbeddings

from promptdelta.backbones import RobertaConfig, RobertaModel, load_backbone
from promptdelta.backbones.bert import BertConfig
from promptdelta.backbones.keymap import hf_to_native_state
from promptdelta.backbones.roberta import (ROBERTA_KEYS, position_ids_for_embeds, position_ids_from_input_ids,
                                           roberta_from_hf)
from promptdelta.errors import BackboneError, ConfigError

ATOL = 1e-5  # fp32, same math in a different order (SDPA vs HF's attention, embedding sum order)
PAD = 1


def hf_config(cls=transformers.RobertaConfig, **overrides):
    kw = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=64, pad_token_id=PAD, type_vocab_size=1, layer_norm_eps=1e-5)
    return cls(**{**kw, **overrides})


def make_hf(cls=transformers.RobertaModel, seed=0, config_cls=transformers.RobertaConfig, **overrides):
    torch.manual_seed(seed)
    return cls(hf_config(config_cls, **overrides)).eval()


def batch(B=3, T=9, seed=1, left=False):
    """Random ids in [2, 99) with pad id 1 where the mask is 0 (right padding, or left when asked)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 99, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    if left:
        mask = mask.flip(1)
    ids[mask == 0] = PAD
    return ids, mask


def assert_close_at(a, b, keep, atol=ATOL):
    """Compare only real positions: padded queries are garbage in both implementations."""
    assert (a - b)[keep].abs().max().item() <= atol


def tiny_native(**overrides):
    torch.manual_seed(0)
    cfg = RobertaConfig(**{**dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                                  max_position_embeddings=64), **overrides})
    return RobertaModel(cfg).eval()


# ---- parity with transformers -------------------------------------------------------------------------------

@pytest.mark.parametrize("act,left", [("gelu", False), ("relu", False), ("gelu", True)])
def test_matches_hf_roberta_model(act, left):
    hf = make_hf(hidden_act=act, initializer_range=0.3)  # large weights: pre-activations of order 1
    model = roberta_from_hf(hf.config, hf.state_dict()).eval()
    assert (model.family, model.kind, model.has_lm_head) == ("roberta", "mlm", False)
    ids, mask = batch(left=left)
    ours = model(ids, attention_mask=mask, output_hidden_states=True)
    ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(ours.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(ours.hidden_states, ref.hidden_states):
        assert_close_at(a, b, mask.bool())
    assert_close_at(ours.last_hidden_state, ref.last_hidden_state, mask.bool())
    if not left:  # the pooler reads token 0, a pad under left padding
        torch.testing.assert_close(ours.pooler_output, ref.pooler_output, atol=ATOL, rtol=0)
    assert ours.logits is None


@pytest.mark.parametrize("act", ["gelu", "relu"])  # the head's GELU is fixed whatever hidden_act says
def test_matches_hf_masked_lm(act):
    hf = make_hf(transformers.RobertaForMaskedLM, hidden_act=act, initializer_range=0.3)
    with torch.no_grad():
        hf.lm_head.bias.normal_()  # a non-zero decoder bias, so its mapping is checked
    model = roberta_from_hf(hf.config, hf.state_dict()).eval()
    assert model.has_lm_head and model.pooler is None
    assert model.lm_head.decoder.weight is model.input_embeddings().weight  # tied
    ids, mask = batch()
    ours = model(ids, attention_mask=mask, output_hidden_states=True)
    ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for a, b in zip(ours.hidden_states, ref.hidden_states):
        assert_close_at(a, b, mask.bool())
    assert ours.logits.shape == (3, 9, 99)
    assert_close_at(ours.logits, ref.logits, mask.bool())


def test_two_token_types_and_explicit_positions_match_hf():
    hf = make_hf(type_vocab_size=2, initializer_range=0.3)
    model = roberta_from_hf(hf.config, hf.state_dict()).eval()
    ids, mask = batch()
    types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(5))
    pos = torch.arange(2, 11).flip(0).expand(3, 9)
    ours = model(ids, attention_mask=mask, token_type_ids=types, position_ids=pos).last_hidden_state
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=pos).last_hidden_state
    assert_close_at(ours, ref, mask.bool())
    assert (ours - model(ids, attention_mask=mask).last_hidden_state)[mask.bool()].abs().max() > 1e-3


def test_position_ids_match_hf_helpers():
    ids = torch.tensor([[0, 5, 6, 2, 1, 1], [1, 1, 0, 7, 2, 1], [0, 1, 8, 1, 9, 2]])  # pads right, left, inside
    ref = HFEmbeddings.create_position_ids_from_input_ids(ids, PAD)
    assert torch.equal(position_ids_from_input_ids(ids, PAD), ref)
    assert position_ids_from_input_ids(ids, PAD)[0].tolist() == [2, 3, 4, 5, 1, 1]
    embeds = torch.zeros(3, 6, 4)
    assert torch.equal(position_ids_for_embeds(3, 6, PAD, embeds.device),
                       HFEmbeddings.create_position_ids_from_inputs_embeds(embeds, PAD))


@pytest.mark.parametrize("left", [False, True])
def test_inputs_embeds_matches_hf_inputs_embeds(left):
    """HF gives inputs_embeds sequential positions pad+1.. (it cannot see pads); we do the same."""
    hf = make_hf(transformers.RobertaForMaskedLM, initializer_range=0.3)
    model = roberta_from_hf(hf.config, hf.state_dict()).eval()
    ids, mask = batch(left=left)
    embeds = model.input_embeddings()(ids)
    ours = model(inputs_embeds=embeds, attention_mask=mask)
    ref = hf(inputs_embeds=hf.get_input_embeddings()(ids), attention_mask=mask)
    assert_close_at(ours.logits, ref.logits, mask.bool())
    from_ids = model(ids, attention_mask=mask).logits
    gap = (ours.logits - from_ids)[mask.bool()].abs().max().item()
    if left:  # left padding shifts the real tokens' positions in the embeds path (as in HF)
        assert gap > 1e-3
    else:  # right padding: real tokens get the same positions either way
        assert gap <= ATOL


def test_inputs_embeds_with_ids_positions_equals_input_ids():
    model = tiny_native(has_lm_head=True)
    ids, mask = batch(left=True)
    pos = position_ids_from_input_ids(ids, PAD)
    a = model(ids, attention_mask=mask)
    b = model(inputs_embeds=model.input_embeddings()(ids), attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)


def test_longest_allowed_sequence_matches_hf():
    hf = make_hf()
    model = roberta_from_hf(hf.config, hf.state_dict()).eval()
    ids = torch.randint(2, 99, (1, model.config.max_tokens), generator=torch.Generator().manual_seed(2))
    assert model.config.max_tokens == 62
    torch.testing.assert_close(model(ids).last_hidden_state, hf(input_ids=ids).last_hidden_state, atol=ATOL, rtol=0)


# ---- backbone contract ----------------------------------------------------------------------------------------

def test_canonical_module_names_and_pad_position_frozen():
    model = tiny_native(has_lm_head=True)
    names = dict(model.named_modules())
    for name in ("embeddings.word_embeddings", "layers.1.attn.q_proj", "layers.1.attn.k_proj",
                 "layers.1.attn.v_proj", "layers.1.attn.o_proj", "layers.1.attn_norm", "layers.1.mlp.fc1",
                 "layers.1.mlp.fc2", "layers.1.mlp_norm", "pooler.dense", "lm_head.dense", "lm_head.norm",
                 "lm_head.decoder"):
        assert name in names, name
    positions = model.embeddings.position_embeddings.weight
    assert positions[PAD].abs().sum() == 0
    ids, mask = batch()
    model(ids, attention_mask=mask).logits.sum().backward()
    assert positions.grad[PAD].abs().sum() == 0 and positions.grad[PAD + 1].abs().sum() > 0


def test_prefix_kv_broadcasts_and_matters():
    model = tiny_native()
    ids, mask = batch()
    g = torch.Generator().manual_seed(3)
    shape = (1, 4, 2, 8)
    prefix = [(torch.randn(shape, generator=g).requires_grad_(), torch.randn(shape, generator=g)) for _ in range(2)]
    out = model(ids, attention_mask=mask, prefix_kv=prefix).last_hidden_state
    empty = [(torch.zeros(3, 4, 0, 8), torch.zeros(3, 4, 0, 8))] * 2
    plain = model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(model(ids, attention_mask=mask, prefix_kv=empty).last_hidden_state, plain,
                               atol=0, rtol=0)
    assert (out - plain)[mask.bool()].abs().max() > 1e-3
    out.sum().backward()
    assert prefix[0][0].grad.abs().sum() > 0


# ---- loading --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [transformers.RobertaModel, transformers.RobertaForMaskedLM])
def test_load_backbone_live_and_folder(tmp_path, cls):
    hf = make_hf(cls, initializer_range=0.3)
    hf.save_pretrained(tmp_path)  # the file leaves out the tied lm_head.decoder.* keys
    ids, mask = batch()
    ref = hf(input_ids=ids, attention_mask=mask)
    ref = ref.logits if cls is transformers.RobertaForMaskedLM else ref.last_hidden_state
    for source in (hf, tmp_path):
        model, tok = load_backbone(source)
        assert isinstance(model, RobertaModel) and tok is None and not model.training
        out = model(ids, attention_mask=mask)
        assert_close_at(out.logits if model.has_lm_head else out.last_hidden_state, ref, mask.bool())


def test_xlm_roberta_loads_and_exports():
    hf = make_hf(transformers.XLMRobertaForMaskedLM, config_cls=transformers.XLMRobertaConfig,
                 initializer_range=0.3)
    model, _ = load_backbone(hf)
    assert model.config.model_type == "xlm-roberta"
    ids, mask = batch()
    assert_close_at(model(ids, attention_mask=mask).logits, hf(input_ids=ids, attention_mask=mask).logits,
                    mask.bool())
    assert type(model.to_hf()) is transformers.XLMRobertaForMaskedLM


# ---- export ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pooler,head", [(True, False), (False, False), (False, True), (True, True)])
def test_to_hf_round_trip(pooler, head):
    model = tiny_native(has_pooler=pooler, has_lm_head=head)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-trivial biases and norms
    hf = model.to_hf()
    assert not hf.training
    assert type(hf) is (transformers.RobertaForMaskedLM if head else transformers.RobertaModel)
    ids, mask = batch()
    ours, ref = model(ids, attention_mask=mask), hf(input_ids=ids, attention_mask=mask)
    assert_close_at(ours.logits if head else ours.last_hidden_state, ref.logits if head else ref.last_hidden_state,
                    mask.bool())
    back = roberta_from_hf(hf.config, hf.state_dict())
    assert back.has_lm_head == head and (back.pooler is not None) == pooler
    assert model.state_dict().keys() == back.state_dict().keys()
    for name, a in model.state_dict().items():
        assert torch.equal(a, back.state_dict()[name]), name


def test_hf_native_hf_state_dict_identical():
    hf = make_hf(transformers.RobertaForMaskedLM)
    again = roberta_from_hf(hf.config, hf.state_dict()).to_hf()
    assert type(again) is transformers.RobertaForMaskedLM
    ref, got = hf.state_dict(), again.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert again.config.pad_token_id == PAD and again.config.type_vocab_size == 1


# ---- key table ------------------------------------------------------------------------------------------------

def test_key_table_maps_both_ways():
    assert ROBERTA_KEYS.to_native("roberta.encoder.layer.3.attention.self.key.bias") == "layers.3.attn.k_proj.bias"
    assert ROBERTA_KEYS.to_native("roberta.embeddings.LayerNorm.weight") == "embeddings.norm.weight"
    assert ROBERTA_KEYS.to_native("lm_head.layer_norm.weight") == "lm_head.norm.weight"
    assert ROBERTA_KEYS.to_native("lm_head.bias") == "lm_head.decoder.bias"
    assert ROBERTA_KEYS.to_hf("lm_head.norm.bias") == "lm_head.layer_norm.bias"
    assert ROBERTA_KEYS.to_hf("layers.0.mlp.fc1.weight") == "encoder.layer.0.intermediate.dense.weight"
    assert ROBERTA_KEYS.is_ignored("roberta.embeddings.position_ids")
    assert ROBERTA_KEYS.is_ignored("roberta.embeddings.token_type_ids")


def test_missing_unexpected_and_shape_mismatch_named():
    hf = make_hf(transformers.RobertaForMaskedLM)
    model = RobertaModel(RobertaConfig.from_hf(hf.config, has_pooler=False, has_lm_head=True))
    state = dict(hf.state_dict())
    del state["lm_head.layer_norm.weight"]
    del state["roberta.encoder.layer.1.attention.self.query.bias"]
    state["classifier.dense.weight"] = torch.zeros(32, 32)
    state["lm_head.dense.bias"] = torch.zeros(31)
    with pytest.raises(BackboneError) as info:
        hf_to_native_state(state, ROBERTA_KEYS, model)
    text = str(info.value)
    assert "missing from the checkpoint (2)" in text
    assert "lm_head.norm.weight (HF: lm_head.layer_norm.weight)" in text
    assert "layers.1.attn.q_proj.bias (HF: encoder.layer.1.attention.self.query.bias)" in text
    assert "unexpected in the checkpoint (no place in the model) (1)" in text and "classifier.dense.weight" in text
    assert "lm_head.dense.bias -> lm_head.dense.bias: (31,) vs (32,)" in text
    assert "native roberta model" in text and "Fix:" in text


def test_missing_lm_head_bias_named():
    hf = make_hf(transformers.RobertaForMaskedLM)
    state = {k: v for k, v in hf.state_dict().items() if k not in ("lm_head.bias", "lm_head.decoder.bias")}
    with pytest.raises(BackboneError, match=r"lm_head\.decoder\.bias \(HF: lm_head\.decoder\.bias\)(.|\n)*Fix:"):
        roberta_from_hf(hf.config, state)


# ---- bad inputs -----------------------------------------------------------------------------------------------

def test_bad_forward_inputs():
    model = tiny_native()
    ids, mask = batch()
    with pytest.raises(BackboneError, match="sequence length 63 exceeds the 62 tokens.*Fix: truncate"):
        model(torch.full((1, 63), 5))
    with pytest.raises(BackboneError, match="sequence length 63 exceeds.*Fix: truncate"):
        model(inputs_embeds=torch.zeros(1, 63, 32))
    with pytest.raises(BackboneError, match=r"token_type_ids holds values in \[1, 1\] but only \[0, 0\].*Fix: "
                                            "pass all zeros"):
        model(ids, token_type_ids=torch.ones_like(ids))
    with pytest.raises(BackboneError,
                       match=r"position_ids holds values in \[56, 64\] but only \[0, 63\].*Fix: pass positions"):
        model(ids, position_ids=torch.arange(56, 65).expand(3, 9))
    with pytest.raises(BackboneError, match="both.*Fix: pass exactly one"):
        model(ids, inputs_embeds=model.input_embeddings()(ids))
    with pytest.raises(BackboneError, match="neither.*Fix: pass exactly one"):
        model()
    with pytest.raises(BackboneError, match="id 99 .*Fix: use the tokenizer"):
        model(torch.tensor([[2, 99]]))
    with pytest.raises(BackboneError, match="attention_mask.*Fix:"):
        model(ids, attention_mask=mask[:, :4])


@pytest.mark.parametrize("field,value,fix", [
    ("hidden_size", 0, "set hidden_size to"), ("num_heads", 5, "set num_heads to"),
    ("pad_token_id", None, "set pad_token_id to the tokenizer's pad id"),
    ("pad_token_id", 63, "set pad_token_id to the tokenizer's pad id"),
    ("model_type", "camembert", "set model_type to one of"),
])
def test_config_validation_names_field(field, value, fix):
    kw = dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
              max_position_embeddings=64)
    with pytest.raises(ConfigError, match=rf"RobertaConfig\.{field}=.*Fix: {fix}"):
        RobertaConfig(**{**kw, field: value})


def test_presets_defaults_and_wrong_config():
    cfg = RobertaConfig.from_name("roberta-base")
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.type_vocab_size, cfg.pad_token_id,
            cfg.layer_norm_eps, cfg.max_tokens) == (50265, 514, 1, 1, 1e-5, 512)
    with pytest.raises(ConfigError, match="unknown RoBERTa preset 'nope'.*Fix: use one of.*roberta-base"):
        RobertaConfig.from_name("nope")
    with pytest.raises(ConfigError, match=r"unknown RobertaConfig field\(s\) \['layers'\].*Fix"):
        RobertaConfig.from_name("roberta-base", layers=3)
    with pytest.raises(ConfigError, match="needs a RobertaConfig, got BertConfig.*Fix: build it"):
        RobertaModel(BertConfig(vocab_size=99, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=37))
    with pytest.raises(BackboneError, match="position_embedding_type='relative_key'.*Fix"):
        RobertaConfig.from_hf(hf_config(position_embedding_type="relative_key"))
