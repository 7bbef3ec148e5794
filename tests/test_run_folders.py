"""`promptdelta run` and `promptdelta run --recipe auto` take their run folder the same way (run.prepare_run_dir):
an existing run, finished or not, is kept and the new one goes to `<name>-2`; `--overwrite` replaces a run (never
a folder that is not one); `--resume` continues the run its checkpoints name; an output folder that cannot be
written fails before training in one line. The folder used is said in one line."""

import functools
import hashlib
import json
from pathlib import Path

import pytest

import promptdelta.recipe as recipe
import promptdelta.run as run_mod
from promptdelta import cli
from promptdelta.train import Trainer

COMMANDS = ["run", "recipe"]


class Crash(Exception):
    pass


@pytest.fixture
def fast_recipe(monkeypatch):
    """The recipe with its logreg candidate only: these tests are about folders, not about which method wins."""
    monkeypatch.setattr(recipe, "auto_recipe", functools.partial(recipe.auto_recipe, candidates=["logreg"]))


def args(command: str, backbones: dict[str, Path], out: Path, *extra: str, seeds: str = "13") -> list[str]:
    common = ["--data", "builtin:demo", "--shots", "4", "--seeds", seeds, "--max-length", "32",
              "--output-dir", str(out), "--name", "r", *extra]
    if command == "recipe":
        return ["run", "--recipe", "auto", "--backbone", str(backbones["recipe"]), *common]
    return ["run", "--backbone", str(backbones["run"]), "--verbalizer", "manual", "--max-steps", "2",
            "--batch-size", "4", "--no-progress", *common]


@pytest.fixture
def backbones(tiny_bert_dir, tiny_bert_nohead_dir, fast_recipe) -> dict[str, Path]:
    return {"run": tiny_bert_dir, "recipe": tiny_bert_nohead_dir}


