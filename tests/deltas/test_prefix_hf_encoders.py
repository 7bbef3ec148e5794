"""Prefix tuning on live transformers encoders (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, ERNIE) through their
own cache (prefix_hf.py). The reference is the native backbone's ``prefix_kv`` with the SAME keys/values, on
the same weights; plus the delta contract (only prefixes train, detach restores bit for bit, save/load, PEFT's
format checked against the real ``peft`` package), and the refusal of encoders without a cache."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers
from delta_helpers import perturb

from promptdelta.backbones import load_backbone
from promptdelta.backbones.bert import bert_from_hf
from promptdelta.backbones.roberta import roberta_from_hf
from promptdelta.deltas import attach, deltas_of, load_delta, prefix_kv
from promptdelta.errors import CheckpointError, DeltaError

P = 3
PAD = 1
SIZES = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=64, initializer_range=0.3)   # large weights: the prefix moves outputs


def _roberta_native(hf: torch.nn.Module) -> torch.nn.Module:
    """A native RoBERTa with hf's weights (CamemBERT / XLM-R share RoBERTa's layout; only model_type differs)."""
    config = transformers.RobertaConfig(**{k: v for k, v in hf.config.to_dict().items() if k != "model_type"})
    return roberta_from_hf(config, hf.state_dict())


def _bert_native(hf: torch.nn.Module) -> torch.nn.Module:
    return bert_from_hf(hf.config, hf.state_dict())


# family -> (transformers model class, its config, native converter)
ENCODERS: dict[str, tuple[Callable, Callable, Callable]] = {
    "bert": (transformers.BertModel, transformers.BertConfig, _bert_native),
    "roberta": (transformers.RobertaModel, lambda **k: transformers.RobertaConfig(pad_token_id=PAD, **k),
                _roberta_native),
    "xlm-roberta": (transformers.XLMRobertaModel, lambda **k: transformers.XLMRobertaConfig(pad_token_id=PAD, **k),
                    _roberta_native),
    "camembert": (transformers.CamembertModel, lambda **k: transformers.CamembertConfig(pad_token_id=PAD, **k),
                  _roberta_native),
    "electra": (transformers.ElectraModel, lambda **k: transformers.ElectraConfig(embedding_size=32, **k),
                _bert_native),
    "ernie": (transformers.ErnieModel, transformers.ErnieConfig, _bert_native),
}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    cls, config, _ = ENCODERS[family]
    torch.manual_seed(seed)
    return cls(config(**SIZES)).eval()


def batch(left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), (3, 7): row 0 full, rows 1 and 2 padded (right, or left when asked) with the pad id."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 99, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    if left:
        mask = mask.flip(1)
    ids[mask == 0] = PAD
    return ids, mask


def hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kw) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, **kw)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def close_at(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> None:
    """Equal at the real tokens (padded queries are garbage in both implementations)."""
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=2e-5)


# --------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("family", list(ENCODERS))
@pytest.mark.parametrize("reparam", [False, True])
def test_prefix_equals_the_same_keys_values_given_to_the_native_backbone(family, reparam):
    hf = build(family)
    native = ENCODERS[family][2](hf).eval()
    handle = attach(hf, "prefix", num_tokens=P, reparam=reparam, reparam_hidden=8)
    perturb(handle.parameters())
    for left in (False, True):
        ids, mask = batch(left)
        with torch.no_grad():
            got = hidden(hf, ids, mask)
            want = native(input_ids=ids, attention_mask=mask, prefix_kv=list(prefix_kv(handle))).last_hidden_state
            base = native(input_ids=ids, attention_mask=mask).last_hidden_state
        close_at(got, want, mask)
        assert (got - base)[mask.bool()].abs().max() > 1e-3   # the prefix does reach the outputs


@pytest.mark.parametrize("cls", [transformers.BertForMaskedLM, transformers.RobertaForMaskedLM])
def test_a_task_head_prefixes_its_encoder(cls):
    """A head's forward takes no cache but hands **kwargs to its encoder: the prefix goes through it."""
    config = (transformers.BertConfig if cls is transformers.BertForMaskedLM else transformers.RobertaConfig)(
        pad_token_id=PAD, **SIZES)
    torch.manual_seed(0)
    hf = cls(config).eval()
    native = load_backbone(copy.deepcopy(hf))[0].eval()
    handle = attach(hf, "prefix", num_tokens=P, reparam=False)
    perturb(handle.parameters())
    ids, mask = batch()
    with torch.no_grad():
        want = native(input_ids=ids, attention_mask=mask, prefix_kv=list(prefix_kv(handle))).logits
        close_at(hidden(hf, ids, mask), want, mask)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_both_attention_implementations(impl):
    hf = transformers.BertModel(transformers.BertConfig(attn_implementation=impl, **SIZES)).eval()
    native = _bert_native(hf).eval()
    handle = attach(hf, "prefix", num_tokens=P, reparam=False)
    ids, mask = batch()
    with torch.no_grad():
        want = native(input_ids=ids, attention_mask=mask, prefix_kv=list(prefix_kv(handle))).last_hidden_state
        close_at(hidden(hf, ids, mask), want, mask)


