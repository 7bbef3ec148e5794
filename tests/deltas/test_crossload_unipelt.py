"""UniPELT and IPT checkpoints between transformers models and the native backbones. UniPELT holds a prefix, so
``save()`` records how the model numbers the tokens after it (``positions``, as the "prefix" delta does) and a
prefix from a transformers decoder (P, P + 1, ...) is refused on the native backbone (0, 1, ...) in one line; its
wrapped layers are listed by canonical name, so the same target list comes out on both sides (a transformers
Llama sorted ``mlp.down_proj`` before ``self_attn.q_proj``). IPT runs on native backbones only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from delta_helpers import perturb
from test_crossload_common import build, crossload, logits, native_of
from test_crossload_llama import rewrite

from promptdelta.deltas import attach, deltas_of, load_delta
from promptdelta.deltas.ipt import fit_subspace, prompt_layout
from promptdelta.errors import CheckpointError, ConfigError, DeltaError

P = 3


def test_a_unipelt_prefix_records_its_numbering_and_is_refused_across_in_one_line(tmp_path: Path):
    """Failed before UniPELTConfig had ``positions``: the numbering went unrecorded, and the refusal came from the
    target lists' order (own-name sort), not from the numbering."""
    hf = build("llama")
    native = native_of(hf)
    handle = attach(hf, "unipelt", num_tokens=P)
    handle.save(tmp_path / "hf")
    meta = json.loads((tmp_path / "hf" / "delta.json").read_text())
    assert meta["config"]["positions"] == "after_prefix"
    assert meta["targets"] == attach(native, "unipelt", num_tokens=P, name="probe").targets   # canonical order
    deltas_of(native)["probe"].detach()
    with pytest.raises(CheckpointError, match=r"numbered P, P \+ 1, .* but LlamaModel numbers them 0, 1, ") as err:
        load_delta(native, tmp_path / "hf")
    assert "\n" not in str(err.value) and deltas_of(native) == {}

    attach(native, "unipelt", num_tokens=P).save(tmp_path / "native")
    assert json.loads((tmp_path / "native" / "delta.json").read_text())["config"]["positions"] == "from_zero"
    fresh = build("llama")
    with pytest.raises(CheckpointError, match=r"numbered 0, 1, .* but LlamaForCausalLM numbers them P, P \+ 1") as err:
        load_delta(fresh, tmp_path / "native")
    assert "\n" not in str(err.value) and deltas_of(fresh) == {}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "bert"])
def test_unipelt_without_a_prefix_moves_across_and_with_one_on_an_encoder(arch, tmp_path: Path):
    """Gated LoRA + adapter (no prefix) carry over on a decoder (failed before: the target lists came out in
    another order on each side); on BERT the prefix too, recorded as numbered from 0 on both sides."""
    cfg = {"num_tokens": P} if arch == "bert" else {"num_tokens": 0}
    crossload(arch, "unipelt", tmp_path, **cfg)
    for side in ("from-hf", "from-native"):
        saved = json.loads((tmp_path / side / "delta.json").read_text())["config"]
        assert saved["order"] == "canonical" and saved["positions"] == ("from_zero" if arch == "bert" else None)


def test_a_unipelt_folder_saved_before_order_and_positions_loads_as_it_was_saved(tmp_path: Path):
    """A delta.json without ``order`` lists the layers sorted by the model's own names (on a transformers Llama:
    mlp.down_proj first); it loads with order='module' (checks.config_from_meta fills it in) and gives its own
    outputs again. Without the SAVED_WITHOUT entry it would be refused as attached to other modules."""
    hf = build("llama")
    handle = attach(hf, "unipelt", num_tokens=P, order="module")
    perturb(handle.parameters(), scale=0.5)
    want = logits(hf)
    handle.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "delta.json").read_text())
    assert meta["targets"][0] == "layers.0.mlp.fc2"   # the old order
    for key in ("order", "positions"):
        del meta["config"][key]
    rewrite(tmp_path / "old", meta)
    fresh = build("llama")
    loaded = load_delta(fresh, tmp_path / "old")
    assert loaded._method.config.order == "module" and loaded._method.config.positions is None
    torch.testing.assert_close(logits(fresh), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [{"positions": "zero"}, {"order": "sorted"}])
def test_unipelt_config_names_a_bad_positions_or_order(bad):
    with pytest.raises(ConfigError, match=f"unipelt {next(iter(bad))}=") as err:
        attach(build("bert"), "unipelt", **bad)
    assert "\n" not in str(err.value)


def test_ipt_refuses_a_transformers_model_in_one_line(tmp_path: Path):
    """IPT feeds its prefix through the native ``prefix_kv`` only, so its tokens are always numbered from 0 and
    it needs no ``positions``; on a transformers model it is refused by name (was: "ValueError: 'prefix_kv' is
    not in list ... Choose other targets"), also when loading a checkpoint saved on the native backbone."""
    hf = build("llama")
    native = native_of(hf)
    layout = prompt_layout(native, 2)
    subspace, _ = fit_subspace(torch.randn(3, sum(2 * n * h * p * d for _, n, h, p, d in layout)), layout, 2)
    subspace.save(tmp_path / "subspace")
    attach(native, "ipt", subspace=str(tmp_path / "subspace")).save(tmp_path / "ipt")
    with pytest.raises(DeltaError, match=r"ipt feeds its prefixes through a native backbone's prefix_kv, which "
                                         r"LlamaForCausalLM \(transformers\) does not take") as err:
        attach(hf, "ipt", subspace=str(tmp_path / "subspace"))
    assert "\n" not in str(err.value) and deltas_of(hf) == {}
    with pytest.raises(CheckpointError, match=r"load_backbone\(model\)"):
        load_delta(hf, tmp_path / "ipt")
    assert deltas_of(hf) == {}