def said(capsys, caplog) -> list[str]:
    """The lines naming the run folder: printed (run's echo) or logged (a caller without an echo)."""
    text = capsys.readouterr().out + "\n" + caplog.text
    caplog.clear()
    return [line[line.index("run folder: "):] for line in text.splitlines() if "run folder: " in line]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def seeds_in(run_dir: Path) -> list[int]:
    return [r["seed"] for r in json.loads((run_dir / "metrics.json").read_text())["rows"]]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_finished_run_is_kept_and_the_next_goes_to_name_2(command, backbones, tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    assert cli.main(args(command, backbones, tmp_path)) == 0
    assert said(capsys, caplog) == [f"run folder: {tmp_path / 'r'}"]
    first = snapshot(tmp_path / "r")
    assert cli.main(args(command, backbones, tmp_path)) == 0       # `make demo` twice on one machine
    assert said(capsys, caplog) == [f"run folder: {tmp_path / 'r-2'} ({tmp_path / 'r'} holds a finished run, kept; "
                                    "--overwrite replaces it)"]
    assert snapshot(tmp_path / "r") == first and seeds_in(tmp_path / "r-2") == [13]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unfinished_run_is_kept_and_said_how_to_continue(command, backbones, tmp_path, capsys, caplog,
                                                            monkeypatch):
    """A run that died in its second seed: a new run does not touch it; `run --resume` continues it in place."""
    caplog.set_level("INFO")
    ckpt = ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "1"] if command == "run" else []
    if command == "run":       # seed 13: steps 1-2; seed 21 dies in its step 2, after a checkpoint of step 1
        owner, attr, die_at = Trainer, "_train_step", 4
    else:                      # seed 21 dies before its folder is written (seed 13's is in metrics.json)
        import promptdelta.recipe_export as owner
        attr, die_at = "save_recipe", 2
    calls, original = [0], getattr(owner, attr)

    def dies(*a, **k):
        calls[0] += 1
        if calls[0] == die_at:
            raise Crash("killed in seed 21")
        return original(*a, **k)
    monkeypatch.setattr(owner, attr, dies)
    with pytest.raises(Crash):
        cli.main(args(command, backbones, tmp_path, *ckpt, seeds="13,21"))
    monkeypatch.setattr(owner, attr, original)
    assert run_mod.run_state(tmp_path / "r") == "unfinished" and seeds_in(tmp_path / "r") == [13]
    said(capsys, caplog)
    before = snapshot(tmp_path / "r")
    other_ckpt = ["--checkpoint-dir", str(tmp_path / "ck2")] if command == "run" else []
    assert cli.main(args(command, backbones, tmp_path, *other_ckpt, seeds="13,21")) == 0
    how = f"--resume --checkpoint-dir {tmp_path / 'ck'} continues it" if command == "run" else \
        "it has no checkpoints to resume"
    assert said(capsys, caplog) == [f"run folder: {tmp_path / 'r-2'} ({tmp_path / 'r'} holds an unfinished run, "
                                    f"kept; {how})"]
    assert snapshot(tmp_path / "r") == before and seeds_in(tmp_path / "r-2") == [13, 21]
    if command == "run":   # and the unfinished one resumes in its own folder
        assert cli.main(args(command, backbones, tmp_path, *ckpt, "--resume", seeds="13,21")) == 0
        assert said(capsys, caplog) == [f"run folder: {tmp_path / 'r'} (resumed; checkpoints in {tmp_path / 'ck'})"]
        assert seeds_in(tmp_path / "r") == [13, 21] and run_mod.run_state(tmp_path / "r") == "finished"
    else:                  # the recipe has no checkpoints: --resume is refused in one line
        assert cli.main(args(command, backbones, tmp_path, "--resume", "--checkpoint-dir", str(tmp_path))) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no checkpoints to resume" in err[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_overwrite_replaces_a_run_and_nothing_else(command, backbones, tmp_path, capsys, caplog, monkeypatch):
    caplog.set_level("INFO")
    assert cli.main(args(command, backbones, tmp_path)) == 0
    (tmp_path / "r" / "stale.txt").write_text("from the old run")
    said(capsys, caplog)
    assert cli.main(args(command, backbones, tmp_path, "--overwrite")) == 0
    assert said(capsys, caplog) == [f"run folder: {tmp_path / 'r'} (the run there was replaced: --overwrite)"]
    assert not (tmp_path / "r" / "stale.txt").exists() and seeds_in(tmp_path / "r") == [13]
    assert not (tmp_path / "r-2").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    # a folder that is not a run is never removed
    (tmp_path / "r" / "metrics.json").unlink()
    for f in ("config.yaml", "run.json"):
        (tmp_path / "r" / f).unlink()
    (tmp_path / "r" / "thesis.tex").write_text("precious")
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
    monkeypatch.setattr(recipe, "auto_recipe", lambda *a, **k: pytest.fail("trained before refusing"))
    assert cli.main(args(command, backbones, tmp_path, "--overwrite")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a run folder" in err[0] and (tmp_path / "r" / "thesis.tex").is_file()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_run_that_cannot_be_replaced_is_left_whole(command, backbones, tmp_path, capsys, monkeypatch):
    assert cli.main(args(command, backbones, tmp_path)) == 0
    before = snapshot(tmp_path / "r")

    def denied(*a):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(run_mod.os, "rename", denied)
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
    monkeypatch.setattr(recipe, "auto_recipe", lambda *a, **k: pytest.fail("trained before refusing"))
    capsys.readouterr()
    assert cli.main(args(command, backbones, tmp_path, "--overwrite")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be replaced (Permission denied); nothing was changed" in err[0]
    assert snapshot(tmp_path / "r") == before


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unwritable_output_folder_fails_before_training_in_one_line(command, backbones, tmp_path, capsys,
                                                                       monkeypatch):
    (tmp_path / "out").write_text("a file, not a folder")
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("trained before the folder was checked"))
    monkeypatch.setattr(recipe, "auto_recipe", lambda *a, **k: pytest.fail("trained before the folder was checked"))
    assert cli.main(args(command, backbones, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a writable folder" in err[0] and "--output-dir" in err[0]