def test_position_ids_given_by_the_caller_are_kept():
    hf = build("bert")
    native = _bert_native(hf).eval()
    handle = attach(hf, "prefix", num_tokens=P, reparam=False)
    ids, mask = batch()
    pos = torch.arange(5, 12)[None].expand(3, -1)
    with torch.no_grad():
        want = native(input_ids=ids, attention_mask=mask, position_ids=pos,
                      prefix_kv=list(prefix_kv(handle))).last_hidden_state
        close_at(hidden(hf, ids, mask, position_ids=pos), want, mask)


# --------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("reparam", [False, True])
def test_gradients_reach_only_the_prefix_parameters(family, reparam):
    hf = build(family)
    handle = attach(hf, "prefix", num_tokens=P, reparam=reparam, reparam_hidden=8)
    ids, mask = batch()
    hidden(hf, ids, mask).pow(2).mean().backward()
    mine = {id(p) for p in handle.parameters()}
    assert mine and all(p.requires_grad for p in handle.parameters())
    for name, p in hf.named_parameters():
        if id(p) in mine:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_detach_and_disabled_give_the_base_outputs_bit_for_bit(family):
    hf = build(family)
    ids, mask = batch()
    keys = list(hf.state_dict())
    with torch.no_grad():
        before = hidden(hf, ids, mask)
        handle = attach(hf, "prefix", num_tokens=P)
        moved = hidden(hf, ids, mask)
        with handle.disabled():
            assert torch.equal(hidden(hf, ids, mask), before)
        handle.detach()
        after = hidden(hf, ids, mask)
    assert not torch.allclose(moved, before)
    assert torch.equal(after, before)
    assert list(hf.state_dict()) == keys and deltas_of(hf) == {} and not hf._forward_pre_hooks


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_save_load_round_trip(family, tmp_path: Path):
    hf = build(family)
    handle = attach(hf, "prefix", num_tokens=P, reparam=True, reparam_hidden=8)
    perturb(handle.parameters())
    ids, mask = batch()
    with torch.no_grad():
        want = hidden(hf, ids, mask)
    handle.save(tmp_path / "p")
    fresh = build(family)
    loaded = load_delta(fresh, tmp_path / "p")
    assert loaded.method == "prefix" and not loaded._method.config.reparam   # the MLP is folded on save
    with torch.no_grad():
        torch.testing.assert_close(hidden(fresh, ids, mask), want, rtol=1e-6, atol=1e-6)


def test_merge_folds_the_mlp_and_keeps_the_outputs():
    hf = build("roberta")
    handle = attach(hf, "prefix", num_tokens=P, reparam=True, reparam_hidden=8)
    perturb(handle.parameters())
    ids, mask = batch()
    with torch.no_grad():
        want = hidden(hf, ids, mask)
        handle.merge()
        got = hidden(hf, ids, mask)
    assert not handle._method.config.reparam and not handle._method.sets["layers"].reparam
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------- PEFT's format
def test_peft_prefix_format_both_ways_on_bert(tmp_path: Path, caplog):
    """PEFT feeds its prefix to BertModel as a plain cache, so transformers numbers the tokens from P; ours
    keeps 0..T-1 (said in a warning). With position_ids from P given to ours, the outputs agree both ways."""
    peft = pytest.importorskip("peft")
    hf = build("bert")
    base, back = copy.deepcopy(hf), copy.deepcopy(hf)
    handle = attach(hf, "prefix", num_tokens=P, reparam=False)
    perturb(handle.parameters())
    ids, mask = batch()
    shifted = torch.arange(P, P + ids.shape[1])[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        want = hidden(hf, ids, mask, position_ids=shifted)
    with caplog.at_level(logging.WARNING):
        handle.save(tmp_path / "ours", format="peft")
    assert "position_ids" in caplog.text
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        close_at(hidden(theirs, ids, mask), want, mask)
    # and back: PEFT's own adapter (random prefixes) read by load_delta
    torch.manual_seed(3)
    pm = peft.get_peft_model(build("bert"), peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION",
                                                                    num_virtual_tokens=P)).eval()
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.normal_()
        want = hidden(pm, ids, mask)
    pm.save_pretrained(tmp_path / "theirs")
    load_delta(back, tmp_path / "theirs")
    with torch.no_grad():
        close_at(hidden(back, ids, mask, position_ids=shifted), want, mask)


# --------------------------------------------------------------------------------------------- refusals
def test_encoders_without_a_cache_are_refused_in_one_line():
    model = transformers.DistilBertModel(transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2,
                                                                       n_heads=4, hidden_dim=37))
    with pytest.raises(DeltaError, match="keeps none") as err:
        attach(model, "prefix")
    msg = str(err.value)
    assert "\n" not in msg and "load_backbone" in msg and "'lora'" in msg
    assert deltas_of(model) == {} and not model._forward_pre_hooks


def test_a_4d_attention_mask_is_refused_in_one_line():
    hf = build("bert")
    attach(hf, "prefix", num_tokens=P, reparam=False)
    ids, mask = batch()
    with pytest.raises(DeltaError, match="pass the 2D padding mask"):
        hf(input_ids=ids, attention_mask=mask[:, None, None, :].float())


