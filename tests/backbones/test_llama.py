"""Native Llama family (Llama, Qwen2, Mistral) against transformers on tiny random configs (fp32, <= 1e-5):
padded-batch logits, greedy generation with a KV cache, to_hf round trips, loading from a folder or a live
model; the deltas and prompt models on it."""

from __future__ import annotations

import pytest
import torch
import transformers

from promptdelta.backbones.llama import LlamaConfig, LlamaModel, llama_from_hf, rope_inv_freq
from promptdelta.backbones.loading import load_backbone
from promptdelta.errors import BackboneError, ConfigError

TOL = dict(atol=1e-5, rtol=0)
V = 99
_BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
_LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CONFIGS = {  # id -> (transformers class, config kwargs)
    "llama": (transformers.LlamaForCausalLM, {}),
    "llama-tied-bias-mha": (transformers.LlamaForCausalLM, dict(num_key_value_heads=4, tie_word_embeddings=True,
                                                                attention_bias=True, mlp_bias=True)),
    "llama3-rope": (transformers.LlamaForCausalLM, dict(rope_parameters=_LLAMA3)),
    "linear-rope": (transformers.LlamaForCausalLM, dict(rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                         "rope_theta": 10000.0})),
    "qwen2": (transformers.Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "mistral": (transformers.MistralForCausalLM, dict(sliding_window=3)),
    "mistral-wide-heads": (transformers.MistralForCausalLM, dict(sliding_window=None, head_dim=16)),  # 4 x 16 != 32
}


def _hf_config(name: str):
    cls, kw = CONFIGS[name]
    config_cls = {transformers.LlamaForCausalLM: transformers.LlamaConfig,
                  transformers.Qwen2ForCausalLM: transformers.Qwen2Config,
                  transformers.MistralForCausalLM: transformers.MistralConfig}[cls]
    return config_cls(**{**_BASE, **kw})


def _hf(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls, _ = CONFIGS[name]
    model = cls._from_config(_hf_config(name), attn_implementation="sdpa").eval()
    with torch.no_grad():  # random biases / norm weights, so a dropped bias or norm shows
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(0, 0.5 if "norm" in n else 0.1).add_(1.0 if "norm" in n else 0.0)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf = _hf(request.param)
    return request.param, hf, LlamaModel.from_hf(hf).eval()


def _left_padded(lengths, total, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n:] = 1
        ids[row, : total - n] = 0
    return ids, mask


def _positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


# --------------------------------------------------------------------------------------------- parity
def test_contract_and_module_names(pair):
    name, _, model = pair
    assert (model.family, model.kind, model.has_lm_head) == ("llama", "clm", True)
    names = dict(model.named_modules())
    for n in ("embed_tokens", "layers.1.attn.q_proj", "layers.1.attn.k_proj", "layers.1.attn.v_proj",
              "layers.1.attn.o_proj", "layers.1.attn_norm", "layers.1.mlp_norm", "layers.1.mlp.gate",
              "layers.1.mlp.fc1", "layers.1.mlp.fc2", "final_norm", "lm_head"):
        assert n in names, n
    assert model.input_embeddings() is model.embed_tokens
    tied = model.lm_head.weight is model.embed_tokens.weight
    assert tied == (name == "llama-tied-bias-mha")
    assert (model.layers[0].attn.q_proj.bias is not None) == (name in ("qwen2", "llama-tied-bias-mha"))
    assert (model.layers[0].attn.o_proj.bias is not None) == (name == "llama-tied-bias-mha")


@torch.no_grad()
def test_padded_batch_logits_and_hidden_states_match_hf(pair):
    name, hf, model = pair
    ids, mask = _left_padded([9, 5, 2], total=9)   # window 3 < 9 tokens: the sliding window really cuts
    ref = hf(ids, attention_mask=mask, position_ids=_positions(mask), output_hidden_states=True)
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(mine[real], theirs[real], **TOL)
    torch.testing.assert_close(out.logits[real], ref.logits[real], **TOL)
    assert torch.isfinite(out.logits).all()   # padding queries that see no key stay finite


@torch.no_grad()
def test_unpadded_rows_match_hf_single_runs(pair):
    name, hf, model = pair
    ids, mask = _left_padded([8, 4], total=8, seed=2)
    out = model(ids, attention_mask=mask).logits
    row = hf(ids[1:, 4:]).logits   # the padded row alone, unpadded (its own positions from 0)
    # Sliding windows count cache positions, pads included (as transformers does), so for windowed models a
    # left-padded row equals its unpadded run only where the window does not reach back into the padding.
    torch.testing.assert_close(out[1:, 4:], row, **TOL)


@torch.no_grad()
def test_sliding_window_changes_what_is_seen():
    hf = _hf("mistral")
    model = LlamaModel.from_hf(hf).eval()
    full = LlamaModel.from_hf(hf).eval()
    full.config.sliding_window = 1000        # the same weights with a window wider than the input
    ids = torch.randint(3, V, (1, 8), generator=torch.Generator().manual_seed(3))
    a, b = model(ids).logits, full(ids).logits
    torch.testing.assert_close(a[:, :3], b[:, :3], **TOL)   # the first 3 tokens are inside the window
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-4


@torch.no_grad()
def test_kv_cache_incremental_equals_full_forward(pair):
    _, _, model = pair
    ids, mask = _left_padded([10, 6], total=10, seed=3)
    full = model(ids, attention_mask=mask).logits
    out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
    steps = [out.logits]
    for t in range(6, 10):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values,
                    use_cache=True)
        steps.append(out.logits)
    c = model.config
    assert out.past_key_values[0][0].shape == (2, c.num_kv_heads, 10, c.head_dim)   # GQA: k/v heads cached
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], **TOL)


