"""PEFT's adapter format both ways, checked against the real ``peft`` package (issue 17 item 4): our LoRA ->
PEFT folder -> ``PeftModel.from_pretrained`` / transformers ``load_adapter`` gives our outputs; PEFT's
``get_peft_model`` + ``save_pretrained`` -> ``pd.load_delta`` gives PEFT's outputs; on tiny random BERT,
RoBERTa, GPT-2, T5, Llama and Qwen2, and from native backbones (names mapped through the key tables)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers
from delta_helpers import hf_bert, native_bert, perturb

from promptdelta.backbones import load_backbone
from promptdelta.deltas import attach, deltas_of, load_delta
from promptdelta.errors import CheckpointError, DeltaError

peft = pytest.importorskip("peft")
V = 99


def _bert():
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64))


def _roberta():
    return transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=66, pad_token_id=1))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0))


def _t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))


# family id -> (builder, PEFT target_modules for the PEFT -> ours direction)
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], list[str]]] = {
    "bert": (_bert, ["query", "value", "output.dense"]), "roberta": (_roberta, ["query", "value"]),
    "gpt2": (_gpt2, ["c_attn", "c_proj"]), "t5": (_t5, ["q", "v", "wo"]),
    "llama": (_llama, ["q_proj", "v_proj", "down_proj"]), "qwen2": (_qwen2, ["q_proj", "k_proj", "o_proj"]),
}


def _base(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[family][0]().eval()


def _out(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    seq2seq = getattr(model.config, "is_encoder_decoder", False) or getattr(model, "kind", None) == "seq2seq"
    kw = {"decoder_input_ids": ids[:, :4]} if seq2seq else {}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(4))   # (B, T)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("family", list(MODELS))
def test_ours_to_peft_loads_in_peft_and_transformers(family: str, tmp_path: Path, ids):
    base = _base(family)
    fresh, fresh2 = copy.deepcopy(base), copy.deepcopy(base)
    before = _out(base, ids)
    handle = attach(base, "lora", r=4, alpha=12, dropout=0.1)
    perturb(handle.parameters())
    want = _out(base, ids)
    assert (want - before).abs().max() > 1e-3            # the delta changes the outputs
    handle.save(tmp_path / "a", format="peft")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 12 and cfg["lora_dropout"] == 0.1
    _close(_out(peft.PeftModel.from_pretrained(fresh, tmp_path / "a").eval(), ids), want)
    fresh2.load_adapter(str(tmp_path / "a"))
    _close(_out(fresh2, ids), want)


@pytest.mark.parametrize("family", list(MODELS))
def test_peft_to_ours(family: str, tmp_path: Path, ids):
    base = _base(family)
    mine = copy.deepcopy(base)
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=MODELS[family][1], use_rslora=family == "llama",
                             fan_in_fan_out=family == "gpt2")
    pm = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    want = _out(pm, ids)
    pm.save_pretrained(tmp_path / "p")
    handle = load_delta(mine, tmp_path / "p")
    assert handle.config.rslora == (family == "llama") and handle.config.r == 4
    assert len(handle.targets) == sum(1 for n, _ in pm.named_modules() if n.endswith("lora_A"))
    _close(_out(mine, ids), want)
    handle.save(tmp_path / "again", format="peft")     # and out again: PEFT reads back the same adapter
    again = peft.PeftModel.from_pretrained(copy.deepcopy(_base(family)), tmp_path / "again").eval()
    _close(_out(again, ids), want)


def _native_and_hf(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    hf = _base(family)
    return load_backbone(copy.deepcopy(hf))[0].eval(), hf


@pytest.mark.parametrize("family, targets", [("bert", ["q_proj", "v_proj", "fc2"]), ("gpt2", ["q_proj", "v_proj"]),
                                             ("gpt2", ["q_proj", "k_proj", "v_proj", "fc1"]), ("t5", ["q_proj", "o_proj"])])
def test_native_delta_to_peft_and_back(family: str, targets: list[str], tmp_path: Path, ids):
    native, hf = _native_and_hf(family)
    hf_copy = copy.deepcopy(hf)
    handle = attach(native, "lora", targets=targets, r=2, alpha=5)
    perturb(handle.parameters())
    want = _out(native, ids)
    handle.save(tmp_path / "a", format="peft")
    _close(_out(peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval(), ids), want)
    back, _ = _native_and_hf(family)                   # PEFT folder -> a fresh native backbone
    loaded = load_delta(back, tmp_path / "a")
    assert sorted(loaded.targets) == sorted(handle.targets) and loaded.config.r == 2   # fused q/k/v split back exactly
    _close(_out(back, ids), want)
    if family == "gpt2" and "fc1" in targets:          # c_attn rank 3r beside c_fc rank r: not one LoRA config
        with pytest.raises(CheckpointError, match=r"different ranks \[2, 6\]"):
            load_delta(hf_copy, tmp_path / "a")
        return
    load_delta(hf_copy, tmp_path / "a")                # and onto the transformers model with our LoRA
    _close(_out(hf_copy, ids), want)


def test_peft_fused_gpt2_lora_onto_native(tmp_path: Path, ids):
    native, hf = _native_and_hf("gpt2")
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=3, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    want = _out(pm.eval(), ids)
    pm.save_pretrained(tmp_path / "p")
    handle = load_delta(native, tmp_path / "p")        # a full (not block-diagonal) c_attn LoRA: A shared by q/k/v
    assert len(handle.targets) == 6
    _close(_out(native, ids), want)


def test_minilm_shaped_native_bert_to_peft_bert_for_masked_lm(tmp_path: Path, ids):
    model = native_bert()                               # native BERT with an MLM head: PEFT keys under "bert."
    handle = attach(model, "lora")
    perturb(handle.parameters())
    handle.save(tmp_path / "a", format="peft")
    keys = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    assert keys[0].startswith("bert.encoder.layer.0.attention.self.")
    hf = peft.PeftModel.from_pretrained(hf_bert(), tmp_path / "a").eval()   # native_bert() = hf_bert()'s weights
    with torch.no_grad():
        _close(hf(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("field, value, words", [
    ("use_dora", True, "use_dora=True has no promptdelta counterpart"),
    ("modules_to_save", ["pooler"], "modules_to_save"),
    ("bias", "all", "bias='all'"),
    ("peft_type", "PROMPT_TUNING", "import_prompt_tuning"),
    ("peft_type", "LOHA", "'LOHA'"),
    ("lora_alpha", float("nan"), "lora_alpha=nan"),
    ("r", "4", "r='4'"),
    ("alpha_pattern", {"query": "x"}, "alpha_pattern="),
    ("alpha_pattern", [1], "alpha_pattern="),
])
def test_unsupported_peft_options_are_one_line_errors(field, value, words, tmp_path: Path):
    base = _base("bert")
    handle = attach(copy.deepcopy(base), "lora")
    handle.save(tmp_path / "a", format="peft")
    path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=words) as err:
        load_delta(base, tmp_path / "a")
    assert "\n" not in str(err.value) and deltas_of(base) == {}


def test_peft_folder_for_another_model_is_refused(tmp_path: Path):
    attach(_base("llama"), "lora").save(tmp_path / "a", format="peft")
    model = _base("bert")
    with pytest.raises(CheckpointError, match="does not have"):
        load_delta(model, tmp_path / "a")
    assert deltas_of(model) == {}


def test_only_lora_and_prefix_have_a_peft_format(tmp_path: Path):
    handle = attach(_base("bert"), "adapter")
    with pytest.raises(DeltaError, match="'lora', 'ia3' and 'prefix' only"):
        handle.save(tmp_path / "a", format="peft")
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------------------- prompt tuning
def _soft_template_on_gpt2(num_tokens: int = 3):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "prompts"))
    from prompt_helpers import gpt2_tokenizer

    from promptdelta.prompts import SoftTemplate

    hf = _base("gpt2")
    native = load_backbone(copy.deepcopy(hf))[0].eval()
    template = SoftTemplate(tokenizer=gpt2_tokenizer(), backbone=native, num_tokens=num_tokens, init="random")
    with torch.no_grad():
        template.soft_embeds.normal_(0, 0.5)
    return template, native, hf


def test_prompt_tuning_export_matches_peft_on_gpt2(tmp_path: Path, ids):
    from promptdelta.deltas import export_prompt_tuning

    template, native, hf = _soft_template_on_gpt2()
    export_prompt_tuning(template, tmp_path / "pt")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "pt").eval()
    rows = template.soft_embeds[:3].detach()
    assert torch.equal(pm.prompt_encoder["default"].embedding.weight, rows)
    with torch.no_grad():                       # PEFT: the prompt before the input; ours on the native backbone
        theirs = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -ids.shape[1]:]
        embeds = torch.cat([rows.expand(ids.shape[0], -1, -1), native.input_embeddings()(ids)], dim=1)
        ours = native(inputs_embeds=embeds).logits[:, -ids.shape[1]:]
    _close(ours, theirs)


def test_prompt_tuning_import_from_peft(tmp_path: Path):
    from promptdelta.deltas import import_prompt_tuning

    pm = peft.get_peft_model(_base("gpt2"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_()
    pm.save_pretrained(tmp_path / "pt")
    template, _, _ = _soft_template_on_gpt2()
    import_prompt_tuning(template, tmp_path / "pt")
    assert torch.equal(template.soft_embeds[:3], pm.prompt_encoder["default"].embedding.weight)
    wrong, _, _ = _soft_template_on_gpt2(num_tokens=5)
    with pytest.raises(CheckpointError, match="num_tokens=3"):
        import_prompt_tuning(wrong, tmp_path / "pt")
    with pytest.raises(CheckpointError, match=r"a soft prompt, not a delta.*import_prompt_tuning"):
        load_delta(_base("gpt2"), tmp_path / "pt")   # a prompt is not a delta on the model: named error


# ----------------------------------------------------------------------------------------- prefix tuning
def _shifted(model, ids: torch.Tensor, P: int) -> torch.Tensor:
    """Native logits with positions numbered from P, as transformers numbers them after PEFT's prefix cache."""
    pos = torch.arange(P, P + ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos).logits


