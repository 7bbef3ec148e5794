"""Issue 19: lose nothing, never hang, fail loudly. One test per case the hostile-user probe found; each
fails on the code before the fix. The SIGKILL probe is tests/test_reliability_kill.py."""

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from promptdelta import run as run_mod
from promptdelta.config import RunConfig
from promptdelta.errors import (CheckpointError, ConfigError, DataError, MissingFileError, PromptDeltaError,
                                TemplateError, VerbalizerError)
from promptdelta.run import run
from promptdelta.train import Trainer
from test_run import Crash, count_steps

SEEDS = [13, 21]


def make(tiny_bert_dir, root: Path, name: str | None, seeds=SEEDS, **train) -> RunConfig:
    return RunConfig(name=name, backbone=str(tiny_bert_dir), data="builtin:demo", shots=4, seeds=list(seeds),
                     verbalizer="manual", output_dir=str(root / "runs"),
                     train={"max_steps": 2, "batch_size": 4, "progress": False, **train})


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def crashed_run(tiny_bert_dir, root: Path, monkeypatch, name: str = "x") -> dict:
    """A run with checkpoints that dies in seed 21's second step; returns its config keywords."""
    ckpt = dict(checkpoint_dir=str(root / "ckpt"), checkpoint_every=1)
    count_steps(monkeypatch, crash_at=4)                       # seed 13: steps 1-2; seed 21 dies in step 2
    with pytest.raises(Crash):
        run(make(tiny_bert_dir, root, name, **ckpt))
    monkeypatch.undo()
    return ckpt


# ---- lost work ---------------------------------------------------------------------------------------
def test_resume_never_continues_into_a_finished_run_of_the_same_name(tiny_bert_dir, tmp_path, monkeypatch):
    """A crashed `x-2` (its name was taken by a finished `x`) resumes into `x-2`; `x` is never touched."""
    run(make(tiny_bert_dir, tmp_path, "x", seeds=[13]))
    finished = snapshot(tmp_path / "runs" / "x")
    ckpt = crashed_run(tiny_bert_dir, tmp_path, monkeypatch)
    assert (tmp_path / "runs" / "x-2").is_dir()
    with pytest.raises(CheckpointError, match=r"belongs to run '.*x-2', not to '.*runs/x'"):
        run(make(tiny_bert_dir, tmp_path, "x", **ckpt, resume=True))
    resumed = run(make(tiny_bert_dir, tmp_path, None, **ckpt, resume=True))  # the checkpoint names its run
    assert resumed["run_dir"] == str((tmp_path / "runs" / "x-2").resolve())
    assert snapshot(tmp_path / "runs" / "x") == finished


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_resume_with_an_empty_or_mistyped_checkpoint_dir_refuses(tiny_bert_dir, tmp_path, where):
    run(make(tiny_bert_dir, tmp_path, "x", seeds=[13]))
    finished = snapshot(tmp_path / "runs" / "x")
    ckpt = tmp_path / "ckpt-typo"
    if where == "empty":
        ckpt.mkdir()
    state = "holds no run record" if where == "empty" else "does not exist"
    with pytest.raises(CheckpointError, match=f"checkpoint folder '.*ckpt-typo' {state}"):
        run(make(tiny_bert_dir, tmp_path, "x", seeds=[13], checkpoint_dir=str(ckpt), resume=True))
    assert snapshot(tmp_path / "runs" / "x") == finished


def test_resume_with_fewer_seeds_refuses_and_metrics_keep_every_seed(tiny_bert_dir, tmp_path, monkeypatch):
    ckpt = crashed_run(tiny_bert_dir, tmp_path, monkeypatch)
    with pytest.raises(CheckpointError, match=r"seeds: run \[13, 21\], now \[13\]"):
        run(make(tiny_bert_dir, tmp_path, "x", seeds=[13], **ckpt, resume=True))
    rows = json.loads((tmp_path / "runs" / "x" / "metrics.json").read_text())["rows"]
    assert [r["seed"] for r in rows] == [13]                   # seed 13 finished before the crash
    resumed = run(make(tiny_bert_dir, tmp_path, "x", **ckpt, resume=True))
    rows = json.loads((tmp_path / "runs" / "x" / "metrics.json").read_text())["rows"]
    assert [r["seed"] for r in rows] == SEEDS and resumed["rows"] == rows


