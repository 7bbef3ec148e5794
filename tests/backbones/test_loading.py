"""load_backbone: presets, folders (safetensors / sharded / .bin), live models, hub ids offline, errors."""

import json
import logging

import pytest
import torch
import transformers

import promptdelta.backbones.loading as loading
from promptdelta.backbones import BertModel, load_backbone, register_family, supported_families
from promptdelta.errors import BackboneError, ConfigError, MissingFileError

SENTENCES = ["A wonderful, moving film.", "Terrible.", "The plot was thin but the actors carried it well enough."]


def tiny_hf(cls=transformers.BertModel, **overrides):
    kw = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=64)
    torch.manual_seed(0)
    return cls(transformers.BertConfig(**{**kw, **overrides})).eval()


def tiny_batch():
    ids = torch.randint(1, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    return ids, mask


def assert_same_outputs(model, hf):
    ids, mask = tiny_batch()
    ours = model(ids, attention_mask=mask)
    ref = hf(input_ids=ids, attention_mask=mask)
    keep = mask.bool()
    if model.has_lm_head:
        assert (ours.logits - ref.logits)[keep].abs().max() <= 1e-5
    else:
        assert (ours.last_hidden_state - ref.last_hidden_state)[keep].abs().max() <= 1e-5


def save_bin(hf, folder):
    hf.config.save_pretrained(folder)
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_folder_layouts(tmp_path, layout, caplog):
    hf = tiny_hf()
    if layout == "safetensors":
        hf.save_pretrained(tmp_path)
    elif layout == "sharded":
        hf.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
    else:
        save_bin(hf, tmp_path)
    with caplog.at_level(logging.WARNING, logger="promptdelta.backbones.loading"):
        model, tok = load_backbone(tmp_path)
    assert tok is None and "no tokenizer files" in caplog.text
    assert isinstance(model, BertModel) and not model.training and model.pooler is not None
    assert_same_outputs(model, hf)


def test_folder_with_mlm_head_and_tokenizer(tiny_bert_dir):
    model, tok = load_backbone(str(tiny_bert_dir))
    assert model.has_lm_head and tok.is_fast
    hf = transformers.BertForMaskedLM.from_pretrained(tiny_bert_dir).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    ours = model(**enc).logits
    ref = hf(**enc).logits
    assert (ours - ref)[enc["attention_mask"].bool()].abs().max() <= 1e-5


def test_tokenizer_argument(tiny_bert_dir, tiny_bert_nohead_dir):
    _, tok = load_backbone(tiny_bert_nohead_dir, tokenizer=str(tiny_bert_dir))
    assert tok.is_fast and tok.cls_token == "[CLS]"
    sentinel = object()
    assert load_backbone(tiny_bert_nohead_dir, tokenizer=sentinel)[1] is sentinel
    with pytest.raises(BackboneError, match="could not load a tokenizer.*Fix: pass tokenizer="):
        load_backbone(tiny_bert_nohead_dir, tokenizer=str(tiny_bert_nohead_dir / "config.json"))


@pytest.mark.parametrize("cls", [transformers.BertModel, transformers.BertForMaskedLM])
def test_live_transformers_model(cls):
    hf = tiny_hf(cls)
    model, tok = load_backbone(hf)
    assert tok is None and model.has_lm_head == (cls is transformers.BertForMaskedLM)
    assert_same_outputs(model, hf)
    model.input_embeddings().weight.data.zero_()  # a copy: the HF model keeps its weights
    assert hf.get_input_embeddings().weight.abs().sum() > 0


def test_minilm_matches_transformers():
    model, tok = load_backbone("minilm")
    assert not model.training and tok.is_fast and not model.has_lm_head
    assert (model.config.hidden_size, model.config.num_layers) == (384, 6)
    hf = transformers.BertModel.from_pretrained(loading.PRESETS["minilm"]()).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    assert enc["attention_mask"].min() == 0  # a padded batch
    with torch.no_grad():
        ours = model(**enc, output_hidden_states=True)
        ref = hf(**enc, output_hidden_states=True)
    keep = enc["attention_mask"].bool()
    for a, b in zip(ours.hidden_states, ref.hidden_states, strict=True):
        assert (a - b)[keep].abs().max() <= 1e-4
    torch.testing.assert_close(ours.pooler_output, ref.pooler_output, atol=1e-4, rtol=0)


def test_dtype():
    model, _ = load_backbone(tiny_hf(), dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_backbone(tiny_hf(), dtype=torch.float64)
    assert model.input_embeddings().weight.dtype == torch.float64
    with pytest.raises(ConfigError, match="dtype='int8'.*Fix: pass a torch float dtype"):
        load_backbone(tiny_hf(), dtype="int8")


# ---- errors -----------------------------------------------------------------------------------------------

def test_unknown_model_type_names_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(BackboneError, match=r"model_type 'mamba' has no native backbone.*\['bert'"):
        load_backbone(tmp_path)
    albert = transformers.AlbertModel(transformers.AlbertConfig(
        vocab_size=10, embedding_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=8))
    with pytest.raises(BackboneError, match=r"'albert'.*Fix: use a checkpoint of a supported model_type"):
        load_backbone(albert)


def test_missing_paths(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist. Fix: pass an existing checkpoint folder"):
        load_backbone(tmp_path / "no" / "such" / "folder")
    with pytest.raises(MissingFileError, match="has no config.json. Fix"):
        load_backbone(tmp_path)
    (tmp_path / "config.json").write_text(tiny_hf().config.to_json_string())
    with pytest.raises(MissingFileError, match="has no weights. Fix: put model.safetensors"):
        load_backbone(tmp_path)
    with pytest.raises(MissingFileError, match="is a file, not a checkpoint folder"):
        load_backbone(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(BackboneError, match="not a JSON object.*Fix"):
        load_backbone(tmp_path)


def test_hub_id_offline_says_pass_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingFileError, match="HF_HUB_OFFLINE is set.*Fix: pass a local checkpoint folder"):
        load_backbone("promptdelta-test/surely-not-cached-bert")


def test_weights_that_do_not_fit_config(tmp_path):
    tiny_hf().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(BackboneError, match=r"(?s)missing from the checkpoint \(16\).*layers\.2\.attn\.q_proj\.weight"):
        load_backbone(tmp_path)


def test_not_a_transformers_module():
    with pytest.raises(BackboneError, match="Linear: it has no config.model_type. Fix"):
        load_backbone(torch.nn.Linear(2, 2))


@pytest.fixture
def clean_registry():
    """Registry contents before the test come back after it (a test may register a family)."""
    from promptdelta.backbones import registry

    registry.registered_families()
    saved = (dict(registry._FAMILIES), dict(registry._BY_MODEL_TYPE))
    yield registry
    registry._FAMILIES.clear(), registry._BY_MODEL_TYPE.clear()
    registry._FAMILIES.update(saved[0]), registry._BY_MODEL_TYPE.update(saved[1])


def test_register_family(clean_registry, tmp_path):
    seen = {}

    def build(hf_config, state):
        seen.update(type=hf_config.model_type, keys=set(state))
        return torch.nn.Linear(2, 2)

    register_family("distilbert", build)
    assert "distilbert" in supported_families()
    with pytest.raises(BackboneError, match="already registered. Fix"):
        register_family("distilbert", build)
    register_family("distilbert", build, overwrite=True)
    hf = transformers.DistilBertModel(transformers.DistilBertConfig(n_layers=1, dim=8, n_heads=2, hidden_dim=16,
                                                                     vocab_size=10))
    model, tok = load_backbone(hf)
    assert isinstance(model, torch.nn.Linear) and tok is None
    assert seen["type"] == "distilbert" and seen["keys"] == set(hf.state_dict())


def test_every_shipped_family_is_registered_with_its_model_types():
    from promptdelta.backbones import registry

    for name, types in (("bert", {"bert"}), ("roberta", {"roberta", "xlm-roberta"}), ("gpt2", {"gpt2"}),
                        ("t5", {"t5"})):
        family = registry.get_family(name)
        assert set(family.model_types) == types and all(registry.get_family(t) is family for t in types)
    assert {"bert", "gpt2", "t5", "roberta", "xlm-roberta"} <= set(supported_families())


def test_unknown_family_error_lists_the_known_ones():
    from promptdelta.backbones import registry

    with pytest.raises(BackboneError, match=r"no backbone family for 'nope'. Fix: .*'bert'.*register_family"):
        registry.get_family("nope")


def test_family_records_describe_native_models():
    from promptdelta.backbones import BertConfig, BertModel, T5Config, T5Model, registry

    bert = BertModel(BertConfig(vocab_size=20, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24))
    fam = registry.family_of(bert)
    assert fam.name == "bert" and fam.layer_stacks(bert) == [bert.layers]
    spec = fam.block_spec(bert.config)
    assert (spec.pre_norm, spec.norm, spec.gated, spec.positions) == (False, "layernorm", False, "absolute")
    [stack] = fam.attention_stacks(bert)
    assert (stack.name, stack.modules, stack.heads, stack.head_dim) == ("layers", ("layers.0.attn", "layers.1.attn"),
                                                                        2, 8)
    t5 = T5Model(T5Config(vocab_size=20, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=3,
                          num_heads=2, feed_forward_proj="gated-gelu"))
    fam = registry.family_of(t5)
    assert [s.name for s in fam.attention_stacks(t5)] == ["encoder", "decoder", "cross"]
    assert [s.layers for s in fam.attention_stacks(t5)] == [2, 3, 3]
    spec = fam.block_spec(t5.config)
    assert (spec.pre_norm, spec.norm, spec.gated, spec.bias) == (True, "rmsnorm", True, False)
    assert registry.family_of(torch.nn.Linear(2, 2)) is None


def test_register_family_refuses_a_clash_and_overwrites_on_request(clean_registry):
    registry = clean_registry
    bert = registry.get_family("bert")
    clash = registry.Family(**{**{f: getattr(bert, f) for f in bert.__dataclass_fields__}, "name": "bert2"})
    with pytest.raises(BackboneError, match="clashes with a registered family.*overwrite=True"):
        registry.register_family(clash)
    registry.register_family(clash, overwrite=True)
    assert registry.get_family("bert") is bert and registry.get_family("bert2") is clash
    assert registry.find_family("bert") is bert
