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