def test_metrics_are_merged_per_seed_never_truncated(tmp_path):
    row = {"accuracy": 0.5, "macro_f1": 0.5, "train_time_s": 1.0}
    (tmp_path / "metrics.json").write_text(json.dumps({"rows": [{"seed": 13, **row}, {"seed": 21, **row}]}))
    run_mod._write_metrics(tmp_path, [13], {13: {"seed": 13, **row, "accuracy": 1.0}})
    rows = json.loads((tmp_path / "metrics.json").read_text())["rows"]
    assert [(r["seed"], r["accuracy"]) for r in rows] == [(13, 1.0), (21, 0.5)]


def test_a_finished_run_is_rewritten_only_with_overwrite(tiny_bert_dir, tmp_path):
    first = run(make(tiny_bert_dir, tmp_path, "x", seeds=[13]))
    second = run(make(tiny_bert_dir, tmp_path, "x", seeds=[13]))
    assert second["run_dir"].endswith("x-2")
    (tmp_path / "runs" / "x" / "stale.txt").write_text("from the old run")
    third = run(make(tiny_bert_dir, tmp_path, "x", seeds=[13]), overwrite=True)
    assert third["run_dir"] == first["run_dir"] and not (tmp_path / "runs" / "x" / "stale.txt").exists()
    (tmp_path / "runs" / "notarun").mkdir()
    (tmp_path / "runs" / "notarun" / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="is not a run folder"):
        run(make(tiny_bert_dir, tmp_path, "notarun", seeds=[13]), overwrite=True)
    assert (tmp_path / "runs" / "notarun" / "thesis.tex").read_text() == "precious"


# ---- silent wrong results on resume --------------------------------------------------------------------
@pytest.mark.parametrize("change, named", [({"train": {"lr": 0.5}}, "train.lr"),
                                           ({"train": {"max_steps": 3}}, "train.max_steps"),
                                           ({"shots": 2}, "shots")])
def test_resume_with_changed_settings_refuses(tiny_bert_dir, tmp_path, monkeypatch, change, named):
    ckpt = crashed_run(tiny_bert_dir, tmp_path, monkeypatch)
    d = make(tiny_bert_dir, tmp_path, "x", **ckpt, resume=True).to_dict()
    d["train"].update(change.pop("train", {}))
    d.update(change)
    with pytest.raises(CheckpointError, match=f"other settings .*{named}"):
        run(RunConfig.from_dict(d))


def test_trainer_resume_checks_its_checkpoint_settings(tmp_path):
    """The Trainer itself (no run folder) refuses a checkpoint written with another lr or training-set size."""
    from promptdelta.train.checkpoint import check_resume

    state = {"config": {"lr": 1e-3, "max_steps": 4, "seed": 13}, "order": list(range(8))}
    check_resume(tmp_path, state, {"lr": 1e-3, "max_steps": 4, "seed": 13}, 8)
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0.001, now 0.01"):
        check_resume(tmp_path, state, {"lr": 1e-2, "max_steps": 4, "seed": 13}, 8)
    with pytest.raises(CheckpointError, match=r"training examples: checkpoint 8, now 4"):
        check_resume(tmp_path, state, {"lr": 1e-3, "max_steps": 4, "seed": 13}, 4)


# ---- hangs ---------------------------------------------------------------------------------------------
@pytest.fixture
def native(monkeypatch, tmp_path):
    """kernels.native with a fresh cache, its build folder under tmp_path and the compiler mocked."""
    from promptdelta.kernels import native as mod

    monkeypatch.setattr(mod, "_module", None)
    monkeypatch.setattr(mod, "_error", None)
    monkeypatch.delenv("PROMPTDELTA_NATIVE", raising=False)
    monkeypatch.setattr(mod, "build_directory", lambda name: tmp_path / "ext" / name)
    return mod


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_kernel_build_lock_is_removed(native, monkeypatch, tmp_path):
    """A build killed by kill -9 left its lock (and torch's bare `lock`): the next build goes on at once."""
    name = native._build_name()
    build = tmp_path / "ext" / name
    build.mkdir(parents=True)
    (build / "lock").write_text("")                                        # torch's FileBaton, left behind
    (build.parent / f"{name}.promptdelta-lock").write_text(f"{dead_pid()} {socket.gethostname()}\n")
    monkeypatch.setattr(native, "_compile", lambda n, d: "compiled")
    t0 = time.monotonic()
    assert native.native_ops() == "compiled"
    assert time.monotonic() - t0 < 5
    assert not (build / "lock").exists() and not (build.parent / f"{name}.promptdelta-lock").exists()


