"""merge_and_unload and save_pretrained with deltas attached (issue 17 item 5): the merged model round-trips
through save_pretrained / from_pretrained exactly; a native one exports with to_hf(); deltas that cannot
merge are refused by name; save_pretrained and HF Trainer.save_model never write wrapper keys."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers
from delta_helpers import hf_bert, native_bert, perturb, snapshot, assert_same_state
from safetensors.torch import load_file

from promptdelta.deltas import attach, deltas_of, load_delta
from promptdelta.deltas.merge import DELTAS_SUBDIR, merge_and_unload
from promptdelta.errors import DeltaError


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(1, 99, (2, 7), generator=torch.Generator().manual_seed(2))   # (B, T)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _saved_keys(folder: Path) -> list[str]:
    return sorted(load_file(folder / "model.safetensors"))


@pytest.mark.parametrize("method, cfg", [("lora", {}), ("lora", {"targets": ["query", "value", "output.dense"]}),
                                         ("intrinsic", {"dim": 16}), ("bitfit", {})])
def test_merge_and_unload_round_trips_through_save_pretrained(method, cfg, tmp_path: Path, ids):
    model = hf_bert()
    base_keys = sorted(model.state_dict())
    handle = attach(model, method, **cfg)
    perturb(handle.parameters())
    want = _logits(model, ids)
    assert merge_and_unload(model) is model
    assert deltas_of(model) == {} and not handle.attached
    assert sorted(model.state_dict()) == base_keys          # original names, no wrappers left
    assert all(p.requires_grad for p in model.parameters())
    got = _logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "m")
    again = transformers.BertForMaskedLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(_logits(again, ids), got)             # exact
    assert not (tmp_path / "m" / DELTAS_SUBDIR).exists()


def test_native_merge_and_unload_then_to_hf(ids):
    model = native_bert()
    handle = attach(model, "lora", targets=["q_proj", "v_proj", "fc1"])
    perturb(handle.parameters())
    want = _logits(model, ids)
    merge_and_unload(model)
    hf = model.to_hf().eval()                                 # refused while a delta is attached
    torch.testing.assert_close(_logits(hf, ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, build", [("adapter", hf_bert), ("prefix", native_bert)])
def test_unmergeable_delta_is_refused_by_name_and_nothing_changes(method, build, ids):
    model = build()
    lora = attach(model, "lora", name="mine")
    perturb(lora.parameters())
    other = attach(model, method, name="side")
    perturb(other.parameters(), seed=7)
    snap, want = snapshot(model), _logits(model, ids)
    with pytest.raises(DeltaError, match=rf"delta 'side' \({method}\).*handle.save\(\)") as err:
        merge_and_unload(model)
    assert "\n" not in str(err.value) and sorted(deltas_of(model)) == ["mine", "side"]
    assert_same_state(model, snap)
    assert torch.equal(_logits(model, ids), want)


def test_merge_and_unload_without_deltas_is_an_error():
    with pytest.raises(DeltaError, match="no deltas"):
        merge_and_unload(hf_bert())


def _check_base_and_deltas(folder: Path, base_logits, delta_logits, ids) -> None:
    assert not [k for k in _saved_keys(folder) if ".base." in k or "lora_" in k]
    again = transformers.BertForMaskedLM.from_pretrained(folder).eval()
    assert torch.equal(_logits(again, ids), base_logits)      # the base model, exactly
    load_delta(again, folder / DELTAS_SUBDIR / "lora")
    torch.testing.assert_close(_logits(again, ids), delta_logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("merged", [False, True])
def test_save_pretrained_with_deltas_writes_base_and_deltas_beside(merged, tmp_path: Path, ids, caplog):
    model = hf_bert()
    base_logits = _logits(model, ids)
    handle = attach(model, "lora")
    perturb(handle.parameters())
    if merged:
        handle.merge()                                        # merged values must not leak into the base
    delta_logits = _logits(model, ids)
    twin = copy.deepcopy(model)                               # a copy saves itself, not the original
    assert twin.__dict__["save_pretrained"].model is twin
    model.save_pretrained(tmp_path / "m")
    assert "merge_and_unload" in caplog.text
    _check_base_and_deltas(tmp_path / "m", base_logits, delta_logits, ids)
    handle.detach()                                           # the guard goes with the last delta
    assert "save_pretrained" not in model.__dict__


def test_trainer_save_model_with_deltas(tmp_path: Path, ids):
    pytest.importorskip("accelerate")
    model = hf_bert()
    base_logits = _logits(model, ids)
    handle = attach(model, "lora")
    perturb(handle.parameters())
    delta_logits = _logits(model, ids)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args)
    trainer.save_model(str(tmp_path / "t"))
    _check_base_and_deltas(tmp_path / "t", base_logits, delta_logits, ids)


def test_modules_to_save_is_refused_by_name(tmp_path: Path):
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64)).eval()
    handle = attach(model, "lora", modules_to_save=["classifier"])
    with pytest.raises(DeltaError, match="modules_to_save"):
        merge_and_unload(model)
    with pytest.raises(DeltaError, match="modules_to_save"):
        handle.save(tmp_path / "p", format="peft")
    assert sorted(deltas_of(model)) == ["lora"]