@torch.no_grad()
def test_greedy_generate_equals_hf_batched_left_padded(pair):
    _, hf, model = pair
    ids, mask = _left_padded([7, 3, 5], total=7, seed=4)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], pad_token_id=0)
    eos = int(free[0, 7 + 2])   # a token row 0 really produces at step 3: row 0 must stop there
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                      pad_token_id=0)
    mine = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(mine, ref)
    ref_free = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    assert torch.equal(free, ref_free) and free.shape == (3, 17)


@torch.no_grad()
def test_to_hf_round_trip_is_exact(pair):
    _, hf, model = pair
    back = model.to_hf().eval()
    assert type(back) is type(hf)
    assert set(back.state_dict()) == set(hf.state_dict())
    for key, value in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    ids = torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=0, rtol=0)
    again = LlamaModel.from_hf(back)
    assert again.config == model.config


@torch.no_grad()
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "llama-tied-bias-mha"])
def test_load_backbone_from_saved_folder_and_live_model(name, tmp_path):
    hf = _hf(name, seed=5)
    hf.save_pretrained(tmp_path)
    from_folder, tok = load_backbone(tmp_path)
    live, _ = load_backbone(hf)
    assert tok is None and isinstance(from_folder, LlamaModel) and from_folder.config.model_type == hf.config.model_type
    ids = torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(6))
    ref = hf(ids).logits
    torch.testing.assert_close(from_folder(ids).logits, ref, **TOL)
    torch.testing.assert_close(live(ids).logits, ref, **TOL)


def test_body_only_checkpoint_has_no_head_and_exports_the_bare_model():
    torch.manual_seed(0)
    body = transformers.LlamaModel(_hf_config("llama")).eval()
    model = LlamaModel.from_hf(body)
    assert not model.has_lm_head and model(torch.tensor([[3, 4]])).logits is None
    assert type(model.to_hf()) is transformers.LlamaModel
    with pytest.raises(BackboneError, match="no LM head"):
        model.generate(torch.tensor([[3, 4]]))


def test_rope_variants():
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    plain = rope_inv_freq(8, rope)
    torch.testing.assert_close(rope_inv_freq(8, {**rope, "rope_type": "linear", "factor": 4.0}), plain / 4)
    # wavelengths 2 pi / inv_freq: 6.3, 167 (< 8192 / 4: kept), 4443 (blended), 118000 (> 8192: / factor)
    scaled = rope_inv_freq(8, {**_LLAMA3, "original_max_position_embeddings": 8192})
    base = rope_inv_freq(8, {"rope_type": "default", "rope_theta": 500000.0})
    assert torch.equal(scaled[:2], base[:2]) and torch.isclose(scaled[3], base[3] / 8)
    assert base[2] / 8 < scaled[2] < base[2]


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        LlamaConfig(hidden_size=32, num_heads=4, num_kv_heads=3, num_layers=1, intermediate_size=8, vocab_size=9)
    with pytest.raises(ConfigError, match="sliding_window"):
        LlamaConfig(hidden_size=32, num_heads=4, num_layers=1, intermediate_size=8, vocab_size=9,
                    layer_types=("sliding_attention",))
    with pytest.raises(ConfigError, match="low_freq_factor"):
        LlamaConfig(hidden_size=32, num_heads=4, num_layers=1, intermediate_size=8, vocab_size=9,
                    rope={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0})
    hf = _hf_config("llama")
    hf.rope_parameters = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(BackboneError, match="rope_type"):
        LlamaConfig.from_hf(hf)