def test_live_build_lock_is_waited_for_then_torch_ops_with_a_warning(native, monkeypatch, tmp_path, caplog):
    name = native._build_name()
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / f"{name}.promptdelta-lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")
    monkeypatch.setenv(native.TIMEOUT_ENV, "0.5")
    monkeypatch.setattr(native, "_compile", lambda n, d: pytest.fail("built while another process held the lock"))
    with caplog.at_level(logging.INFO, logger="promptdelta.kernels.native"):
        assert native.native_ops() is None
    assert "waiting for process" in caplog.text and "use torch ops instead" not in caplog.text
    assert "TimeoutError" in native.native_error() and "torch ops instead" in caplog.text


def test_hung_build_falls_back_to_torch_ops(native, monkeypatch, caplog):
    monkeypatch.setenv(native.TIMEOUT_ENV, "0.3")
    monkeypatch.setattr(native, "_compile", lambda n, d: time.sleep(1))
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="promptdelta.kernels.native"):
        assert native.native_ops() is None
    assert time.monotonic() - t0 < 1 and "the build took over 0 s" in native.native_error()
    assert "torch ops instead" in caplog.text


def test_failing_build_falls_back_to_torch_ops(native, monkeypatch):
    def fail(name, build_dir):
        raise RuntimeError("Error building extension: g++ not found")

    monkeypatch.setattr(native, "_compile", fail)
    assert native.native_ops() is None and "g++ not found" in native.native_error()
    assert not list((Path(native.build_directory("x")).parent).glob("*.promptdelta-lock"))   # lock freed


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ["template_options:", "  a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"  {cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="expands to more than 100,000 values through YAML aliases"):
        RunConfig.from_yaml(tmp_path / "bomb.yaml")
    assert time.monotonic() - t0 < 2


def test_shared_values_in_a_python_config_are_refused():
    x = [1] * 9
    for _ in range(8):
        x = [x] * 9
    with pytest.raises(ConfigError, match="more than 100,000 values"):
        RunConfig.from_dict({"template_options": {"x": x}})


# ---- silent cases: label words, templates, YAML ---------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tiny_bert_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny_bert_dir)


def test_label_words_that_are_unknown_tokens(tok, caplog):
    from promptdelta.prompts import ManualVerbalizer

    with pytest.raises(VerbalizerError, match=r"every label word of class 'neg' \(\['☃'\]\) is the unknown"):
        ManualVerbalizer(tok, classes=["neg", "pos"], label_words=[["☃"], ["great"]])
    with caplog.at_level(logging.WARNING, logger="promptdelta.prompts.verbalizer"):
        ManualVerbalizer(tok, classes=["neg", "pos"], label_words=[["bad", "🤖"], ["great"]])
    assert "are the unknown token" in caplog.text


def test_label_words_shared_between_classes(tok, tiny_bert_dir, caplog):
    from promptdelta.backbones import load_backbone
    from promptdelta.prompts import ManualVerbalizer, SoftVerbalizer

    with pytest.raises(VerbalizerError, match="classes 'neg' and 'pos' have the same label words"):
        ManualVerbalizer(tok, classes=["neg", "pos"], label_words=[["good"], ["good"]])
    backbone, _ = load_backbone(str(tiny_bert_dir))
    with pytest.raises(VerbalizerError, match="can never be told apart"):
        SoftVerbalizer(tok, classes=["neg", "pos"], label_words=[["fine"], ["fine"]], backbone=backbone)
    with caplog.at_level(logging.WARNING, logger="promptdelta.prompts.verbalizer"):
        ManualVerbalizer(tok, classes=["neg", "pos"], label_words=[["bad", "fine"], ["good", "fine"]])
    assert "share label word(s) ['fine']" in caplog.text


def test_template_that_never_shows_the_input(tiny_bert_dir, tmp_path):
    cfg = make(tiny_bert_dir, tmp_path, "x", seeds=[13])
    cfg.template = 'It was {"mask"}.'
    with pytest.raises(TemplateError, match="never shows the input"):
        run(cfg)


def test_yaml_duplicate_key_is_an_error(tmp_path):
    (tmp_path / "dup.yaml").write_text("train:\n  lr: 0.01\nshots: 8\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"key 'train' is given twice \(lines 1 and 4\)"):
        RunConfig.from_yaml(tmp_path / "dup.yaml")
    (tmp_path / "merge.yaml").write_text("base: &b {lr: 0.1}\n")       # merge keys stay legal
    from promptdelta.config import load_yaml

    assert load_yaml("b: &b {lr: 0.1, epochs: 2}\ntrain:\n  <<: *b\n  lr: 0.2\n", "x")["train"] == \
        {"lr": 0.2, "epochs": 2}


# ---- crashes -> one named error, exit code 2 -----------------------------------------------------------
def test_inline_template_longer_than_a_file_name(tok):
    from promptdelta.run import build_template

    text = '{"placeholder":"text_a"} ' + "very " * 80 + 'long. It was {"mask"}.'
    assert len(text.encode()) > 255
    template = build_template(RunConfig(template=text), tok)
    assert template.text == text


@pytest.mark.parametrize("config, match", [
    ({"template_type": "soft", "template_options": {"num_tokens": 10 ** 7}}, "num_tokens=10000000 soft tokens"),
    ({"template": '{"placeholder":"text_a"} {"soft": null, "duplicate": 200} {"mask"}', "template_type": "mixed"},
     "holds 200 soft tokens"),
    ({"template": '{"placeholder":"text_a"} {"soft": null, "duplicate": 10000000} {"mask"}'}, "duplicate"),
    ({"delta": {"method": "lora", "r": 100000}}, "r=100000 is larger than the backbone's hidden size 32"),
    ({"max_length": 4096}, "exceeds the backbone's 128 positions"),
])
def test_sizes_are_bounded_before_anything_is_allocated(tiny_bert_dir, config, match):
    from promptdelta.backbones import load_backbone

    backbone, _ = load_backbone(str(tiny_bert_dir))
    with pytest.raises(PromptDeltaError, match=match):
        run_mod.check_sizes(RunConfig.from_dict(config), backbone)


def test_non_utf8_jsonl_names_the_file_and_line(tmp_path):
    from promptdelta import data as pdata

    (tmp_path / "labels.txt").write_text("neg\npos\n")
    (tmp_path / "test.jsonl").write_text('{"text": "ok", "label": 0}\n')
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "fine", "label": 1}\n{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2 is not UTF-8 text \(byte 0xe9 at column 14\)"):
        pdata.load(str(tmp_path))


def test_test_split_without_labels_fails_before_training(tiny_bert_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "labels.txt").write_text("0\tneg\n1\tpos\n")
    rows = [{"text": f"text {i}", "label": i % 2} for i in range(16)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "test.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[:4]))
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("trained before the test labels were checked"))
    cfg = make(tiny_bert_dir, tmp_path, "x", seeds=[13])
    cfg.data = str(data)
    with pytest.raises(DataError, match="4 of 4 test examples have no label"):
        run(cfg)


def cli(*args: str) -> list[str]:
    return ["run", "--seeds", "13", "--shots", "4", "--max-steps", "1", "--no-progress", *args]


@pytest.mark.parametrize("flags, match", [
    (["--device", "cuda"], "error: device='cuda', but this .* has no CUDA device"),
    (["--device", "gpu0"], "error: train.device='gpu0' is not a device name; use cpu, cuda"),
    (["--seeds", "13,13"], "error: seeds=\\[13, 13\\] names seed 13 more than once"),
    (["--name", "../../x"], "error: name='../../x' is not a plain folder name"),
])
def test_cli_errors_are_one_line_exit_code_2(tiny_bert_dir, tmp_path, capsys, flags, match):
    from promptdelta.cli import main

    rc = main(cli("--backbone", str(tiny_bert_dir), "--output-dir", str(tmp_path / "runs"), *flags))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert __import__("re").match(match, err), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("what", ["file", "readonly", "full"])
@pytest.mark.parametrize("flag", ["--output-dir", "--checkpoint-dir"])
def test_unwritable_output_and_checkpoint_folders_fail_before_training(tiny_bert_dir, tmp_path, monkeypatch,
                                                                       capsys, what, flag):
    from promptdelta.cli import main

    target = tmp_path / "target"
    if what == "file":
        target.write_text("I am a file")
    elif what == "readonly":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        target.mkdir(mode=0o555)
    else:
        real = run_mod.shutil.disk_usage
        monkeypatch.setattr(run_mod.shutil, "disk_usage",
                            lambda p: real(p)._replace(free=1 << 20) if Path(p) == target else real(p))
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("trained before the folders were checked"))
    other = ["--checkpoint-dir", str(tmp_path / "ck")] if flag == "--output-dir" else \
        ["--output-dir", str(tmp_path / "runs")]
    rc = main(cli("--backbone", str(tiny_bert_dir), flag, str(target), *other))
    err = capsys.readouterr().err
    assert rc == 2 and f"pass another {flag}" in err and len(err.strip().splitlines()) == 1


# ---- unclear or minor -----------------------------------------------------------------------------------
def test_template_file_that_is_missing_a_folder_or_empty(tok, tmp_path):
    from promptdelta.run import build_template

    with pytest.raises(MissingFileError, match="template file 'prompts/sst2' does not exist"):
        build_template(RunConfig(template="prompts/sst2"), tok)
    with pytest.raises(TemplateError, match="is a folder"):
        build_template(RunConfig(template=str(tmp_path)), tok)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(TemplateError, match="holds no template"):
        build_template(RunConfig(template=str(tmp_path / "empty.txt")), tok)
    with pytest.raises(MissingFileError, match="cannot be read"):
        build_template(RunConfig(template="x" * 300), tok)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    from promptdelta.utils.io import atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == mode


_ORPHAN = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", '''
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("proc", sys.argv[2])      # not the package: a fast start
proc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(proc)
proc.die_with_parent(interval=0.2)
open(sys.argv[1], "w").write(str(os.getpid()))
while True:
    time.sleep(0.1)
''', sys.argv[1], sys.argv[3]], env={**os.environ, "PROMPTDELTA_WATCH_PID": sys.argv[2]})
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
@pytest.mark.parametrize("kill", ["parent", "watched ancestor"])
def test_workers_die_with_their_parent(tmp_path, kill):
    """A worker (grandchild here) ends when its parent, or the ancestor named in PROMPTDELTA_WATCH_PID, is killed."""
    from promptdelta.utils.proc import pid_alive

    pidfile = tmp_path / "worker.pid"
    ancestor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    import promptdelta.utils.proc as proc

    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN, str(pidfile), str(ancestor.pid), proc.__file__])
    try:
        for _ in range(200):
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.05)
        worker = int(pidfile.read_text())
        (parent if kill == "parent" else ancestor).send_signal(signal.SIGKILL)
        for _ in range(100):
            if not pid_alive(worker):
                break
            time.sleep(0.05)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker outlived its parent")
    finally:
        for p in (parent, ancestor):
            p.kill()
            p.wait()


def test_bench_workers_are_told_whom_to_watch(monkeypatch, tmp_path):
    """`bench run --workers` passes its pid to the workers, which call die_with_parent."""
    from promptdelta.bench import run as bench_run

    called = []
    monkeypatch.setattr(bench_run, "die_with_parent", lambda: called.append(True))
    monkeypatch.setattr(bench_run, "run_run_bench", lambda *a: "")
    bench_run.main(["--suite", "s.yaml", "--claims", str(tmp_path)])
    assert called == [True]


def test_a_run_recorded_before_fast_dropout_resumes_with_torch_dropout(tiny_bert_dir, tmp_path, monkeypatch):
    """run.json written before train.fast_dropout existed: that run trained with torch's dropout, so resuming asks
    for fast_dropout false (named in the refusal) and then continues; it never refuses for good."""
    ckpt = crashed_run(tiny_bert_dir, tmp_path, monkeypatch)
    for folder in (tmp_path / "runs" / "x", tmp_path / "ckpt"):
        record = json.loads((folder / "run.json").read_text())
        del record["settings"]["train.fast_dropout"]
        record["config_hash"] = "recorded-before-the-key"
        (folder / "run.json").write_text(json.dumps(record))
    for state in (tmp_path / "ckpt").rglob("state.json"):           # the trainer's checkpoints, then and now
        data = json.loads(state.read_text())
        del data["config"]["fast_dropout"]
        state.write_text(json.dumps(data))
        manifest = json.loads((state.parent / "manifest.json").read_text())
        manifest["files"]["state.json"] = {"bytes": state.stat().st_size,
                                           "sha256": hashlib.sha256(state.read_bytes()).hexdigest()}
        (state.parent / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"train.fast_dropout: run False, now True"):
        run(make(tiny_bert_dir, tmp_path, "x", **ckpt, resume=True))
    done = run(make(tiny_bert_dir, tmp_path, "x", **ckpt, resume=True, fast_dropout=False))
    assert done["run_dir"] == str(tmp_path / "runs" / "x") and sorted(r["seed"] for r in done["rows"]) == SEEDS


def test_trainer_checkpoint_without_fast_dropout_reads_as_torch_dropout(tmp_path):
    from promptdelta.train.checkpoint import check_resume

    state = {"config": {"lr": 1e-3, "seed": 13}, "order": list(range(8))}       # written before the key existed
    check_resume(tmp_path, state, {"lr": 1e-3, "seed": 13, "fast_dropout": False}, 8)
    with pytest.raises(CheckpointError, match=r"fast_dropout: checkpoint False, now True"):
        check_resume(tmp_path, state, {"lr": 1e-3, "seed": 13, "fast_dropout": True}, 8)
