"""Ladder side tuning: no autograd through the backbone, parity of the side network with the backbone at
reduction 1, the pruning rule, training memory, save/load, and bad inputs. The invariants (fresh ladder,
what trains, detach, merge refused, checkpoints, disabled) on every family are in test_families.py."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from delta_helpers import FAMILIES, hf_bert, native_bert, perturb

from promptdelta.backbones import load_backbone
from promptdelta.deltas import attach, load_delta, measure_training_memory
from promptdelta.errors import BackboneError, ConfigError, DeltaError

native_gpt2 = FAMILIES["gpt2"].build
BUILDERS = {"hf_bert": hf_bert, "native_bert": native_bert, "native_roberta": FAMILIES["roberta"].build,
            "native_gpt2": native_gpt2}


@pytest.fixture(params=list(BUILDERS))
def build(request):
    return BUILDERS[request.param]


def out(model, ids, **kw):
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return model(input_ids=ids, attention_mask=mask, **kw).logits   # (B, T, V)


def trained(build, seed=0, **cfg):
    model = build(seed)
    handle = attach(model, "ladder", **cfg)
    perturb(handle.parameters())
    return model, handle


def side_of(handle):
    return handle._method.wrapper.side


# ----------------------------------------------------------------------------------------- checkpoint
def test_save_load_round_trip(build, ids, tmp_path):
    model, handle = trained(build, reduction=4)
    expected = out(model, ids)
    handle.save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert meta["method"] == "ladder" and meta["config"]["reduction"] == 4
    fresh = build()
    loaded = load_delta(fresh, tmp_path / "d")
    assert torch.equal(out(fresh, ids), expected)
    assert loaded.state_dict().keys() == handle.state_dict().keys()
    assert all(k.startswith("ladder.") for k in loaded.state_dict())


# ----------------------------------------------------------------------------------------- no autograd in the backbone
def test_backbone_receives_no_gradient_and_builds_no_graph(build, ids):
    model, handle = trained(build)
    own = {id(p) for p in handle.parameters()}
    for p in model.parameters():
        p.requires_grad_(True)      # even unfrozen, the backbone must not enter the graph
    seen = []

    def check(module, args, output):
        h = output if isinstance(output, torch.Tensor) else output[0]
        seen.append((torch.is_grad_enabled(), h.requires_grad))

    hooks = [b.site.module.register_forward_hook(check) for b in handle._method.arch.blocks]
    embeds = model.get_input_embeddings()(ids) if hasattr(model, "get_input_embeddings") else \
        model.input_embeddings()(ids)
    model(inputs_embeds=embeds.detach().requires_grad_(), attention_mask=torch.ones_like(ids)).logits.sum().backward()
    for h in hooks:
        h.remove()
    assert seen and all(s == (False, False) for s in seen)
    head = ("word_embeddings", "lm_head", "cls.", "final_norm", "pooler")     # the heads read the side output
    body = [n for n, p in model.named_parameters() if id(p) not in own and not any(h in n for h in head)]
    assert body and all(dict(model.named_parameters())[n].grad is None for n in body)
    assert all(p.grad is not None for p in handle.parameters())
    assert torch.is_grad_enabled()


def test_grad_mode_is_restored_after_an_error_and_under_no_grad(ids):
    model = native_bert()
    attach(model, "ladder")
    with pytest.raises(BackboneError):
        model(input_ids=ids + 1000)      # fails inside the backbone, after the ladder turned autograd off
    assert torch.is_grad_enabled()
    with torch.no_grad():
        model(input_ids=ids)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


def test_prompt_model_head_reads_the_side_network(tiny_bert_nohead_dir):
    from promptdelta.data.examples import InputExample
    from promptdelta.prompts import ManualTemplate, ManualVerbalizer, PromptForClassification

    model, tok = load_backbone(tiny_bert_nohead_dir)
    handle = attach(model, "ladder", reduction=4)
    clf = PromptForClassification(model, ManualTemplate('{"placeholder":"text_a"} It was {"mask"}.', tok),
                                  ManualVerbalizer(tok, ["neg", "pos"], [["bad"], ["great"]]), max_length=16)
    batch = clf.collate([InputExample("a great film", label=1), InputExample("dull", label=0)])
    opt = torch.optim.Adam(handle.parameters(), lr=3e-2)
    losses = []
    for _ in range(20):
        loss, _ = clf.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("layers.0."))


# ----------------------------------------------------------------------------------------- side network
@pytest.mark.parametrize("name", ["native_bert", "hf_bert", "native_gpt2"])
def test_unpruned_side_network_reproduces_the_backbone(name, ids):
    """reduction=1 keeps every dim, so with closed gates (mu = 0) the side blocks are the backbone's blocks."""
    model = BUILDERS[name]()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    handle = attach(model, "ladder", reduction=1, gate_init=-1e4)
    side = side_of(handle)
    states = []
    hooks = [m.register_forward_hook(lambda mod, a, o: states.append(o if isinstance(o, torch.Tensor) else o[0]))
             for m in [b.site.module for b in handle._method.arch.blocks]]
    first = handle._method.arch.blocks[0].site.module.register_forward_pre_hook(lambda mod, a: states.append(a[0]))
    model(input_ids=ids, attention_mask=mask)
    for h in hooks + [first]:
        h.remove()
    assert len(states) == 3                                    # h_0 (input of block 0), h_1, h_2
    keep = mask.bool()                                         # padded positions are not outputs (native: zeros)
    torch.testing.assert_close(side.states(states, mask)[keep], states[-1][keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fam", ["t5", "t5v11"])
def test_unpruned_t5_side_encoder_and_decoder_reproduce_the_backbone(fam, ids):
    """T5 at reduction 1 with closed gates: the side encoder is the encoder (final norm included), and the side
    decoder, cross-attending to it, is the decoder: unscaled attention, relative position bias, RMSNorm, gate."""
    model = FAMILIES[fam].build()
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    handle = attach(model, "ladder", reduction=1, gate_init=-1e4)
    side, stacks = side_of(handle), handle._method.arch.stacks
    states = {k: [] for k in stacks}
    hooks = []
    for k, blocks in stacks.items():
        hooks.append(blocks[0].site.module.register_forward_pre_hook(lambda mod, a, k=k: states[k].append(a[0])))
        hooks += [b.site.module.register_forward_hook(lambda mod, a, o, k=k: states[k].append(o[0])) for b in blocks]
    dec = ids[:, :4]
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        pos = {k: getattr(model, k).layers[0].attn.position_bias(len(v[0][0]), len(v[0][0])) for k, v in states.items()}
        memory = side.encoder.states(states["encoder"], mask, pos["encoder"])
        torch.testing.assert_close(memory, out.encoder_last_hidden_state, atol=1e-5, rtol=1e-5)
        s = side.decoder.states(states["decoder"], None, pos["decoder"], memory, mask)
    torch.testing.assert_close(s, states["decoder"][-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fam", ["t5", "t5v11"])
def test_t5_backbone_receives_no_gradient(fam, ids):
    model = FAMILIES[fam].build()
    handle = attach(model, "ladder")
    perturb(handle.parameters())
    seen = []
    hooks = [b.site.module.register_forward_hook(lambda m, a, o: seen.append((torch.is_grad_enabled(),
                                                                              o[0].requires_grad)))
             for b in handle._method.arch.blocks]
    model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits.square().mean().backward()
    for h in hooks:
        h.remove()
    assert len(seen) == 2 + len(model.decoder.layers) and all(s == (False, False) for s in seen)
    own = {id(p) for p in handle.parameters()}
    body = [n for n, p in model.named_parameters() if id(p) not in own and "layers" in n]
    assert body and all(dict(model.named_parameters())[n].grad is None for n in body)
    assert all(p.grad is not None for p in handle.parameters())
    assert any(k.startswith("ladder.encoder.blocks.0.attn") for k in handle.state_dict())


def test_pruning_keeps_the_largest_norms_and_slices_backbone_weights():
    model = native_bert()
    handle = attach(model, "ladder", reduction=2)
    side, layers = side_of(handle), [b.site.module for b in handle._method.arch.blocks]
    hid = side.down[0].weight.argmax(1)                        # kept residual dims (down = selection)
    assert torch.equal(side.down[0].weight, torch.eye(32)[hid]) and hid.tolist() == sorted(hid.tolist())
    score = sum((l.attn.q_proj.weight.square().sum(0) + l.attn.k_proj.weight.square().sum(0)
                 + l.attn.v_proj.weight.square().sum(0) + l.mlp.fc1.weight.square().sum(0)
                 + l.attn.o_proj.weight.square().sum(1) + l.mlp.fc2.weight.square().sum(1)) for l in layers)
    dropped = torch.ones(32, dtype=torch.bool)
    dropped[hid] = False
    assert score[hid].min() >= score[dropped].max()
    blk, l0 = side.blocks[0], layers[0]
    fc1, fc2 = l0.mlp.fc1.weight, l0.mlp.fc2.weight
    units = torch.topk(fc1.square().sum(1) + fc2.square().sum(0), 37 // 2).indices.sort().values
    torch.testing.assert_close(blk.mlp.fc1.weight, fc1[units][:, hid], rtol=0, atol=0)
    torch.testing.assert_close(blk.attn_norm.weight, l0.attn_norm.weight[hid], rtol=0, atol=0)
    assert (blk.attn.heads, blk.attn.head_dim) == (4, 4) and blk.attn.q_proj.weight.shape == (16, 16)
    wq = l0.attn.q_proj.weight
    q_rows = torch.tensor([(wq[:, hid] - r).abs().sum(1).argmin().item() for r in blk.attn.q_proj.weight])
    torch.testing.assert_close(blk.attn.q_proj.weight, wq[q_rows][:, hid], rtol=0, atol=0)
    assert torch.equal(q_rows // 8, torch.arange(16) // 4)     # 4 dims from each of the 4 heads, in order
    qk = (wq.square().sum(1) + l0.attn.k_proj.weight.square().sum(1)).view(4, 8)
    for head in range(4):
        kept = q_rows[4 * head: 4 * head + 4] % 8
        assert torch.equal(kept, torch.topk(qk[head], 4).indices.sort().values)


def test_ladder_on_a_subset_of_blocks(ids):
    model = native_bert(layers=3)
    before = out(model, ids)
    handle = attach(model, "ladder", targets=["layers.1", "layers.2"])
    assert handle.targets == ["layers.1", "layers.2"] and len(side_of(handle).blocks) == 2
    assert torch.equal(out(model, ids), before)
    perturb(handle.parameters())
    assert not torch.allclose(out(model, ids), before)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_training_memory_is_under_35_percent_of_full_fine_tuning(family):
    from promptdelta.backbones import T5Config, T5Model

    x = torch.randint(1, 1000, (8, 32), generator=torch.Generator().manual_seed(0))
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=512, max_position_embeddings=64)
        make, run = lambda: load_backbone(transformers.BertForMaskedLM(cfg))[0], lambda m: m(input_ids=x)
    else:
        cfg = T5Config(vocab_size=1000, d_model=128, d_kv=32, d_ff=512, num_layers=4, num_heads=4)
        make, run = lambda: T5Model(cfg), lambda m: m(input_ids=x, decoder_input_ids=x[:, :8])

    def measure(method):
        torch.manual_seed(0)
        model = make().train()
        if method:
            attach(model, method)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        return measure_training_memory(model, lambda: run(model).logits.logsumexp(-1).mean())

    full, ladder = measure(None), measure("ladder")
    assert full.gradients == full.parameters and full.optimizer_state >= 2 * full.parameters
    assert ladder.activations < 0.5 * full.activations and ladder.gradients < 0.05 * full.gradients
    assert ladder.total <= 0.35 * full.total


# ----------------------------------------------------------------------------------------- bad inputs
def test_t5_options_that_do_not_apply_are_refused():
    with pytest.raises(DeltaError, match="leave causal=None"):
        attach(FAMILIES["t5"].build(), "ladder", causal=True)
    with pytest.raises(DeltaError, match="include encoder blocks too"):
        attach(FAMILIES["t5"].build(), "ladder", targets=["decoder.layers.1"])
    model = FAMILIES["t5"].build()
    attach(model, "ladder")
    ids = torch.randint(3, 99, (2, 5))
    enc = model.encode(input_ids=ids).last_hidden_state
    with pytest.raises(DeltaError, match="not encoder_outputs"):
        model(encoder_outputs=enc, decoder_input_ids=ids[:, :2])
    assert torch.is_grad_enabled()


def test_unsupported_transformers_model_names_the_fix():
    hf = transformers.UMT5ForConditionalGeneration(transformers.UMT5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37,
                                                                           num_layers=1, num_heads=4))
    with pytest.raises(DeltaError, match="load_backbone"):   # no family, two stacks: no block layout to copy
        attach(hf, "ladder")


def test_targets_must_be_blocks_including_the_last():
    with pytest.raises(DeltaError, match="must name transformer blocks") as err:
        attach(native_bert(), "ladder", targets=["q_proj"])
    assert "layers.1" in str(err.value)
    with pytest.raises(DeltaError, match="include the last block 'layers.1'"):
        attach(native_bert(), "ladder", targets=["layers.0"])


def test_cached_decoding_and_inner_calls_are_refused(ids):
    model = native_gpt2()
    attach(model, "ladder")
    past = model(input_ids=ids, use_cache=True).past_key_values
    with pytest.raises(DeltaError, match="use_cache=False"):
        model(input_ids=ids[:, :1], past_key_values=past)
    hf = hf_bert()
    attach(hf, "ladder")
    with pytest.raises(DeltaError, match="call the model passed to attach"):
        hf.bert(input_ids=ids)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("bad", [dict(reduction=0), dict(reduction=2.5), dict(gate_temperature=0), dict(dropout=1.0),
                                 dict(init="magnitude"), dict(causal="yes"), dict(gate_init="0")])
def test_bad_config_values_name_the_fix(bad):
    with pytest.raises(ConfigError) as err:
        attach(native_bert(), "ladder", **bad)
    key = next(iter(bad))
    assert key in str(err.value) and ("use" in str(err.value) or "must be" in str(err.value))


def test_measure_training_memory_needs_trainable_parameters():
    model = native_bert()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(DeltaError, match="attach a delta"):
        measure_training_memory(model, lambda: model(input_ids=torch.ones(1, 3, dtype=torch.long)).logits.sum())


def test_wrapped_last_block_still_exposes_its_modules():
    model = native_bert()
    attach(model, "ladder")
    assert model.layers[1].attn is model.layers[1].base.attn
