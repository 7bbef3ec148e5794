"""The peers (setfit, peft) as harness methods on a tiny random BERT: rows with versions and arguments, the
same splits as the other methods, and a clear skip when the extra is missing."""

import importlib.util

import pytest

from promptdelta.bench import peers_harness
from promptdelta.bench.harness import read_results, run_suite
from promptdelta.bench.suite import suite_from_dict
from promptdelta.errors import ConfigError


def peer_suite(backbone, methods) -> dict:
    return {"name": "tiny-peers", "backbone": str(backbone), "shots": 4, "seeds": [13], "max_length": 32,
            "train": {"batch_size": 4, "max_steps": 2, "eval_every": 2},
            "tasks": {"demo": {"data": "builtin:demo", "label_words": {"negative": ["bad"], "positive": ["good"]}}},
            "methods": methods}


needs_setfit = pytest.mark.skipif(importlib.util.find_spec("setfit") is None, reason="setfit not installed")
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed")


@pytest.mark.slow                     # ~20 s: setfit and peft each train on the tiny backbone
@needs_setfit
@needs_peft
def test_peers_run_on_the_harness_splits(tiny_bert_nohead_dir, tmp_path):
    methods = {"setfit": {"kind": "setfit", "num_iterations": 2, "head_C": [0.1, 1.0]},
               "peft": {"kind": "peft", "r": 2, "alpha": 4, "epochs": 2, "lr": 1e-3},
               "logreg": {"kind": "logreg"}}
    results = tmp_path / "r.jsonl"
    run_suite(suite_from_dict(peer_suite(tiny_bert_nohead_dir, methods)), results)
    rows = {r["method"]: r for r in read_results(results)}
    assert set(rows) == {"setfit", "peft", "logreg"}
    assert len({(r["n_train"], r["n_dev"], r["n_test"]) for r in rows.values()}) == 1      # same splits
    sf, pf = rows["setfit"], rows["peft"]
    assert sf["peer"]["versions"]["setfit"] == importlib.metadata.version("setfit")
    assert sf["peer"]["args"]["num_iterations"] == 2 and set(sf["grid_dev"]) == {"0.1", "1"}
    assert sf["chosen"]["head_C"] in (0.1, 1.0)
    assert sf["dev_score"] == max(sf["grid_dev"].values())
    assert pf["peer"]["args"]["r"] == 2 and pf["peer"]["versions"]["peft"] == importlib.metadata.version("peft")
    assert pf["dev_score"] == max(pf["grid_dev"].values()) and pf["chosen"]["epoch"] in (1, 2)
    # LoRA A/B (2 x 32 each, query+value, 2 layers) + the head (32 x 2 + 2); the backbone frozen
    assert pf["trainable_params"] == 2 * 2 * (2 * 32 * 2) + 32 * 2 + 2
    for r in (sf, pf):
        assert 0.0 <= r["accuracy"] <= 1.0 and r["kind"] in ("setfit", "peft")


def test_missing_extra_is_skipped_with_a_message(tiny_bert_nohead_dir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(peers_harness.importlib.util, "find_spec",
                        lambda name, *a: None if name == "setfit" else real(name, *a))
    said = []
    methods = {"setfit": {"kind": "setfit"}, "logreg": {"kind": "logreg"}}
    run_suite(suite_from_dict(peer_suite(tiny_bert_nohead_dir, methods)), tmp_path / "r.jsonl", echo=said.append)
    assert any("skipping method 'setfit'" in s and "promptdelta[peers]" in s for s in said)
    assert [r["method"] for r in read_results(tmp_path / "r.jsonl")] == ["logreg"]


def test_unknown_peer_option_is_a_config_error():
    with pytest.raises(ConfigError, match="num_iterations"):
        suite_from_dict(peer_suite("x", {"s": {"kind": "setfit", "num_iteration": 3}}))


def test_recipe_kind_records_its_choice_and_table(tiny_bert_nohead_dir, tmp_path):
    methods = {"auto": {"kind": "recipe", "budget_s": 600, "candidates": ["logreg", "similarity"]}}
    results = tmp_path / "r.jsonl"
    run_suite(suite_from_dict(peer_suite(tiny_bert_nohead_dir, methods)), results)
    (row,) = read_results(results)
    assert row["kind"] == "recipe" and set(row["grid_dev"]) == {"logreg", "similarity"}
    assert row["dev_score"] == max(row["grid_dev"].values())
    assert row["chosen"]["candidate"] == max(row["grid_dev"], key=lambda k: (row["grid_dev"][k], k == "logreg"))
    refit = row["chosen"]["candidate"] == "logreg"                   # the zero-shot similarity is never refit
    assert row["peer"]["args"]["refit"] == refit
    assert [r["name"] for r in row["peer"]["args"]["table"]] == ["logreg", "similarity"] + ["refit"] * refit
