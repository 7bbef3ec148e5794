"""``promptdelta.run``: a multi-seed run that crashes mid-way and is resumed ends exactly like an uninterrupted
one; each seed checkpoints to its own subfolder; only rank 0 writes."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from promptdelta.config import RunConfig
from promptdelta.run import run, seed_train_config
from promptdelta.train import Trainer

SEEDS = [13, 21]


def make_config(tiny_bert_dir, tmp_path, name: str, **train) -> RunConfig:
    return RunConfig(name=name, backbone=str(tiny_bert_dir), data="builtin:demo", shots=4, seeds=SEEDS,
                     verbalizer="manual", output_dir=str(tmp_path / "runs"),
                     train={"epochs": 2, "batch_size": 4, "progress": False, **train})


class Crash(Exception):
    pass


def count_steps(monkeypatch, crash_at: int | None = None) -> list[int]:
    """Count Trainer steps from now on; raise Crash at step number ``crash_at`` (1-based, over all seeds)."""
    calls, original = [0], Trainer._train_step

    def step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == crash_at:
            raise Crash("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_step", step)
    return calls


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "train_time_s"}


def test_crashed_multi_seed_run_resumes_to_the_uninterrupted_result(tiny_bert_dir, tmp_path, monkeypatch):
    ref = run(make_config(tiny_bert_dir, tmp_path, "ref"))
    steps = {r["seed"]: r["steps"] for r in ref["rows"]}
    assert steps[13] >= 4 and steps[21] >= 4

    ckpt = dict(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=1)
    count_steps(monkeypatch, crash_at=steps[13] + 3)              # seed 21 dies in its third step
    with pytest.raises(Crash):
        run(make_config(tiny_bert_dir, tmp_path, "r", **ckpt))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["run.json", "seed13", "seed21"]

    calls = count_steps(monkeypatch)
    resumed = run(make_config(tiny_bert_dir, tmp_path, "r", **ckpt, resume=True))
    assert calls[0] == steps[21] - 2                              # seed 13 was done; seed 21 goes on from step 2
    assert resumed["run_dir"] == str(tmp_path / "runs" / "r")     # continued in its own folder
    assert not (tmp_path / "runs" / "r-2").exists()
    assert [comparable(r) for r in resumed["rows"]] == [comparable(r) for r in ref["rows"]]
    written = json.loads((tmp_path / "runs" / "r" / "metrics.json").read_text())
    assert [r["seed"] for r in written["rows"]] == SEEDS
    for seed in SEEDS:
        a = load_file(tmp_path / "runs" / "ref" / f"seed{seed}" / "delta" / "delta.safetensors")
        b = load_file(tmp_path / "runs" / "r" / f"seed{seed}" / "delta" / "delta.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_seed_checkpoints_to_its_own_folder(tmp_path):
    cfg = RunConfig(train={"checkpoint_dir": str(tmp_path / "c")})
    assert seed_train_config(cfg, 21).checkpoint_dir == str(tmp_path / "c" / "seed21")
    assert cfg.train.checkpoint_dir == str(tmp_path / "c")        # the run's own config is untouched
    assert seed_train_config(RunConfig(), 21).checkpoint_dir is None


def test_only_rank_zero_writes(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")                               # as torchrun sets it (no process group here)
    lines = []
    result = run(make_config(tiny_bert_dir, tmp_path, "rank1", max_steps=1), echo=lines.append)
    assert result["run_dir"] is None and not (tmp_path / "runs").exists() and lines == []
    assert [r["seed"] for r in result["rows"]] == SEEDS


def without_dropout(folder, out):
    """A copy of a checkpoint folder with dropout off: ranks draw other dropout masks than one process does,
    so only a dropout-free model can end with the same weights on 1 and on 2 processes."""
    shutil.copytree(folder, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_cli_nproc_2_matches_one_process(tiny_bert_dir, tmp_path):
    """``promptdelta run --nproc 2``: two gloo ranks, same global batch, same metrics and delta as one process."""
    from promptdelta.cli import main

    backbone = without_dropout(tiny_bert_dir, tmp_path / "tiny")
    argv = ["run", "--backbone", str(backbone), "--shots", "4", "--seeds", "13", "--verbalizer", "manual",
            "--max-steps", "3", "--batch-size", "4", "--output-dir", str(tmp_path), "--no-progress"]
    assert main([*argv, "--name", "one"]) == 0
    assert main([*argv, "--name", "two", "--nproc", "2"]) == 0
    assert not (tmp_path / "two-2").exists()                      # rank 1 wrote nothing
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text())["rows"][0] for n in ("one", "two"))
    assert (two["accuracy"], two["steps"], two["best_step"]) == (one["accuracy"], one["steps"], one["best_step"])
    a = load_file(tmp_path / "one" / "seed13" / "delta" / "delta.safetensors")
    b = load_file(tmp_path / "two" / "seed13" / "delta" / "delta.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