def test_prefix_to_peft_and_back_on_gpt2(tmp_path: Path, ids, caplog):
    native, hf = _native_and_hf("gpt2")
    handle = attach(native, "prefix", num_tokens=2, reparam=True, reparam_hidden=8)   # the MLP is folded on save
    perturb(handle.parameters())
    want = _shifted(native, ids, 2)
    handle.save(tmp_path / "p", format="peft")
    assert "position_ids" in caplog.text
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "p").eval()
    _close(_out(pm, ids), want)
    back, _ = _native_and_hf("gpt2")
    loaded = load_delta(back, tmp_path / "p")
    assert loaded.method == "prefix"
    _close(_shifted(back, ids, 2), want)


def test_peft_prefix_onto_native_gpt2(tmp_path: Path, ids):
    native, hf = _native_and_hf("gpt2")
    pm = peft.get_peft_model(hf, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_()
    want = _out(pm, ids)
    pm.save_pretrained(tmp_path / "p")
    load_delta(native, tmp_path / "p")
    _close(_shifted(native, ids, 3), want)
    assert (_out(native, ids) - want).abs().max() > 1e-3   # positions from 0: not PEFT's numbering


def test_peft_prefix_with_projection_is_refused(tmp_path: Path):
    pm = peft.get_peft_model(_base("gpt2"), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2,
                                                                     prefix_projection=True, encoder_hidden_size=8))
    pm.save_pretrained(tmp_path / "p")
    native, _ = _native_and_hf("gpt2")
    with pytest.raises(CheckpointError, match="prefix_projection=True"):
        load_delta(native, tmp_path / "p")
    assert deltas_of(native) == {}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prefix_on_transformers_model_is_exact_both_ways(family: str, tmp_path: Path, ids, caplog):
    hf = _base(family)
    theirs_base, back = copy.deepcopy(hf), copy.deepcopy(hf)
    handle = attach(hf, "prefix", num_tokens=2, reparam=False)   # the model's own KV cache: same positions as PEFT
    perturb(handle.parameters())
    want = _out(hf, ids)
    handle.save(tmp_path / "p", format="peft")
    assert "position_ids" not in caplog.text
    _close(_out(peft.PeftModel.from_pretrained(theirs_base, tmp_path / "p").eval(), ids), want)
    load_delta(back, tmp_path / "p")
    _close(_out(back, ids), want)


def test_peft_lora_on_some_layers_only(tmp_path: Path, ids):
    base = _base("llama")
    mine = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"],
                                                   layers_to_transform=[1], exclude_modules=["o_proj"])).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path / "p")
    handle = load_delta(mine, tmp_path / "p")
    assert handle.targets == ["model.layers.1.self_attn.q_proj"]
    _close(_out(mine, ids), _out(pm, ids))
