"""Issue 19, the last cases: a rank that dies late, independent ``bench run`` processes on one results file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from promptdelta.train import distributed as ddp

RUN_DONE_ENV = "PROMPTDELTA_RUN_DONE"


def _fake_launcher(tmp_path: Path, rc: int, seeds_written: list[int], left: list[int]):
    """A stand-in for torchrun: rank 0 wrote metrics.json for ``seeds_written``; ``left`` ranks exited cleanly."""
    run_dir = tmp_path / "runs" / "demo"

    def fake_run(cmd, env=None, check=False, **kw):
        folder = Path(env[RUN_DONE_ENV]) if env and env.get(RUN_DONE_ENV) else None
        run_dir.mkdir(parents=True, exist_ok=True)
        rows = [{"seed": s, "accuracy": 1.0} for s in seeds_written]
        (run_dir / "metrics.json").write_text(json.dumps({"rows": rows}))
        if folder is not None:
            if seeds_written:                   # rank 0 reached the end of run()
                (folder / "run.json").write_text(json.dumps({"run_dir": str(run_dir), "seeds": [13, 21]}))
            for r in left:
                (folder / f"rank{r}.left").touch()
        return subprocess.CompletedProcess(cmd, rc)

    return fake_run


def test_rank_dying_late_after_complete_run_is_success_with_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ddp.subprocess, "run", _fake_launcher(tmp_path, 1, [13, 21], left=[0]))
    with pytest.warns(RuntimeWarning, match=r"rank\(s\) 1 .*died late.*every seed"):
        assert ddp.launch(2, ["run"]) == 0
    assert "rank(s) 1" in capsys.readouterr().err


def test_rank_failure_with_missing_seed_stays_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(ddp.subprocess, "run", _fake_launcher(tmp_path, 1, [13], left=[0]))
    assert ddp.launch(2, ["run"]) == 1


def test_rank_failure_before_rank0_finished_stays_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(ddp.subprocess, "run", _fake_launcher(tmp_path, 1, [], left=[]))
    assert ddp.launch(2, ["run"]) == 1


def test_clean_launch_returns_zero_and_no_warning(tmp_path, monkeypatch, recwarn):
    monkeypatch.setattr(ddp.subprocess, "run", _fake_launcher(tmp_path, 0, [13, 21], left=[0, 1]))
    assert ddp.launch(2, ["run"]) == 0
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_mark_run_written_only_inside_a_launch(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DONE_ENV, raising=False)
    ddp.mark_run_written(tmp_path / "run", [1])          # outside torchrun: writes nothing, no error
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv(RUN_DONE_ENV, str(tmp_path))
    ddp.mark_run_written(tmp_path / "run", [1, 2])
    assert json.loads((tmp_path / "run.json").read_text()) == {"run_dir": str(tmp_path / "run"), "seeds": [1, 2]}


# ------------------------------------------------------------------ bench run: claims across processes
def _spec(seed: int = 13):
    from promptdelta.bench.suite import RunSpec

    return RunSpec("demo", "logreg", 2, seed, "abc")


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _write_claim(folder: Path, spec, pid: int, host: str | None = None) -> Path:
    import socket

    from promptdelta.bench.harness import _claim_path

    folder.mkdir(parents=True, exist_ok=True)
    path = _claim_path(folder, spec)
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))
    return path


def test_claim_holds_pid_and_host_and_is_exclusive(tmp_path):
    import os
    import socket

    from promptdelta.bench.harness import _claim_path, claim_run, release_claim

    assert claim_run(tmp_path, _spec()) is True
    held = json.loads(_claim_path(tmp_path, _spec()).read_text())
    assert (held["pid"], held["host"]) == (os.getpid(), socket.gethostname())
    assert claim_run(tmp_path, _spec()) is False
    release_claim(tmp_path, _spec())
    assert claim_run(tmp_path, _spec()) is True


def test_claim_of_a_live_process_holds_and_of_a_dead_pid_is_taken_over(tmp_path):
    import os

    from promptdelta.bench.harness import claim_run

    live = subprocess.Popen(["sleep", "30"])
    try:
        _write_claim(tmp_path, _spec(13), live.pid)
        assert claim_run(tmp_path, _spec(13)) is False            # another live process runs it
    finally:
        live.kill()
        live.wait()
    assert claim_run(tmp_path, _spec(13)) is True                 # its holder died: stale, taken over
    _write_claim(tmp_path, _spec(21), _dead_pid())
    assert claim_run(tmp_path, _spec(21)) is True
    _write_claim(tmp_path, _spec(42), os.getpid(), host="another-host")
    assert claim_run(tmp_path, _spec(42)) is False                # cannot be checked from here: held
    (tmp_path / (_spec(87).key.replace("/", "__") + ".claim")).write_text("")
    assert claim_run(tmp_path, _spec(87)) is True                 # torn (writer died mid-write): stale


def _logreg_suite(tmp_path: Path, backbone) -> Path:
    import yaml

    raw = {"name": "claims", "backbone": str(backbone), "shots": 2, "seeds": [13, 21, 42, 87, 100, 7],
           "max_length": 32,
           "tasks": {"demo": {"data": "builtin:demo", "label_words": {"negative": ["bad"], "positive": ["good"]}}},
           "methods": {"logreg": {"kind": "logreg", "C_grid": [1.0]}}}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_run_suite_skips_a_run_another_process_finished_after_it_started(tmp_path, tiny_bert_dir):
    """The results file is re-read just before each run: a row appended meanwhile is not run again."""
    from promptdelta.bench import harness
    from promptdelta.bench.suite import load_suite

    suite = load_suite(_logreg_suite(tmp_path, tiny_bert_dir))
    results = tmp_path / "results.jsonl"
    specs = suite.expand()
    real = harness.run_spec
    ran = []

    def run_spec(suite_, spec, *a):
        row = real(suite_, spec, *a)
        ran.append(spec.key)
        if len(ran) == 1:                           # meanwhile, "another process" finishes the last run
            other = real(suite_, specs[-1], *a)
            harness.append_result(results, other)
        return row

    harness.run_spec = run_spec
    try:
        harness.run_suite(suite, results, check=False)
    finally:
        harness.run_spec = real
    keys = [r["key"] for r in harness.read_results(results)]
    assert sorted(keys) == sorted(s.key for s in specs) and len(keys) == len(set(keys))
    assert specs[-1].key not in ran
    assert not [p for p in harness.claims_dir(results).iterdir() if p.suffix == ".claim"]   # all released


@pytest.mark.slow
def test_two_independent_bench_processes_share_one_results_file(tmp_path, tiny_bert_dir):
    """Two `promptdelta bench run` processes (not workers of one parent) on one results file: each run once."""
    import os
    import sys

    from promptdelta.bench.harness import read_results
    from promptdelta.bench.suite import load_suite

    suite_file = _logreg_suite(tmp_path, tiny_bert_dir)
    results = tmp_path / "results.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "promptdelta.bench.run", "--suite", str(suite_file), "--results", str(results)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    keys = [r["key"] for r in read_results(results)]
    assert len(keys) == len(set(keys)), f"duplicated runs: {keys}"
    assert sorted(keys) == sorted(s.key for s in load_suite(suite_file).expand())
