"""The issue-19 probe as a test: ``promptdelta run`` is killed with SIGKILL at named points (mid-training, while
a checkpoint, a delta or metrics.json is being written, during a resume), then resumed. Each time, the finished
run of the same name and every finished seed stay byte-identical, and the resumed run ends exactly like an
uninterrupted one. Tiny random BERT; each kill runs in a subprocess (a real SIGKILL, no cleanup)."""

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from promptdelta.config import RunConfig
from promptdelta.run import run

SEEDS = [13, 21]

# Runs `run(config)` with one named point patched to SIGKILL the process (no atexit, no finally, no flush).
DRIVER = r'''
import json, os, signal, sys
import torch
torch.set_num_threads(1)                          # as tests/conftest.py: the same sums as the reference run
import promptdelta.run as run_mod
import promptdelta.utils.io as io
from promptdelta.config import RunConfig
from promptdelta.train import Trainer, checkpoint as ckpt

config, point = RunConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def patch(module, name, kill_before):
    original = getattr(module, name)
    def wrapper(*args, **kwargs):
        if kill_before(*args, **kwargs):
            die()
        return original(*args, **kwargs)
    setattr(module, name, wrapper)

steps = [0]
def nth_step(n):
    def hit(*args, **kwargs):
        steps[0] += 1
        return steps[0] == n
    return hit

if point.startswith("train-step-"):               # inside an optimizer step (global count over seeds)
    patch(Trainer, "_train_step", nth_step(int(point.rsplit("-", 1)[1])))
elif point == "checkpoint-manifest":              # seed 21's 2nd checkpoint: tensors and state written, no manifest
    patch(ckpt, "atomic_write_json", lambda p, o: p.name == "manifest.json" and "seed21" in str(p) and o["step"] == 2)
elif point == "seed-files":                       # seed 21's delta written, its history.json not
    import promptdelta.prompts.registry as registry
    for module in (run_mod, registry):
        patch(module, "atomic_write_json", lambda p, o: p.name == "history.json" and "seed21" in str(p))
elif point == "metrics-replace":                  # metrics.json with both seeds in its temp file, not renamed in
    patch(io.os, "replace", lambda src, dst: str(dst).endswith("metrics.json") and
          len(json.load(open(src))["rows"]) == 2)
else:
    raise SystemExit(f"unknown point {point}")
run_mod.run(config)
raise SystemExit("the kill point was never reached")
'''


def make(tiny_bert_dir, root: Path, name: str | None, **train) -> RunConfig:
    return RunConfig(name=name, backbone=str(tiny_bert_dir), data="builtin:demo", shots=4, seeds=SEEDS,
                     verbalizer="manual", output_dir=str(root / "runs"),
                     train={"max_steps": 3, "batch_size": 4, "progress": False, **train})


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def killed(config: RunConfig, point: str) -> None:
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(config.to_dict()), point],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "train_time_s"} for r in rows]


@pytest.fixture(scope="module")
def reference(tiny_bert_dir, tmp_path_factory):
    """An uninterrupted run, and its files' hashes."""
    root = tmp_path_factory.mktemp("reference")
    result = run(make(tiny_bert_dir, root, "x"))
    return root, result


def check_against_reference(reference, run_dir: Path) -> None:
    ref_root, ref = reference
    rows = json.loads((run_dir / "metrics.json").read_text())["rows"]
    assert comparable(rows) == comparable(ref["rows"])
    for seed in SEEDS:
        a = load_file(ref_root / "runs" / "x" / f"seed{seed}" / "delta" / "delta.safetensors")
        b = load_file(run_dir / f"seed{seed}" / "delta" / "delta.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


POINTS = [
    pytest.param(["train-step-5"], id="mid-training"),
    pytest.param(["checkpoint-manifest"], id="checkpoint-write", marks=pytest.mark.slow),
    pytest.param(["seed-files"], id="delta-write", marks=pytest.mark.slow),
    pytest.param(["metrics-replace"], id="metrics-write", marks=pytest.mark.slow),
    pytest.param(["train-step-4", "train-step-1"], id="kill-during-resume", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("points", POINTS)
def test_sigkill_then_resume_changes_nothing_finished(tiny_bert_dir, tmp_path, reference, points):
    """A finished run `x` sits in the output folder; a second `x` (so `x-2`) with checkpoints is killed at
    ``points`` (the first kill in the run, later ones in resumes of it), then resumed to the end."""
    ref_root, _ = reference
    ckpt = dict(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=1)
    finished = tmp_path / "runs" / "x"
    finished.parent.mkdir()
    subprocess.run(["cp", "-a", str(ref_root / "runs" / "x"), str(finished)], check=True)
    before = snapshot(finished)

    killed(make(tiny_bert_dir, tmp_path, "x", **ckpt), points[0])
    run_dir = tmp_path / "runs" / "x-2"
    for point in points[1:]:
        killed(make(tiny_bert_dir, tmp_path, None, **ckpt, resume=True), point)
    seed13 = snapshot(run_dir / "seed13")                       # seed 13 finished before every kill point
    resumed = run(make(tiny_bert_dir, tmp_path, None, **ckpt, resume=True))

    assert resumed["run_dir"] == str(run_dir.resolve())
    assert snapshot(finished) == before                         # the earlier finished run: untouched
    assert snapshot(run_dir / "seed13") == seed13               # the finished seed: untouched
    check_against_reference(reference, run_dir)
    again = run(make(tiny_bert_dir, tmp_path, None, **ckpt, resume=True))   # a finished run: nothing to do
    assert comparable(again["rows"]) == comparable(resumed["rows"])
    assert snapshot(run_dir / "seed13") == seed13
