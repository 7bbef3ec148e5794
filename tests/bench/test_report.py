"""Reports: the committed core report regenerates byte for byte without ../shared/data; current-config
selection with and without a suite; several results files; the suite's method order; per-task shots."""

import json
import shutil
from pathlib import Path

import pytest

from promptdelta.bench import report as report_mod
from promptdelta.bench.suite import load_suite, suite_from_dict
from promptdelta.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "docs" / "results" / "core"


def test_core_report_regenerates_byte_identically_without_the_data(tmp_path, monkeypatch, caplog):
    pytest.importorskip("matplotlib")
    clone = tmp_path / "clone"      # a clone's layout: the suite and results, and no ../shared/data beside it
    (clone / "examples" / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "bench" / "core.yaml", clone / "examples" / "bench" / "core.yaml")
    shutil.copy(CORE / "core.jsonl", clone / "core.jsonl")
    monkeypatch.chdir(clone)
    assert not Path("../shared/data/sst2").exists()
    out = report_mod.report("core.jsonl", "out")          # the suite is found from the rows' suite name
    for name in report_mod.REPORT_FILES:
        assert (clone / "out" / name).read_bytes() == (CORE / name).read_bytes(), name
    assert "older configurations" in caplog.text
    trec = {s["method"]: s for s in out["summary"] if s["task"] == "trec"}
    assert round(100 * trec["lora-soft-mean-ep20"]["accuracy_mean"], 1) == 84.4     # not the older rows' 79.5
    assert list(trec)[:3] == list(load_suite(clone / "examples/bench/core.yaml", check_data=False).methods)[:3]
    rte_best = [m for m, s in {s["method"]: s for s in out["summary"] if s["task"] == "rte"}.items() if s["best"]]
    assert rte_best != ["manual-frozen"]                  # chosen on dev, not the chance-level zero-shot test score


def _row(task, method, seed, acc, dev, config="a", suite="mine"):
    return {"task": task, "method": method, "shots": 4, "seed": seed, "key": f"{task}/{method}/4shot/seed{seed}",
            "config_hash": config, "accuracy": acc, "macro_f1": acc, "dev_score": dev, "trainable_params": 0,
            "train_time_s": 1.0, "suite": suite}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_without_a_suite_each_methods_newest_config_counts_and_files_combine(tmp_path, caplog):
    a = _write(tmp_path / "a.jsonl", [_row("t", "m1", 1, 0.9, 0.5, "old"), _row("t", "m2", 1, 0.6, 0.8)])
    b = _write(tmp_path / "b.jsonl", [_row("t", "m1", 1, 0.7, 0.6, "new"), _row("u", "m1", 1, 0.5, 0.5)])
    out = report_mod.report([a, b], tmp_path / "rep", with_plots=False)
    cells = {(s["task"], s["method"]): s for s in out["summary"]}
    assert cells[("t", "m1")]["accuracy_mean"] == 0.7 and set(cells) == {("t", "m1"), ("t", "m2"), ("u", "m1")}
    assert cells[("t", "m2")]["best"] and not cells[("t", "m1")]["best"]      # dev 0.8 beats dev 0.6
    assert "1 of 4 rows are of older configurations" in caplog.text
    assert "a.jsonl + b.jsonl" in (tmp_path / "rep" / "report.md").read_text()
    with pytest.raises(ConfigError, match="no results file"):
        report_mod.report([], tmp_path / "x")


def test_suite_order_chance_levels_and_per_task_shots(tmp_path):
    raw = {"name": "s", "shots": 16, "seeds": [1], "tasks": {
        "small": {"data": "builtin:demo", "shots": [2, 4], "dev_shots": 1, "label_words": [["bad"], ["good"]]},
        "big": {"data": "../nowhere/big", "label_words": {"a": ["x"], "b": ["y"], "c": ["z"]}}},
        "methods": {"zeta": {"kind": "logreg"}, "alpha": {"kind": "head"}}}
    suite = suite_from_dict(raw, check_data=False)
    keys = [s.key for s in suite.expand()]
    assert keys[:4] == ["small/zeta/2shot/seed1", "small/alpha/2shot/seed1", "small/zeta/4shot/seed1",
                        "small/alpha/4shot/seed1"] and "big/zeta/16shot/seed1" in keys
    assert suite.tasks["small"]["dev_shots"] == 1
    assert report_mod.chance_levels(suite) == {"small": 0.5, "big": pytest.approx(1 / 3)}
    with pytest.raises(ConfigError, match="dev_shots must be one integer"):
        suite_from_dict({**raw, "tasks": {"small": {"data": "builtin:demo", "dev_shots": [1, 2]}}})
    with pytest.raises(Exception, match="does not exist"):
        suite_from_dict(raw)                               # running a suite still checks the data exists
    summary = [{"task": "small", "shots": 2, "method": m} for m in ("alpha", "zeta")]
    assert [s["method"] for s in report_mod._order(summary, suite)] == ["zeta", "alpha"]


def test_per_task_dev_shots_reach_the_data(tmp_path):
    from promptdelta.bench.harness import load_task

    suite = suite_from_dict({"name": "s", "shots": 4, "seeds": [1], "methods": {"l": {"kind": "logreg"}},
                             "tasks": {"demo": {"data": "builtin:demo", "dev_shots": 2}}})
    train, dev, _ = load_task(suite, "demo", 4, 1)[:3]
    assert len(train) == 8 and len(dev) == 4