@torch.no_grad()
def test_bad_inputs_raise_backbone_errors(pair):
    _, _, model = pair
    with pytest.raises(BackboneError, match="vocabulary"):
        model(torch.tensor([[V]]))
    with pytest.raises(BackboneError, match="attention_mask"):
        model(torch.tensor([[3, 4]]), attention_mask=torch.ones(1, 3))
    with pytest.raises(BackboneError, match="prefix_kv"):
        model(torch.tensor([[3, 4]]), prefix_kv=[(torch.zeros(1, 3, 2, 8), torch.zeros(1, 3, 2, 8))] * 2)


@torch.no_grad()
def test_prefix_kv_with_kv_heads_equals_prepending_tokens():
    model = LlamaModel.from_hf(_hf("llama")).eval()
    g = torch.Generator().manual_seed(7)
    extra, ids = torch.randint(3, V, (2, 4), generator=g), torch.randint(3, V, (2, 6), generator=g)
    full = model(torch.cat([extra, ids], dim=1)).logits[:, 4:]
    prefix = model(extra, use_cache=True).past_key_values   # (B, n_kv_heads, 4, hd) per layer
    pos = torch.arange(4, 10).expand(2, 6)
    torch.testing.assert_close(model(ids, prefix_kv=prefix, position_ids=pos).logits, full, **TOL)
    # the same prefix repeated per query head gives the same result
    rep = [(k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)) for k, v in prefix]
    torch.testing.assert_close(model(ids, prefix_kv=rep, position_ids=pos).logits, full, **TOL)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = LlamaModel.from_hf(_hf("qwen2")).train()
    ids, mask = _left_padded([6, 4], total=6, seed=8)

    def grads():
        model.zero_grad()
        model(ids, attention_mask=mask).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-6, rtol=1e-5)


def test_registered_family():
    from promptdelta.backbones.registry import family_of, get_family

    fam = get_family("qwen2")
    assert fam.name == "llama" and set(fam.model_types) == {"llama", "qwen2", "mistral"}
    model = llama_from_hf(_hf_config("mistral"), _hf("mistral").state_dict())
    assert family_of(model) is fam
    spec = fam.block_spec(model.config)
    assert (spec.pre_norm, spec.norm, spec.gated, spec.positions, spec.activation) == (True, "rmsnorm", True,
                                                                                        "rotary", "silu")
    (stack,) = fam.attention_stacks(model)
    assert stack.heads == 2 and stack.modules == ("layers.0.attn", "layers.1.attn")
    assert fam.layer_stacks(model)[0] is model.layers
    assert fam.key_table(model.config).to_native("model.layers.1.mlp.up_proj.weight") == "layers.1.mlp.fc1.weight"


# --------------------------------------------------------------------------------------------- deltas on it
DELTAS = [("lora", {}), ("lora", {"r": 4, "targets": "all-linear"}), ("adapter", {"placement": "houlsby"}),
          ("adapter", {"placement": "pfeiffer"}), ("adapter", {"placement": "parallel"}), ("bitfit", {}),
          ("prefix", {}), ("ladder", {}), ("intrinsic", {})]
DELTA_IDS = ["lora", "lora-all-linear", "adapter-houlsby", "adapter-pfeiffer", "adapter-parallel", "bitfit",
             "prefix", "ladder", "intrinsic"]


def _native(name: str = "llama") -> LlamaModel:
    return LlamaModel.from_hf(_hf(name)).eval()


def _out(model, grad: bool = False) -> torch.Tensor:
    ids, mask = _left_padded([7, 4], total=7, seed=11)
    with torch.set_grad_enabled(grad):
        return model(ids, attention_mask=mask).logits[mask.bool()]   # (real tokens, V)


