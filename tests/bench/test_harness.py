"""Benchmark harness: a tiny suite end to end on builtin:demo, resume after a crash, the report's numbers
against the raw lines, malformed suites failing before training, the baselines' invariants."""

import copy
import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from promptdelta.bench import report as report_mod
from promptdelta.bench import run as run_mod
from promptdelta.bench.baselines import HeadClassifier, embed, mean_pool
from promptdelta.bench.harness import append_result, pending, read_results, run_suite
from promptdelta.bench.suite import load_suite, suite_from_dict
from promptdelta.data import load
from promptdelta.errors import ConfigError, DataError, MissingFileError

ROW_KEYS = {"task", "method", "shots", "seed", "accuracy", "macro_f1", "trainable_params", "peak_mem_mb",
            "train_time_s", "step_time_s", "eval_examples_per_s", "versions", "key", "config_hash", "dev_score"}


def tiny_suite(backbone) -> dict:
    train = {"batch_size": 4, "max_steps": 2, "eval_every": 2}
    return {
        "name": "tiny-test", "backbone": str(backbone), "shots": 2, "seeds": [13, 21], "max_length": 32,
        "train": train,
        "tasks": {"demo": {"data": "builtin:demo", "label_words": {"negative": ["bad"], "positive": ["good"]}}},
        "methods": {
            "lora-manual": {"verbalizer": "manual", "delta": {"method": "lora", "r": 2, "alpha": 4},
                            "train": {"lr": 1e-3}},
            "finetune": {"kind": "finetune", "train": {"lr": 1e-4}},
            "head": {"kind": "head", "lr_grid": [1e-3, 1e-2]},
            "logreg": {"kind": "logreg", "C_grid": [0.1, 1.0]},
        },
    }


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def finished(tiny_bert_dir, tmp_path_factory):
    """Run the tiny suite, crash after 3 runs, resume; returns (suite dict, results path, lines before resume)."""
    raw = tiny_suite(tiny_bert_dir)
    results = tmp_path_factory.mktemp("bench") / "results.jsonl"

    def crash_after_3(row, seen=[]):
        seen.append(row["key"])
        if len(seen) == 3:
            raise Crash("simulated kill")

    with pytest.raises(Crash):
        run_suite(suite_from_dict(raw), results, after_run=crash_after_3)
    before = results.read_bytes()
    resumed = run_suite(suite_from_dict(raw), results)
    return raw, results, before, resumed


def test_suite_runs_end_to_end_and_resumes(finished):
    raw, results, before, resumed = finished
    rows = read_results(results)
    expected = {s.key for s in suite_from_dict(raw).expand()}
    assert len(expected) == 8
    assert [r["key"] for r in rows][:3] == [json.loads(x)["key"] for x in before.splitlines()]
    assert len(rows) == 8 and {r["key"] for r in rows} == expected          # no run done twice
    assert len(resumed) == 5 and results.read_bytes().startswith(before)   # first lines untouched
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n_test"] == 104 and r["n_train"] == 4 and r["n_dev"] == 4
    by_method = {r["method"]: r for r in rows}
    assert by_method["head"]["trainable_params"] == 32 * 2 + 2                  # the head only: H*C + C
    assert by_method["logreg"]["trainable_params"] in (32 + 1, 2 * 32 + 2)      # binary: one coef row
    assert by_method["head"]["chosen"]["lr"] in (1e-3, 1e-2)
    grid = by_method["head"]["grid_dev"]                                       # every lr's dev score is kept
    assert set(grid) == {"0.001", "0.01"} and grid[f"{by_method['head']['chosen']['lr']:g}"] == max(grid.values())
    grid = by_method["logreg"]["grid_dev"]
    assert set(grid) == {"0.1", "1"} and grid[f"{by_method['logreg']['chosen']['C']:g}"] == max(grid.values())
    assert by_method["finetune"]["trainable_params"] > 100 * by_method["lora-manual"]["trainable_params"]
    assert run_suite(suite_from_dict(raw), results) == []                      # all done: nothing runs


