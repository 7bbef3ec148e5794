"""Run a benchmark suite: every (task, method, shots, seed) once, one JSON line per finished run.

Protocol (LM-BFF, Gao et al. 2021): per seed, k examples per class for train and k per class for dev are
drawn from the train pool; model selection (best dev checkpoint, and the lr / C grid when given) uses dev
only; the reported figure is on the full test set. A row keeps the chosen value (``chosen``) and every grid
value's dev score (``grid_dev``), so a grid's choice can be checked and reused.

Results are appended with one ``os.write`` on an ``O_APPEND`` descriptor followed by ``fsync``, so a killed
suite leaves whole lines (a torn last line is dropped on the next start). Re-running a suite skips every
run whose key and config hash are already in the file: an interrupted suite resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import fcntl
import json
import logging
import os
import platform
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from promptdelta.bench.suite import RunSpec, Suite, load_suite
from promptdelta.data.examples import ExampleSet
from promptdelta.errors import ConfigError, DataError, PromptDeltaError
from promptdelta.utils.io import atomic_write_bytes
from promptdelta.utils.seed import seed_everything

logger = logging.getLogger(__name__)

Data = tuple[Any, Any, Any]   # (train, dev, test) ExampleSets


# ---------------------------------------------------------------------------------------- results file


def append_result(path: str | Path, row: dict[str, Any]) -> None:
    """Append one JSON line atomically: a single ``os.write`` on an O_APPEND fd, then fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row, sort_keys=True, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path} ({written} of {len(data)} bytes); check the disk space")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_results(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """Every row of a results file, in order. A torn last line (a killed write) is skipped with a warning,
    and removed from the file when ``repair``; a malformed line elsewhere raises DataError."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines[-1] != b""                    # a whole file ends with "\n": the last piece is empty
    rows = []
    for i, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i} is not a JSON line ({e}); delete that line (the run is then redone)") from e
    if torn:
        logger.warning("%s ends with an incomplete line (an interrupted write); ignoring it", path)
        if repair:
            atomic_write_bytes(path, data[:len(data) - len(lines[-1])])
    return rows


