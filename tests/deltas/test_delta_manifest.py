"""Delta folders are verified before anything is attached (issue 19 item 5): the sha256 manifest, the format
version, every delta.json field's type and range, NaN tensors, and a fingerprint over every weight value. A
delta saved on a native backbone loads onto the transformers model with the same weights and back (names
and fingerprints are canonical)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
from delta_helpers import assert_same_state, hf_bert, native_bert, perturb, snapshot
from safetensors.torch import load_file, save_file

from promptdelta.backbones import load_backbone
from promptdelta.deltas import attach, deltas_of, load_delta, model_fingerprint
from promptdelta.deltas.base import _legacy_fingerprint, write_manifest
from promptdelta.errors import CheckpointError

FILES = ["delta.safetensors", "delta.json"]


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(1, 99, (2, 6), generator=torch.Generator().manual_seed(3))   # (B, T)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = native_bert()
    handle = attach(model, "lora", r=4, alpha=8)
    perturb(handle.parameters())
    return handle.save(tmp_path / "d")


def _edit_meta(folder: Path, fn, reseal: bool = True) -> None:
    meta = json.loads((folder / "delta.json").read_text())
    fn(meta)
    (folder / "delta.json").write_text(json.dumps(meta))
    if reseal:   # the manifest matches again: the check under test must catch it on its own
        write_manifest(folder, FILES)


def _refused(model, folder: Path, match: str) -> None:
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match=match) as err:
        load_delta(model, folder)
    assert "\n" not in str(err.value) and deltas_of(model) == {}
    assert_same_state(model, snap)


def test_folder_carries_a_manifest_of_both_files(saved: Path):
    manifest = json.loads((saved / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(FILES) and json.loads((saved / "delta.json").read_text())["format"] == 2
    load_delta(native_bert(), saved)   # a fresh folder loads


def test_flipped_byte_is_refused(saved: Path):
    data = bytearray((saved / "delta.safetensors").read_bytes())
    data[-3] ^= 0x01                   # inside the last tensor's values: still a readable safetensors file
    (saved / "delta.safetensors").write_bytes(bytes(data))
    _refused(native_bert(), saved, "sha256")


def test_edited_alpha_is_caught_by_the_manifest(saved: Path):
    _edit_meta(saved, lambda m: m["config"].update(alpha=80), reseal=False)
    _refused(native_bert(), saved, "sha256 in manifest.json")


def test_nan_tensor_is_refused(saved: Path):
    tensors = load_file(saved / "delta.safetensors")
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, saved / "delta.safetensors")
    write_manifest(saved, FILES)
    _refused(native_bert(), saved, f"{key} holds NaN")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["config"].update(alpha=float("nan")), "alpha=nan is not a finite number"),
    (lambda m: m["config"].update(alpha="16"), "alpha='16' should be of type float"),
    (lambda m: m["config"].update(r=0), "r=0 must be an integer >= 1"),
    (lambda m: m["config"].update(r=2.5), "r=2.5 should be of type int"),
    (lambda m: m["config"].update(dropout=None), "dropout=None should be of type float"),
    (lambda m: m["config"].update(rank=4), "config key 'rank' is unknown"),
    (lambda m: m.update(config=[1, 2]), "'config' must be a dict"),
    (lambda m: m.update(targets=5), "'targets' must be a list"),
    (lambda m: m.update(targets=[1]), "'targets' must list module names"),
    (lambda m: m.update(method=None), "'method' must be a non-empty str"),
    (lambda m: m.update(format=99), "format 99 is not one this promptdelta reads"),
    (lambda m: m.update(format="2"), "format '2' is not one"),
    (lambda m: m["fingerprint"].update(tensors=[]), "fingerprint.tensors is not an object"),
    (lambda m: m["fingerprint"].update(tensors={"embeddings.word_embeddings.weight": 5}), "fingerprint.tensors"),
])
def test_bad_field_is_one_line_checkpoint_error(saved: Path, edit, match: str):
    _edit_meta(saved, edit)
    _refused(native_bert(), saved, match)


def test_missing_manifest_is_refused_for_format_2(saved: Path):
    (saved / "manifest.json").unlink()
    _refused(native_bert(), saved, "manifest.json is missing")


def test_legacy_folder_without_manifest_loads_with_a_warning(saved: Path, caplog, ids):
    model = native_bert()
    legacy = _legacy_fingerprint(model)

    def to_format_1(m):
        m["format"] = 1
        m["fingerprint"] = {"model_class": "BertModel", **legacy}
    _edit_meta(saved, to_format_1)
    (saved / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="promptdelta.deltas.base"):
        handle = load_delta(model, saved)
    assert "without a checksum check" in caplog.text and handle.num_parameters() > 0
    other = native_bert(seed=1)                         # the legacy check still refuses other weights
    _refused(other, saved, "other pretrained weights")


def test_one_changed_weight_is_refused(saved: Path):
    model = native_bert()
    with torch.no_grad():
        model.layers[1].mlp.fc2.weight[3, 5] += 1e-3    # one value; the old 16-sample hash missed this
    _refused(model, saved, r"other pretrained weights .*1 of \d+ tensors differ, e\.g\. layers\.1\.mlp\.fc2\.weight")


def test_fingerprint_covers_every_value_and_follows_changes():
    model = native_bert()
    fp = model_fingerprint(model)
    p = model.layers[0].attn.q_proj.weight
    old = p[7, 3].item()
    with torch.no_grad():
        p[7, 3] += 1.0                                  # in place: the version counter moves
    fp2 = model_fingerprint(model)
    assert fp2["weights"] != fp["weights"] and fp2["structure"] == fp["structure"]
    with torch.no_grad():
        p[7, 3] = old
    assert model_fingerprint(model)["weights"] == fp["weights"]
    p.data[0, 0] += 1.0                                 # through .data (no version bump): the sample catches it
    assert model_fingerprint(model)["weights"] != fp["weights"]


# ----------------------------------------------------------------------------------------- native <-> HF
def _hf_bert_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64)).eval()


@pytest.mark.parametrize("method", ["lora", "bitfit", "adapter"])
def test_native_delta_loads_onto_transformers_model_and_back(tmp_path: Path, ids, method: str):
    hf = _hf_bert_model()
    native = load_backbone(_hf_bert_model())[0].eval()   # MiniLM-shaped: BertModel, no MLM head
    handle = attach(native, method)
    perturb(handle.parameters())
    with torch.no_grad():
        want = native(input_ids=ids).last_hidden_state
        handle.save(tmp_path / "native")
        loaded = load_delta(hf, tmp_path / "native")
        got = hf(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(loaded.targets) == len(handle.targets)
    loaded.save(tmp_path / "hf")                       # and back onto a fresh native model
    native2 = load_backbone(_hf_bert_model())[0].eval()
    load_delta(native2, tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(native2(input_ids=ids).last_hidden_state, want, rtol=1e-5, atol=1e-5)


def test_saved_names_are_canonical(tmp_path: Path):
    model = hf_bert()
    handle = attach(model, "lora")
    handle.save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert meta["targets"][0] == "layers.0.attn.q_proj"
    assert "layers.0.attn.q_proj.lora_A" in load_file(tmp_path / "d" / "delta.safetensors")
    assert "embeddings.word_embeddings.weight" in meta["fingerprint"]["tensors"]


def test_transformers_delta_refused_on_other_weights(tmp_path: Path):
    handle = attach(_hf_bert_model(), "lora")
    handle.save(tmp_path / "d")
    other = load_backbone(_hf_bert_model(seed=1))[0]
    _refused(other, tmp_path / "d", "other pretrained weights")


@pytest.mark.parametrize("family, targets", [("gpt2", ["fc1", "o_proj"]), ("t5", ["q_proj", "v_proj"]),
                                             ("llama", ["q_proj", "v_proj"]), ("qwen2", ["q_proj", "fc2"]),
                                             ("roberta", ["q_proj", "fc1"])])
def test_native_delta_onto_transformers_model_every_family(family: str, targets: list[str], tmp_path: Path):
    import copy

    from test_peft_format import _base, _out     # the tiny transformers models of the PEFT tests

    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(6))
    hf = _base(family)
    native = load_backbone(copy.deepcopy(hf))[0].eval()
    before = _out(native, ids)
    handle = attach(native, "lora", targets=targets)
    perturb(handle.parameters())
    want = _out(native, ids)
    assert (want - before).abs().max() > 1e-3
    handle.save(tmp_path / "d")
    load_delta(hf, tmp_path / "d")                 # Conv1D weights (GPT-2) are fingerprinted transposed
    torch.testing.assert_close(_out(hf, ids), want, rtol=1e-5, atol=1e-5)
