"""Checkpoints: atomic layout, verification, pruning, and exact resume after a SIGKILL mid-training."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from promptdelta.errors import CheckpointError, ConfigError
from promptdelta.train import Trainer
from promptdelta.train import checkpoint as ckpt

HERE = Path(__file__).parent


@dataclass
class Ex:
    x: tuple
    label: int


class NoisyToy(torch.nn.Module):
    """A small MLP with dropout whose collate adds Python- and NumPy-random noise: resuming is exact only
    if the torch, Python and NumPy RNG states and the data position are all restored."""

    def __init__(self, kill_at: int | None = None) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(16, 2))
        self.kill_at, self.calls = kill_at, 0

    def collate(self, examples):
        x = torch.tensor([e.x for e in examples])
        if self.training:
            self.calls += 1
            if self.kill_at is not None and self.calls == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            x = x + 0.01 * random.random() + torch.from_numpy(np.random.randn(*x.shape).astype("float32")) * 0.01
        return {"x": x, "labels": torch.tensor([e.label for e in examples])}

    def forward(self, batch):
        return self.net(batch["x"])

    def loss(self, batch):
        logits = self(batch)
        return torch.nn.functional.cross_entropy(logits, batch["labels"]), logits


def make_data(n: int, seed: int) -> list[Ex]:
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(n, 2, generator=g)
    return [Ex(tuple(p.tolist()), int(p[0] + 0.3 * p[1] > 0)) for p in pts]


def run_config(ckpt_dir) -> dict:
    # 20 examples / batch 3 x grad_accum 2: steps of 6, 6, 6, 2 examples (4 steps, 7 collates an epoch);
    # evaluation every 3 steps and checkpoints every 2 fall off the epoch grid
    return dict(lr=0.05, max_steps=14, batch_size=3, grad_accum=2, eval_every=3, seed=11, progress=False,
                checkpoint_dir=str(ckpt_dir), checkpoint_every=2, keep_checkpoints=2)


def build(kill_at=None) -> NoisyToy:
    torch.manual_seed(0)
    return NoisyToy(kill_at)


SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
torch.set_num_threads(1)
from test_checkpoint import build, make_data, run_config
from promptdelta.train import Trainer
Trainer(build(kill_at={kill_at}), **run_config({ckpt!r})).fit(make_data(20, 0), make_data(16, 1))
"""


def _history(trainer):
    return [{k: v for k, v in h.items() if k != "dev_examples_per_s"} for h in trainer.state.history]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    train, dev = make_data(20, 0), make_data(16, 1)
    full = Trainer(build(), **run_config(tmp_path / "full")).fit(train, dev)

    killed_dir = tmp_path / "killed"
    script = SCRIPT.format(here=str(HERE), kill_at=19, ckpt=str(killed_dir))  # dies in step 11's 1st batch
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    steps = [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(killed_dir)]
    assert steps == [8, 10]                      # keep_last=2, checkpoint every 2 steps, killed in step 11

    model = build()
    resumed = Trainer(model, **{**run_config(killed_dir), "resume": True}).fit(train, dev)
    assert resumed.state.step == full.state.step == 14
    assert _history(resumed) == _history(full)
    assert resumed.state.best_step == full.state.best_step
    for (n, a), (_, b) in zip(full.model.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n


def test_resume_from_final_checkpoint_is_a_no_op(tmp_path):
    train, dev = make_data(20, 0), make_data(16, 1)
    first = Trainer(build(), **run_config(tmp_path)).fit(train, dev)
    again = Trainer(build(), **{**run_config(tmp_path), "resume": True}).fit(train, dev)
    assert again.state.step == 14 and _history(again) == _history(first)
    for a, b in zip(first.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)


def _save(root, step, keep=3):
    return ckpt.save_checkpoint(root, step, {"w": torch.full((4,), float(step))}, {"step": step}, keep_last=keep)


def test_roundtrip_and_keep_last(tmp_path):
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    tensors, state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert torch.equal(tensors["w"], torch.full((4,), 4.0)) and state["step"] == 4
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "bad_manifest"])
def test_corrupt_newest_checkpoint_is_skipped_with_warning(tmp_path, caplog, damage):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    f = newest / ckpt.TENSORS
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-7])
    elif damage == "flip":
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (newest / ckpt.MANIFEST).unlink()
    else:
        (newest / ckpt.MANIFEST).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="promptdelta.train.checkpoint"):
        assert ckpt.latest_checkpoint(tmp_path).name == "step-00000001"
    assert "skipping checkpoint" in caplog.text and "step-00000002" in caplog.text
    with pytest.raises(CheckpointError, match="delete"):
        ckpt.load_checkpoint(newest)


def test_trainer_resume_skips_truncated_checkpoint(tmp_path, caplog):
    train, dev = make_data(20, 0), make_data(16, 1)
    cfg = {**run_config(tmp_path), "keep_checkpoints": 3}
    full = Trainer(build(), **cfg).fit(train, dev)
    steps = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in steps] == ["step-00000010", "step-00000012", "step-00000014"]
    import shutil
    shutil.rmtree(steps[2])                                   # as if killed before the final checkpoint
    state = steps[1] / ckpt.STATE                             # and step 12 was cut short on disk
    state.write_bytes(state.read_bytes()[:100])
    model = build()
    with caplog.at_level(logging.WARNING):
        resumed = Trainer(model, **{**cfg, "resume": True}).fit(train, dev)
    assert "skipping checkpoint" in caplog.text and "step-00000012" in caplog.text
    assert _history(resumed) == _history(full)
    for a, b in zip(full.model.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_for_other_parameters_is_refused(tmp_path):
    train = make_data(8, 0)
    Trainer(build(), lr=0.1, max_steps=2, batch_size=4, progress=False, checkpoint_dir=str(tmp_path)).fit(train)
    other = build()
    other.net[0].requires_grad_(False)
    with pytest.raises(CheckpointError, match="same model"):
        Trainer(other, lr=0.1, max_steps=2, batch_size=4, progress=False, checkpoint_dir=str(tmp_path),
                resume=True).fit(train)


def test_resume_without_checkpoint_dir_is_a_config_error():
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        Trainer(build(), resume=True)


def test_manifest_is_written_last_and_lists_hashes(tmp_path):
    path = _save(tmp_path, 7)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["step"] == 7 and set(manifest["files"]) == {ckpt.TENSORS, ckpt.STATE}
    assert (path / ckpt.MANIFEST).stat().st_mtime_ns >= (path / ckpt.TENSORS).stat().st_mtime_ns