def test_gradient_checkpointing_that_drops_the_cache_is_refused():
    """transformers sets the cache to None in a checkpointed layer: the prefix would vanish silently."""
    hf = build("bert")
    native = _bert_native(hf).eval()
    handle = attach(hf, "prefix", num_tokens=P, reparam=False)
    hf.gradient_checkpointing_enable()
    ids, mask = batch()
    with pytest.raises(DeltaError, match="gradient_checkpointing_disable"):
        hf.train()(input_ids=ids, attention_mask=mask)
    with torch.no_grad():   # no backward replay: the layers keep the cache
        want = native(input_ids=ids, attention_mask=mask, prefix_kv=list(prefix_kv(handle))).last_hidden_state
        close_at(hidden(hf.eval(), ids, mask), want, mask)


def test_a_cache_holding_tokens_is_refused():
    hf = build("bert")
    attach(hf, "prefix", num_tokens=P, reparam=False)
    cache = transformers.DynamicCache()
    for i in range(2):
        cache.update(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), i)
    ids, mask = batch()
    with pytest.raises(DeltaError, match="already holds tokens"):
        hf(input_ids=ids, attention_mask=mask, cache=cache)


# --------------------------------------------------------------------------------------------- across backbones
def _outputs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_a_prefix_checkpoint_moves_between_transformers_and_the_native_backbone(family, tmp_path: Path):
    """Saved on the transformers encoder, loaded on the native one with the same weights, and back: the same
    outputs. Failed before the key tables named ``encoder.layer.{i}.attention.self`` (the module a prefix sits
    on) ``layers.{i}.attn``: the saved targets matched no module of the other model."""
    ids, mask = batch()
    hf = build(family)
    native = ENCODERS[family][2](hf).eval()
    handle = attach(hf, "prefix", num_tokens=P, reparam=True, reparam_hidden=8)
    perturb(handle.parameters())
    want = _outputs(hf, ids, mask)
    handle.save(tmp_path / "from-hf")
    loaded = load_delta(native, tmp_path / "from-hf")
    assert loaded.targets == ["layers.0.attn", "layers.1.attn"]
    got = _outputs(native, ids, mask)
    close_at(got, want, mask)
    assert (got - _outputs(ENCODERS[family][2](build(family)).eval(), ids, mask))[mask.bool()].abs().max() > 1e-3

    # and back: a prefix trained on the native backbone, saved, loaded on a fresh transformers model
    loaded.detach()
    back = attach(native, "prefix", num_tokens=P, reparam=False)
    perturb(back.parameters())
    want = _outputs(native, ids, mask)
    back.save(tmp_path / "from-native")
    fresh = build(family)
    on_hf = load_delta(fresh, tmp_path / "from-native")
    assert on_hf.targets == [f"encoder.layer.{i}.attention.self" for i in range(2)]
    torch.testing.assert_close(_outputs(fresh, ids, mask)[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)


def test_a_task_heads_prefix_checkpoint_loads_on_the_native_backbone(tmp_path: Path):
    """BertForMaskedLM nests the encoder under ``bert.``: its prefix checkpoint loads onto the native BERT too."""
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**SIZES)).eval()
    native = load_backbone(copy.deepcopy(hf))[0].eval()
    handle = attach(hf, "prefix", num_tokens=P, reparam=False)
    perturb(handle.parameters())
    ids, mask = batch()
    with torch.no_grad():
        want = hidden(hf, ids, mask)
    handle.save(tmp_path / "p")
    load_delta(native, tmp_path / "p")
    with torch.no_grad():
        close_at(hidden(native, ids, mask), want, mask)


def test_a_prefix_saved_on_another_size_is_refused_in_one_line(tmp_path: Path):
    """Another hidden size: the fingerprint's architecture check names the first tensor whose shape differs.
    Another head count (every weight the same shape and value): the prefix tensors' shapes are named."""
    hf = build("bert")
    attach(hf, "prefix", num_tokens=P, reparam=False).save(tmp_path / "p")
    torch.manual_seed(0)
    wider = bert_from_hf(transformers.BertConfig(**{**SIZES, "hidden_size": 48}),
                         transformers.BertModel(transformers.BertConfig(**{**SIZES, "hidden_size": 48})).state_dict())
    with pytest.raises(CheckpointError, match=r"architectures differ \(\d+ tensor shapes differ, e\.g\. "
                                              r"embeddings\.norm\.bias: \[32\] there, \[48\] here\)"
                       ) as err:
        load_delta(wider, tmp_path / "p")
    assert "\n" not in str(err.value) and deltas_of(wider) == {}
    heads = bert_from_hf(transformers.BertConfig(**{**SIZES, "num_attention_heads": 8}), build("bert").state_dict())
    with pytest.raises(CheckpointError, match=r"prefix\.layers\.keys has shape \(2, 4, 3, 8\) in the checkpoint "
                                              r"but \(2, 8, 3, 4\) here") as err:
        load_delta(heads, tmp_path / "p")
    assert "\n" not in str(err.value) and deltas_of(heads) == {}