def test_rerun_after_config_change_only_redoes_that_method(finished):
    raw, results, _, _ = finished
    changed = copy.deepcopy(raw)
    changed["methods"]["finetune"]["train"]["lr"] = 2e-4
    todo, done = pending(suite_from_dict(changed), results)
    assert {s.method for s in todo} == {"finetune"} and len(todo) == 2 and done == 6


def test_torn_last_line_is_dropped_and_repaired(finished, tmp_path, caplog):
    raw, results, _, _ = finished
    copy_path = tmp_path / "r.jsonl"
    copy_path.write_bytes(results.read_bytes() + b'{"key": "demo/lora-man')
    assert len(read_results(copy_path)) == 8
    assert "incomplete line" in caplog.text
    assert run_suite(suite_from_dict(raw), copy_path) == []
    assert copy_path.read_bytes() == results.read_bytes()


def test_malformed_line_in_the_middle_names_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(DataError, match=r"r.jsonl:2 .*delete that line"):
        read_results(path)


def test_append_result_writes_whole_lines(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    for i in range(3):
        append_result(path, {"key": f"k{i}", "accuracy": i / 3})
    assert [r["key"] for r in read_results(path)] == ["k0", "k1", "k2"]
    assert path.read_bytes().endswith(b"\n")


# ------------------------------------------------------------------------------------------------ report


def test_report_numbers_equal_the_raw_lines(finished, tmp_path):
    _, results, _, _ = finished
    out = report_mod.report(results, tmp_path / "rep", with_plots=False)
    raw = [json.loads(line) for line in results.read_text().splitlines()]
    with open(tmp_path / "rep" / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    best = {}
    for row in table:
        mine = [r for r in raw if r["method"] == row["method"] and r["task"] == row["task"]]
        accs, f1s = [r["accuracy"] for r in mine], [r["macro_f1"] for r in mine]
        assert int(row["seeds"]) == len(mine) == 2
        assert float(row["accuracy_mean"]) == pytest.approx(sum(accs) / 2, abs=1e-12)
        assert float(row["accuracy_std"]) == pytest.approx(statistics.stdev(accs), abs=1e-12)
        assert float(row["macro_f1_mean"]) == pytest.approx(sum(f1s) / 2, abs=1e-12)
        assert float(row["macro_f1_std"]) == pytest.approx(statistics.stdev(f1s), abs=1e-12)
        assert float(row["train_time_s_mean"]) == pytest.approx(sum(r["train_time_s"] for r in mine) / 2)
        dev = sum(r["dev_score"] for r in mine) / 2
        assert float(row["dev_score_mean"]) == pytest.approx(dev, abs=1e-12)
        best[row["method"]] = (float(row["accuracy_mean"]), dev, row["best"] == "True")
    top = max(v[1] for v in best.values())
    assert all(flag == (dev == pytest.approx(top, abs=1e-12)) for _, dev, flag in best.values())  # chosen on dev
    winner = next(m for m, (_, _, flag) in best.items() if flag)
    assert f"**{winner}** (best on dev)" in out["markdown"]
    md_acc = f"{100 * best[winner][0]:.2f}"
    assert md_acc in (tmp_path / "rep" / "report.md").read_text()


def test_report_keeps_the_latest_row_per_run(finished, tmp_path):
    _, results, _, _ = finished
    path = tmp_path / "r.jsonl"
    path.write_bytes(results.read_bytes())
    rows = read_results(path)
    redo = dict(rows[0], accuracy=1.0)
    append_result(path, redo)
    summary = report_mod.summarise(read_results(path))
    cell = next(s for s in summary if s["method"] == redo["method"])
    other = next(r for r in rows if r["method"] == redo["method"] and r["key"] != redo["key"])
    assert cell["seeds"] == 2 and cell["accuracy_mean"] == pytest.approx((1.0 + other["accuracy"]) / 2)
    order = [(s["task"], s["method"]) for s in report_mod.summarise(rows)]
    assert [(s["task"], s["method"]) for s in summary] == order               # the re-run keeps its place


def test_report_plots_and_cli(finished, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, results, _, _ = finished
    assert report_mod.main([str(results), "--out", str(tmp_path / "rep")]) == 0
    names = {"accuracy_vs_params.png", "accuracy_bars.png", "accuracy_vs_time.png", "report.md", "report.csv"}
    assert names <= {p.name for p in (tmp_path / "rep").iterdir()}
    assert (tmp_path / "rep" / "accuracy_bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| demo | 2 |" in capsys.readouterr().out
    before = (tmp_path / "rep" / "report.md").read_bytes()
    with pytest.raises(ConfigError, match="--overwrite"):                     # nothing replaced unasked
        report_mod.main([str(results), "--out", str(tmp_path / "rep")])
    assert (tmp_path / "rep" / "report.md").read_bytes() == before
    assert report_mod.main([str(results), "--out", str(tmp_path / "rep"), "--overwrite", "--no-plots"]) == 0


def test_report_with_suite_counts_only_rows_of_its_current_config(finished, tmp_path):
    """A run re-done under another config and then reverted: the last row is the stale one, --suite skips it."""
    raw, results, _, _ = finished
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(yaml.safe_dump(raw))
    path = tmp_path / "r.jsonl"
    path.write_bytes(results.read_bytes())
    rows = read_results(path)
    stale = dict(rows[0], accuracy=1.0, config_hash="another-config")
    append_result(path, stale)
    append_result(path, dict(rows[1]))                                         # a re-run: keeps its place
    append_result(path, dict(stale, key=rows[1]["key"]))
    plain = report_mod.summarise(read_results(path))
    current = report_mod.summarise(report_mod.current_rows(read_results(path), suite_file))
    assert current == report_mod.summarise(rows) and plain != current
    out = report_mod.report(path, tmp_path / "rep", with_plots=False, suite=suite_file)
    assert out["summary"] == report_mod._order(current, load_suite(suite_file))    # in the suite's method order
    assert [s["method"] for s in out["summary"]] == list(load_suite(suite_file).methods)
    moved = tmp_path / "moved.jsonl"                  # the key's first row is of an old config: same order
    for row in [dict(rows[0], config_hash="old-config")] + rows[1:] + [rows[0]]:
        append_result(moved, row)
    assert [r["key"] for r in report_mod.current_rows(read_results(moved), suite_file)] == [r["key"] for r in rows]
    other = copy.deepcopy(raw)
    other["methods"] = {"head": dict(raw["methods"]["head"], lr_grid=[0.5])}
    suite_file.write_text(yaml.safe_dump(other))
    with pytest.raises(DataError, match="current configuration"):
        report_mod.current_rows(read_results(path), suite_file)


def test_report_of_a_missing_file_names_the_fix(tmp_path):
    with pytest.raises(MissingFileError, match="promptdelta bench run"):
        report_mod.report(tmp_path / "absent.jsonl")


def test_run_cli_dry_run_lists_missing_runs(finished, tmp_path, capsys):
    raw, results, _, _ = finished
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(yaml.safe_dump(raw))
    part = tmp_path / "part.jsonl"
    part.write_bytes(b"".join(results.read_bytes().splitlines(keepends=True)[:5]))
    assert run_mod.main(["--suite", str(suite_file), "--results", str(part), "--dry-run",
                         "--only", "demo/logreg", "head"]) == 0
    out = capsys.readouterr().out
    done = {r["key"] for r in read_results(part)}
    listed = {line.strip() for line in out.splitlines()[1:]}
    wanted = {k for k in (s.key for s in suite_from_dict(raw).expand()) if ("/logreg/" in k or "/head/" in k)}
    assert listed == wanted - done


# ------------------------------------------------------------------------------------- malformed suites


def _bad(raw, path, value):
    d = raw
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value
    return raw


@pytest.mark.parametrize("path,value,error,names", [
    (("colour",), "red", ConfigError, ["'colour'", "valid keys"]),
    (("tasks", "demo", "colums"), {}, ConfigError, ["'colums'", "task 'demo'", "valid keys"]),
    (("methods", "head", "lr"), 0.1, ConfigError, ["'lr'", "method 'head'", "valid keys"]),
    (("methods", "magic"), {"kind": "magic"}, ConfigError, ["'magic'", "choose one of"]),
    (("methods", "x"), {"verbalizer": "fancy"}, ConfigError, ["'x'", "'fancy'", "choose one of"]),
    (("methods", "x"), {"delta": "dora"}, ConfigError, ["'x'", "'dora'", "known methods"]),
    (("methods", "x"), {"train": {"lrate": 1}}, ConfigError, ["'lrate'", "valid keys"]),
    (("methods", "head", "lr_grid"), [0.1, -1], ConfigError, ["lr_grid", "positive numbers"]),
    (("tasks", "sst9"), {"data": "./no/such/folder"}, MissingFileError, ["'sst9'", "fix the path"]),
    (("tasks", "nodata"), {"template": "x"}, ConfigError, ["'nodata'", "needs a 'data:'"]),
    (("shots",), 0, ConfigError, ["shots", "positive integer"]),
    (("methods",), {}, ConfigError, ["methods", "non-empty"]),
])
def test_malformed_suite_names_the_problem(tiny_bert_dir, path, value, error, names):
    raw = _bad(tiny_suite(tiny_bert_dir), path, value)
    with pytest.raises(error) as e:
        suite_from_dict(raw)
    for name in names:
        assert name in str(e.value), (name, str(e.value))


def test_only_pattern_that_matches_nothing_names_the_choices(tiny_bert_dir):
    suite = suite_from_dict(tiny_suite(tiny_bert_dir))
    with pytest.raises(ConfigError, match=r"'lora-\*-x'.*methods: \['lora-manual'"):
        suite.expand(["lora-*-x"])


def test_bad_delta_option_fails_before_any_training(tiny_bert_dir, tmp_path):
    raw = tiny_suite(tiny_bert_dir)
    raw["methods"] = {"finetune": raw["methods"]["finetune"],
                      "lora-bad": {"verbalizer": "manual", "delta": {"method": "lora", "rank": 4}}}
    calls = []
    with pytest.raises(ConfigError, match=r"method 'lora-bad' on task 'demo'.*rank"):
        run_suite(suite_from_dict(raw), tmp_path / "r.jsonl", after_run=calls.append)
    assert calls == [] and not (tmp_path / "r.jsonl").exists()


def test_bad_template_fails_before_any_training(tiny_bert_dir, tmp_path):
    raw = tiny_suite(tiny_bert_dir)
    raw["methods"]["lora-manual"]["template"] = '{"placeholder":"text_a"} no mask here'
    with pytest.raises(ConfigError, match=r"method 'lora-manual' on task 'demo' .*cannot be built"):
        run_suite(suite_from_dict(raw), tmp_path / "r.jsonl")
    assert not (tmp_path / "r.jsonl").exists()


def test_missing_suite_file_and_bad_yaml(tmp_path):
    with pytest.raises(MissingFileError, match="examples/bench"):
        load_suite(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_suite(bad)


def test_example_suites_validate():
    folder = Path(__file__).resolve().parents[2] / "examples" / "bench"
    for path in sorted(folder.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        datas = [t["data"] if isinstance(t, dict) else t for t in raw["tasks"].values()]
        if any(d.startswith("..") for d in datas) and not (folder.parents[1] / "../shared/data").exists():
            continue  # the shared data folder is not part of the repository
        suite = suite_from_dict(raw, source=str(path), base_dir=folder.parents[1])   # run from the repo root
        assert suite.expand()


# ----------------------------------------------------------------------------------------------- baselines


def test_mean_pool_ignores_padding_and_embed_is_batch_invariant(tiny_bert_dir):
    from promptdelta.backbones import load_backbone

    model, tok = load_backbone(tiny_bert_dir)
    h = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(mean_pool(h, mask)[0], h[0, :2].mean(0))
    train, _, _ = load("builtin:demo", shots=2, seed=13)
    together = embed(model, tok, list(train), max_length=32, batch_size=8)
    alone = np.stack([embed(model, tok, [ex], max_length=32)[0] for ex in train])
    torch.testing.assert_close(torch.from_numpy(together), torch.from_numpy(alone), rtol=1e-4, atol=1e-5)


def test_head_only_trains_only_the_head(tiny_bert_dir):
    from promptdelta.backbones import load_backbone

    model, tok = load_backbone(tiny_bert_dir)
    clf = HeadClassifier(model, tok, num_classes=2, max_length=32, freeze_backbone=True)
    assert [n for n, p in clf.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    train, _, _ = load("builtin:demo", shots=2, seed=13)
    loss, logits = clf.loss(clf.collate(list(train)))
    loss.backward()
    assert logits.shape == (4, 2) and clf.head.weight.grad is not None
    assert all(p.grad is None for p in clf.backbone.parameters())


def test_training_memory_counts_a_real_step_and_is_none_when_nothing_trains():
    from promptdelta.bench.harness import training_memory_mb

    class Toy(torch.nn.Module):
        def __init__(self, frozen: bool) -> None:
            super().__init__()
            self.net = torch.nn.Linear(256, 256)
            self.net.requires_grad_(not frozen)

        def collate(self, xs):
            return {"x": torch.stack(xs)}

        def loss(self, batch):
            out = self.net(batch["x"])
            return out.pow(2).mean(), out

    train = [torch.randn(256) for _ in range(8)]
    mib = training_memory_mb(lambda: Toy(False), train, 4)
    weights = 256 * 257 * 4 / 2 ** 20                      # fp32 weight + bias
    assert 4 * weights <= mib < 4 * weights + 0.1          # params + grads + AdamW's two moments (+ activations)
    assert training_memory_mb(lambda: Toy(True), train, 4) is None


def test_parallel_workers_do_every_missing_run_once(finished, tmp_path):
    """Two worker processes on one results file: every run that was missing is done by exactly one worker,
    and the rows equal those of the sequential run (same seeds, same data)."""
    raw, results, _, _ = finished
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(yaml.safe_dump(raw))
    part = tmp_path / "part.jsonl"
    lines = results.read_bytes().splitlines(keepends=True)
    part.write_bytes(b"".join(lines[:3]))
    out = run_mod.run_run_bench(str(suite_file), str(part), workers=2, threads=1)
    rows = read_results(part)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == len(suite_from_dict(raw).expand())
    assert not list(tmp_path.glob(".part.jsonl.claims-*"))                      # the claims folder is gone
    sequential = {r["key"]: r for r in read_results(results)}
    for r in rows[3:]:
        assert r["accuracy"] == pytest.approx(sequential[r["key"]]["accuracy"], abs=1e-9), r["key"]
    assert "lora-manual" in out


def test_claims_give_each_run_to_one_worker(tmp_path):
    from promptdelta.bench.harness import claim_run
    from promptdelta.bench.suite import RunSpec

    spec = RunSpec("demo", "lora", 2, 13, "abc")
    assert claim_run(tmp_path, spec) is True
    assert claim_run(tmp_path, spec) is False
    assert claim_run(tmp_path, RunSpec("demo", "lora", 2, 21, "abc")) is True
    with pytest.raises(ConfigError, match="--workers 0"):
        run_mod.run_run_bench("unused.yaml", workers=0)