def latest_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run key: the last one written (a re-run after a config change supersedes the old row), at
    the place of the key's first row, so a report keeps the suite's method order after a partial re-run."""
    by_key: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_key[row["key"]] = row
    return list(by_key.values())


# ---------------------------------------------------------------------------------------------- metrics


class PeakMemory:
    """Peak memory over a block, in MiB above its start.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the process's resident set size sampled every
    ``interval`` s from /proc/self/statm (an estimate: allocations between samples can be missed).
    """

    def __init__(self, device: str = "cpu", interval: float = 0.01) -> None:
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_rss_sampled"
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, self._rss())

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self._max = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, self._rss())
        self.peak_mb = max(0, peak - self._start) / 2 ** 20


def versions() -> dict[str, str]:
    import sklearn
    import transformers

    import promptdelta

    return {"promptdelta": promptdelta.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "sklearn": sklearn.__version__,
            "python": platform.python_version()}


def _test_metrics(preds: Sequence[int], test: Any, eval_s: float) -> dict[str, float]:
    from promptdelta.train.trainer import compute_metrics

    m = compute_metrics([ex.label for ex in test], list(preds), num_classes=len(test.classes))
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "eval_examples_per_s": len(test) / max(eval_s, 1e-9)}


# ------------------------------------------------------------------------------------------ running


def load_task(suite: Suite, task: str, shots: int, seed: int) -> Data:
    """(train, dev, test) of ``task``: k-shot train and dev from the train pool, the full test split."""
    from promptdelta import data as pdata

    t = suite.tasks[task]
    train, dev, test = pdata.load(t["data"], shots=shots, seed=seed, columns=t.get("columns"),
                                  dev_shots=t.get("dev_shots"), split_names=t.get("split_names"),
                                  classes=t.get("classes"))
    n = t.get("test_subset")
    if n and int(n) < len(test):
        # one fixed random subset (seed 0, original order) for every method and seed: a time budget
        # departure from "the full test set" that the suite file must state; rows record n_test
        keep = sorted(random.Random(0).sample(range(len(test)), int(n)))
        test = ExampleSet([test[i] for i in keep], classes=test.classes, name=test.name)
    return train, dev, test


def build_prompt_model(suite: Suite, spec: RunSpec, base: torch.nn.Module, tokenizer: Any, classes: list[str],
                       lr: float | None = None) -> torch.nn.Module:
    """PromptForClassification = template x verbalizer x delta on a fresh copy of ``base``, assembled through
    the prompt registry exactly as ``promptdelta run`` does (same order, so the same seeded initialisation)."""
    from promptdelta.prompts.registry import build_classifier
    from promptdelta.run import apply_delta, build_template, build_verbalizer

    config = suite.run_config(spec.task, spec.method, spec.shots, spec.seed, lr)
    seed_everything(spec.seed)
    model = copy.deepcopy(base)
    template = build_template(config, tokenizer, model)
    verbalizer = build_verbalizer(config, tokenizer, classes, model)
    apply_delta(model, config.delta)
    return build_classifier(model, tokenizer, classes, template, verbalizer, max_length=config.max_length,
                            readout=config.readout)


def _make_model(suite: Suite, spec: RunSpec, base: torch.nn.Module, tokenizer: Any,
                classes: list[str]) -> Callable[[], torch.nn.Module]:
    kind = suite.methods[spec.method]["kind"]
    if kind == "prompt":
        return lambda: build_prompt_model(suite, spec, base, tokenizer, classes)
    from promptdelta.bench.baselines import build_head_model

    def make() -> torch.nn.Module:
        seed_everything(spec.seed)
        return build_head_model(kind, base, tokenizer, len(classes), suite.max_length, suite.methods[spec.method])
    return make


def training_memory_mb(make: Callable[[], torch.nn.Module], train: Any, batch_size: int) -> float | None:
    """Training memory of one step on a fresh model (MiB): parameters + gradients + AdamW state + activations
    saved for backward, counted by ``measure_training_memory`` on the first ``batch_size`` train examples.
    None when nothing trains (zero-shot). Unlike the process's RSS, this does not depend on what earlier runs
    of the same process left allocated."""
    from promptdelta.deltas.ladder import measure_training_memory

    model = make().train()
    if not any(p.requires_grad for p in model.parameters()):
        return None
    batch = model.collate(list(train)[:batch_size])
    return measure_training_memory(model, lambda: model.loss(batch)[0]).total / 2 ** 20


def run_trained(suite: Suite, spec: RunSpec, base: torch.nn.Module, tokenizer: Any, data: Data,
                make: Callable[[], torch.nn.Module] | None = None) -> dict[str, Any]:
    """Train each lr of the method's grid (default: its train.lr), keep the best on dev, test it. ``make``:
    builds a fresh model (default: the kind's own; bench/methods_harness.py passes its two-phase ones)."""
    from promptdelta.run import count_trainable, fit_or_zero_shot, init_verbalizer
    from promptdelta.train.config import TrainConfig

    train, dev, test = data
    make = make or _make_model(suite, spec, base, tokenizer, list(train.classes))
    kind = suite.methods[spec.method]["kind"]
    run_config = suite.run_config(spec.task, spec.method, spec.shots, spec.seed) if kind == "prompt" else None
    base_cfg = TrainConfig.from_dict(suite.method_train(spec.method))
    train_mem = training_memory_mb(make, train, base_cfg.batch_size)
    best, grid_s, grid_dev = None, 0.0, {}
    for lr in suite.methods[spec.method].get("lr_grid") or [base_cfg.lr]:
        model = make()
        with PeakMemory(base_cfg.device) as mem:
            t0, cfg = time.perf_counter(), base_cfg
            if kind == "prompt":                                    # e.g. a linear-probe head (LP-FT)
                cfg = init_verbalizer(model, run_config, train, dev, spec.seed, base_cfg)
            init_s = time.perf_counter() - t0
            trainer = fit_or_zero_shot(model, cfg, train, dev, spec.seed, lr=float(lr))
            trainer.train_time_s += init_s                          # fitting the probe is training time
        grid_s += trainer.train_time_s
        grid_dev[f"{float(lr):g}"] = trainer.state.best_score
        if best is None or trainer.state.best_score > best[0].state.best_score:
            best = (trainer, float(lr), mem.peak_mb, mem.kind)
        logger.info("%s lr=%g: dev %s %.4f", spec.key, lr, base_cfg.metric, trainer.state.best_score)
    trainer, lr, peak_mb, mem_kind = best
    t0 = time.perf_counter()
    preds = trainer.predict(test).tolist()
    trainable, total = count_trainable(trainer.model)
    return {**_test_metrics(preds, test, time.perf_counter() - t0), "dev_score": trainer.state.best_score,
            "dev_metric": base_cfg.metric, "chosen": {"lr": lr}, "grid_dev": grid_dev, "trainable_params": trainable,
            "total_params": total, "peak_mem_mb": peak_mb, "peak_mem_kind": mem_kind, "train_mem_mb": train_mem,
            "train_time_s": trainer.train_time_s, "grid_train_time_s": grid_s, "steps": trainer.state.step,
            "step_time_s": trainer.train_time_s / max(1, trainer.state.step)}


def run_logreg_spec(suite: Suite, spec: RunSpec, base: torch.nn.Module, tokenizer: Any, data: Data) -> dict[str, Any]:
    from promptdelta.bench.baselines import run_logreg

    train, dev, test = data
    with PeakMemory(suite.device) as mem:
        out = run_logreg(base, tokenizer, train, dev, test, suite.max_length, suite.methods[spec.method],
                         spec.seed, suite.device)
    return {**_test_metrics(out["preds"], test, out["eval_time_s"]), "dev_score": out["dev_score"],
            "dev_metric": "accuracy", "chosen": out["chosen"], "grid_dev": out["grid_dev"],
            "trainable_params": out["trainable_params"],
            "total_params": out["total_params"], "peak_mem_mb": mem.peak_mb, "peak_mem_kind": mem.kind,
            "train_mem_mb": None,
            "train_time_s": out["train_time_s"], "grid_train_time_s": out["train_time_s"], "steps": 0,
            "step_time_s": None}


def run_spec(suite: Suite, spec: RunSpec, base: torch.nn.Module, tokenizer: Any, data: Data,
             cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one cell of the grid and return its results row. ``cache_dir``: where two-phase kinds (ipt,
    multitask) keep what several runs share (default: nothing is kept)."""
    kind = suite.methods[spec.method]["kind"]
    runner = run_logreg_spec if kind == "logreg" else run_trained
    if kind in ("setfit", "peft", "recipe"):                  # the peers (own packages) and the auto recipe
        from promptdelta.bench.peers_harness import run_peer_spec as runner
    t0 = time.perf_counter()
    if kind in ("s3delta", "ipt", "multitask", "lmbff", "autoprompt"):   # issue 21's two-phase methods
        from promptdelta.bench.methods_harness import run_method_spec

        def runner(*args: Any) -> dict[str, Any]:
            return run_method_spec(*args, cache_dir=cache_dir)
    metrics = runner(suite, spec, base, tokenizer, data)
    metrics["wall_time_s"] = time.perf_counter() - t0         # the whole run: build, memory count, train, test
    train, dev, test = data
    return {"suite": suite.name, "key": spec.key, "config_hash": spec.config_hash, "task": spec.task,
            "method": spec.method, "kind": kind, "shots": spec.shots, "seed": spec.seed, **metrics,
            "trainable_pct": 100.0 * metrics["trainable_params"] / max(1, metrics["total_params"]),
            "n_train": len(train), "n_dev": len(dev), "n_test": len(test), "backbone": suite.backbone,
            "device": suite.device, "versions": versions(),
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def preflight(suite: Suite, specs: Sequence[RunSpec], base: torch.nn.Module, tokenizer: Any) -> None:
    """Before any training: load each task, build every prompt model once and run it on two examples, so
    a bad template, verbalizer, delta option or data source fails now, naming the task and method."""
    for task in dict.fromkeys(s.task for s in specs):
        first = next(s for s in specs if s.task == task)
        try:
            train, _, _ = load_task(suite, task, first.shots, first.seed)
        except Exception as e:
            cls = type(e) if isinstance(e, PromptDeltaError) else DataError
            raise cls(f"task {task!r} of suite {suite.name!r}: {e}") from e
        for method in dict.fromkeys(s.method for s in specs if s.task == task):
            if suite.methods[method]["kind"] != "prompt":
                continue
            try:
                model = build_prompt_model(suite, RunSpec(task, method, first.shots, first.seed, ""), base,
                                           tokenizer, list(train.classes))
                with torch.no_grad():
                    model.eval()(model.collate(list(train)[:2]))
            except Exception as e:
                raise ConfigError(f"method {method!r} on task {task!r} of suite {suite.name!r} cannot be built: "
                                  f"{type(e).__name__}: {e}") from e


def pending(suite: Suite, results: str | Path, only: Sequence[str] | None = None) -> tuple[list[RunSpec], int]:
    """(runs still to do, runs already finished) for ``suite`` and its results file."""
    specs = suite.expand(only)
    done = {(r.get("key"), r.get("config_hash")) for r in read_results(results)}
    done_keys = {k for k, _ in done}
    todo = [s for s in specs if (s.key, s.config_hash) not in done]
    for s in todo:
        if s.key in done_keys:
            logger.warning("%s: its config changed since it was recorded; running it again", s.key)
    return todo, len(specs) - len(todo)


def claims_dir(results: str | Path) -> Path:
    """The claims folder of a results file: ``.<name>.claims`` beside it, shared by every process using it."""
    results = Path(results)
    return results.parent / f".{results.name}.claims"


def _claim_path(claims: str | Path, spec: RunSpec) -> Path:
    return Path(claims) / (spec.key.replace("/", "__") + ".claim")


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie counts as dead: it does no more work)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                                  # someone else's live process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def claim_holder(claims: str | Path, spec: RunSpec) -> dict[str, Any] | None:
    """The live claim on ``spec`` (``{"pid", "host", ...}``), or None when it is free or its holder died."""
    try:
        held = json.loads(_claim_path(claims, spec).read_text(encoding="utf-8"))
        pid, host = int(held["pid"]), str(held["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None                                  # torn: its writer died between create and write
    if host == socket.gethostname() and not _pid_alive(pid):
        return None
    return held                                      # alive here, or on another host (cannot be checked)


def claim_run(claims: str | Path, spec: RunSpec) -> bool:
    """Claim ``spec`` for this process among every process sharing the ``claims`` folder (workers of one
    ``bench run --workers`` or independent ``bench run`` commands on one results file): True for exactly one.

    A claim is a file per run key made with ``O_CREAT | O_EXCL`` holding ``{"pid", "host"}``; a claim whose
    pid is dead on this host is stale and taken over. An ``flock`` on ``claims/.lock`` serialises the
    check-and-take, so two processes can never both take over one stale claim."""
    folder = Path(claims)
    folder.mkdir(parents=True, exist_ok=True)
    path = _claim_path(folder, spec)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)             # released when the file closes
        if path.exists():
            held = claim_holder(folder, spec)
            if held is not None:
                return False
            with contextlib.suppress(OSError):       # (it may have just been released)
                logger.warning("%s: taking over the stale claim of a dead process (%s)", spec.key,
                               path.read_text(encoding="utf-8", errors="replace").strip() or "empty")
            path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "config_hash": spec.config_hash,
                       "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}, f)
    return True


def release_claim(claims: str | Path, spec: RunSpec) -> None:
    """Drop this process's claim on ``spec`` (after its row is in the results file, or when it failed)."""
    with contextlib.suppress(FileNotFoundError):
        _claim_path(claims, spec).unlink()


def _finished(results: str | Path, spec: RunSpec) -> bool:
    """Whether ``spec`` (same key and config) is in ``results`` now: another process may have just done it."""
    return any(r.get("key") == spec.key and r.get("config_hash") == spec.config_hash for r in read_results(results))


def _cache_dir(results: str | Path) -> Path:
    """``<results stem>.cache/`` beside the results file: what two-phase kinds share between runs."""
    return Path(results).parent / f"{Path(results).stem}.cache"


def run_suite(suite: Suite | str | Path, results: str | Path, *, only: Sequence[str] | None = None,
              after_run: Callable[[dict[str, Any]], None] | None = None,
              echo: Callable[[str], None] | None = None, claims: str | Path | None = None,
              check: bool = True) -> list[dict[str, Any]]:
    """Run every unfinished run of ``suite``, appending a line to ``results`` after each; returns the new rows.

    ``after_run(row)`` is called after each line is written (progress, or a test's simulated crash).
    ``claims``: the folder of run claims shared by every process on ``results`` (default
    :func:`claims_dir`); each run is done by the first process to claim it, and skipped when the results
    file, re-read just before it starts, already holds it. ``check=False`` skips the preflight (the parent
    of the workers did it once).
    """
    from promptdelta.backbones import load_backbone

    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    read_results(results, repair=True)
    todo, finished = pending(suite, results, only)
    from promptdelta.bench.peers_harness import skip_missing_peers
    todo = skip_missing_peers(suite, todo, echo or (lambda s: logger.warning("%s", s)))
    say = echo or (lambda s: logger.info("%s", s))
    say(f"suite {suite.name}: {finished + len(todo)} runs, {finished} already in {results}, {len(todo)} to run")
    if not todo:
        return []
    base, tokenizer = load_backbone(suite.backbone)
    if check:
        preflight(suite, todo, base, tokenizer)
    rows, cached = [], (None, None)
    claims = Path(claims) if claims is not None else claims_dir(results)
    for i, spec in enumerate(todo, 1):
        if not claim_run(claims, spec):
            held = claim_holder(claims, spec) or {}
            say(f"[{i}/{len(todo)}] {spec.key}: being run by pid {held.get('pid')} on {held.get('host')}; skipped")
            continue
        try:
            if _finished(results, spec):              # done by another process since this one started
                continue
            split = (spec.task, spec.shots, spec.seed)
            if cached[0] != split:
                cached = (split, load_task(suite, *split))
            row = run_spec(suite, spec, base, tokenizer, cached[1], _cache_dir(results))
            append_result(results, row)
        finally:
            release_claim(claims, spec)
        rows.append(row)
        say(f"[{i}/{len(todo)}] {spec.key}: accuracy {row['accuracy']:.4f} macro-F1 {row['macro_f1']:.4f} "
            f"({row['grid_train_time_s']:.1f} s)")
        if after_run is not None:
            after_run(row)
    return rows