@pytest.mark.parametrize("method, cfg", DELTAS, ids=DELTA_IDS)
def test_delta_invariants_on_native_llama(method, cfg):
    from promptdelta.deltas import attach, deltas_of

    model = _native()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = _out(model)
    handle = attach(model, method, **cfg)
    assert handle.targets and handle.num_parameters() > 0
    if method == "prefix":   # attending to extra keys moves the softmax; disabled gives the base back
        with handle.disabled():
            assert torch.equal(_out(model), base)
    elif method == "lora":   # B = 0; only the fused kernel's rounding may differ
        torch.testing.assert_close(_out(model), base, rtol=1e-5, atol=1e-6)
    else:                    # zero-initialised: exactly the base model
        assert torch.equal(_out(model), base)
    delta = {id(p) for p in handle.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == delta
    with torch.no_grad():    # non-trivial delta parameters
        for p in handle.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    _out(model, grad=True).square().mean().backward()
    assert all(p.grad is None for p in model.parameters() if id(p) not in delta)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in handle.parameters())
    assert not torch.allclose(_out(model), base)
    handle.detach()
    assert deltas_of(model) == {} and all(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(_out(model), base)


def test_bitfit_adds_zero_biases_to_the_bias_free_llama():
    from promptdelta.deltas import attach

    model = _native()
    assert model.layers[0].attn.q_proj.bias is None
    handle = attach(model, "bitfit")
    names = " ".join(handle.targets)
    assert "q_proj" in names and "mlp.fc2" in names   # attention and FFN linears got biases


def test_lora_uses_the_fused_kernel_and_saves_and_loads(tmp_path):
    from promptdelta.deltas import attach, load_delta

    model = _native()
    handle = attach(model, "lora", r=4)
    assert handle.config.impl == "fused" and handle.targets == [f"layers.{i}.attn.{p}" for i in range(2)
                                                                  for p in ("q_proj", "v_proj")]
    with torch.no_grad():
        for p in handle.parameters():
            p.normal_(0, 0.05)
    expected = _out(model)
    handle.save(tmp_path / "d")
    fresh = _native()
    load_delta(fresh, tmp_path / "d")
    assert torch.equal(_out(fresh), expected)
    handle.merge()
    torch.testing.assert_close(_out(model), expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------- prompt models
CORPUS = ["the movie was great and good fun.", "a terrible and awful film.", "It was wonderful!",
          "It was horrible?", "I loved the plot, it was good", "I hated the acting, it was bad",
          "Question: was it good? Answer: yes it was great", "Answer: no"]


@pytest.fixture(scope="module")
def llama_tok():
    """A Llama-style tokenizer trained here: byte-level BPE, <s> prepended, </s> = EOS, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


@pytest.fixture(scope="module")
def llama_lm(llama_tok):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        **_BASE, "vocab_size": len(llama_tok), "pad_token_id": None})).eval()
    return hf, load_backbone(hf, tokenizer=llama_tok)[0]


def _clf(tok, backbone, words):
    from promptdelta.prompts import ManualTemplate, ManualVerbalizer, PromptForClassification

    template = ManualTemplate('{"placeholder":"text_a"} It was {"mask"}', tok)
    assert template.kind == "clm"
    return PromptForClassification(backbone, template, ManualVerbalizer(tok, ["neg", "pos"], words),
                                   max_length=48).eval()


@torch.no_grad()
def test_classification_single_token_words_read_the_last_real_token(llama_tok, llama_lm):
    from promptdelta.data.examples import InputExample

    hf, backbone = llama_lm
    clf = _clf(llama_tok, backbone, [["it"], ["good"]])   # one token each
    assert not clf.uses_sequence_scoring
    examples = [InputExample("the movie was great", label=1), InputExample("a terrible and awful film", label=0)]
    batch = clf.collate(examples)
    scores = clf(batch)                                            # (B, 2) label log-probabilities
    ids = [llama_tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("it", "good")]
    for i in range(len(examples)):
        n = int(batch["attention_mask"][i].sum())
        real = batch["input_ids"][i][batch["attention_mask"][i].bool()][None]
        want = hf(real).logits[0, -1, ids].log_softmax(-1)         # transformers on the unpadded prompt
        torch.testing.assert_close(scores[i], want, atol=1e-5, rtol=1e-5)
        assert n == real.shape[1]


@torch.no_grad()
def test_classification_multi_token_words_score_the_sequence_likelihood(llama_tok, llama_lm):
    from promptdelta.data.examples import InputExample

    hf, backbone = llama_lm
    words = [["terrible", "horrible"], ["wonderful", "good fun"]]
    clf = _clf(llama_tok, backbone, words)
    assert clf.uses_sequence_scoring and clf.verbalizer.token_mask.sum(-1).max() > 1
    examples = [InputExample("I loved the plot", label=1), InputExample("awful", label=0)]
    batch = clf.collate(examples)
    got = clf.label_word_scores(batch)                             # (B, C, W)
    for i in range(len(examples)):
        prompt = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        for c, ws in enumerate(words):
            for w, word in enumerate(ws):
                ids = llama_tok(" " + word, add_special_tokens=False)["input_ids"]
                lp = hf(torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
                want = sum(lp[len(prompt) - 1 + j, t] for j, t in enumerate(ids))
                torch.testing.assert_close(got[i, c, w], want, atol=1e-4, rtol=1e-4)


def test_generation_loss_matches_transformers_and_generate_matches_the_backbone(llama_tok, llama_lm):
    from promptdelta.backbones.generation import GenerationConfig
    from promptdelta.data.examples import InputExample
    from promptdelta.prompts import ManualTemplate, PromptForGeneration

    hf, backbone = llama_lm
    model = PromptForGeneration(backbone, ManualTemplate('Question: {"placeholder":"text_a"} Answer: {"mask"}',
                                                         llama_tok), max_length=40).eval()
    examples = [InputExample("was it good?", meta={"target": "yes it was great"}),
                InputExample("was the film terrible and awful?", meta={"target": "no"})]
    batch = model.collate(examples)
    with torch.no_grad():
        loss, logits = model.loss(batch)
        pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        want = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos,
                  labels=batch["labels"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], want.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, want.loss, atol=1e-5, rtol=1e-5)
    cfg = GenerationConfig(max_new_tokens=6, eos_token_id=llama_tok.eos_token_id)
    together = model.generate_ids(model.prompt_batch(examples), cfg)
    for i, ex in enumerate(examples):
        prompt = model.prompt_batch([ex])["input_ids"]
        alone = backbone.generate(prompt, max_new_tokens=6, eos_token_id=llama_tok.eos_token_id)[0, prompt.shape[1]:]
        ref = hf.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=llama_tok.eos_token_id,
                          pad_token_id=llama_tok.eos_token_id)[0, prompt.shape[1]:]
        assert alone.tolist() == ref.tolist()
        assert together[i, :len(alone)].tolist() == alone.tolist()


@torch.no_grad()
def test_bfloat16_keeps_the_rotary_frequencies_in_fp32():
    hf = _hf("llama3-rope")
    model, _ = load_backbone(hf, dtype="bf16")
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and model._inv_freq.dtype == torch.float32
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(12))
    ref = hf(ids).logits
    assert (model(ids).logits.float() - ref).abs().max() < 0.05 * ref.abs().max()   # bf16 rounding only


@torch.no_grad()
def test_sampling_equals_hf_from_the_same_seed():
    hf = _hf("qwen2")
    model = LlamaModel.from_hf(hf).eval()
    ids, mask = _left_padded([6, 2], total=6, seed=5)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, top_p=0.9, temperature=0.7,
              pad_token_id=0, eos_token_id=2)
    torch.manual_seed(3)
    ref = hf.generate(ids, **kw)
    torch.manual_seed(3)
    assert torch.equal(model.generate(ids, **kw), ref)


@torch.no_grad()
def test_several_eos_ids_survive_the_round_trip_and_all_end_a_row():
    hf = _hf("llama")
    hf.config.eos_token_id = [2, 3, 500]   # Llama 3 style; 500 is outside the vocabulary: dropped with a warning
    model = LlamaModel.from_hf(hf).eval()
    assert model.config.eos_token_id == (2, 3)
    assert model.to_hf().config.eos_token_id == [2, 3]
    ids, mask = _left_padded([5, 3], total=5, seed=13)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    eos = [int(free[0, 5 + 1]), int(free[1, 5 + 3])]   # tokens the rows really produce
    model.config.eos_token_id = tuple(eos)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)


def test_to_hf_refuses_a_layout_transformers_cannot_hold():
    config = LlamaConfig(model_type="mistral", vocab_size=9, hidden_size=32, intermediate_size=8, num_layers=1,
                         num_heads=4, qkv_bias=True)
    with pytest.raises(BackboneError, match="no transformers equivalent"):
        LlamaModel(config).to_hf()
