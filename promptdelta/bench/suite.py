"""Benchmark suites: a YAML file of tasks x methods x shots x seeds, validated before anything trains.

A suite file::

    name: core
    backbone: minilm              # preset, local HF folder (relative paths: next to the YAML, else cwd)
    shots: 16                     # int or list; k per class for train and k per class for dev (LM-BFF)
    seeds: [13, 21, 42, 87, 100]
    max_length: 128
    device: cpu
    train: {batch_size: 8}        # TrainConfig defaults for every method (a method's train: overrides)
    tasks:
      sst2:
        data: ../shared/data/sst2  # data folder, CSV, datasets folder/name, builtin:demo
        template: '{"placeholder":"text_a"} It was {"mask"}.'
        label_words: {negative: [bad], positive: [good]}
        columns: {text: sentence}  # optional, as promptdelta.data.load
        shots: 8                   # optional: this task's shots (int or list) instead of the suite's
        dev_shots: 4               # optional: dev examples per class (default: shots)
    methods:
      lora-manual:                 # kind: prompt (the default) = template x verbalizer x delta
        verbalizer: manual
        delta: {method: lora, r: 8}
        train: {lr: 1.0e-3, max_steps: 200}
        lr_grid: [3.0e-4, 1.0e-3]  # optional: each lr is trained, the best on dev is tested
      full-ft: {kind: finetune}    # baselines: finetune | head | logreg
      logreg: {kind: logreg, C_grid: [0.1, 1.0, 10.0]}

Every unknown key, kind, task or method raises :class:`ConfigError` naming it and the valid choices.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from promptdelta.config import DEFAULT_SEEDS, DEFAULT_TEMPLATE, RunConfig, load_yaml
from promptdelta.errors import ConfigError, MissingFileError
from promptdelta.train.config import TrainConfig

SUITE_KEYS = {"name", "backbone", "shots", "seeds", "max_length", "device", "train", "tasks", "methods", "note"}
TASK_KEYS = {"data", "template", "label_words", "columns", "split_names", "classes", "test_subset", "note", "shots",
             "dev_shots"}
KINDS = ("prompt", "finetune", "head", "logreg", "setfit", "peft", "recipe",   # setfit..recipe: peers_harness.py
         "s3delta", "ipt", "multitask", "lmbff", "autoprompt")                  # bench/methods_harness.py
_COMMON = {"kind", "note"}
_PROMPT_ROW = {"template", "verbalizer", "verbalizer_options", "label_words", "readout", "train", "lr_grid"}
METHOD_KEYS = {
    "prompt": _COMMON | {"template", "template_type", "template_options", "verbalizer", "verbalizer_options",
                         "label_words", "multi_token_handler", "readout", "verbalizer_init", "delta", "train",
                         "lr_grid"},
    "finetune": _COMMON | {"train", "lr_grid", "pooling", "dropout"},
    "head": _COMMON | {"train", "lr_grid", "pooling", "dropout"},
    "logreg": _COMMON | {"C", "C_grid", "max_iter", "batch_size"},
    "setfit": _COMMON | {"num_iterations", "num_epochs", "batch_size", "body_lr", "head_C", "max_iter"},
    "peft": _COMMON | {"r", "alpha", "dropout", "target_modules", "lr", "epochs", "batch_size", "weight_decay"},
    "recipe": _COMMON | {"budget_s", "candidates", "refit"},
    # issue 21 (bench/methods_harness.py): a prompt row's keys plus the method's first phase
    "s3delta": _COMMON | _PROMPT_ROW | {"search"},
    "ipt": _COMMON | _PROMPT_ROW | {"source_tasks", "subspace", "source_train"},
    "multitask": _COMMON | _PROMPT_ROW | {"source_tasks", "delta", "multitask"},
    "lmbff": _COMMON | _PROMPT_ROW | {"delta", "label_search"},
    "autoprompt": _COMMON | _PROMPT_ROW | {"delta", "triggers"},
}
POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: a task, a method, a shot count and a seed."""

    task: str
    method: str
    shots: int
    seed: int
    config_hash: str

    @property
    def key(self) -> str:
        return f"{self.task}/{self.method}/{self.shots}shot/seed{self.seed}"


@dataclass
class Suite:
    """A validated suite. ``tasks`` and ``methods`` map names to their (checked) option dicts."""

    name: str
    tasks: dict[str, dict[str, Any]]
    methods: dict[str, dict[str, Any]]
    backbone: str = "minilm"
    shots: list[int] = field(default_factory=lambda: [16])
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    max_length: int = 128
    device: str = "cpu"
    train: dict[str, Any] = field(default_factory=dict)
    source: str = "<dict>"
    data_as_written: dict[str, str] = field(default_factory=dict)  # task -> its data: as the YAML says

    def task_shots(self, task: str) -> list[int]:
        """The task's own shots when it sets them, else the suite's."""
        return self.tasks[task].get("shots", self.shots)

    def method_train(self, method: str, lr: float | None = None) -> dict[str, Any]:
        """TrainConfig keys for ``method``: suite defaults, then the method's, then ``lr`` when given."""
        d = {"progress": False, "device": self.device, **self.train, **self.methods[method].get("train", {})}
        if lr is not None:
            d["lr"] = lr
        return d

    def run_config(self, task: str, method: str, shots: int, seed: int, lr: float | None = None) -> RunConfig:
        """The RunConfig of a prompt method on a task (the method's template/label words win over the task's)."""
        t, m = self.tasks[task], self.methods[method]
        d = {"backbone": self.backbone, "data": t["data"], "shots": shots, "seeds": [seed],
             "max_length": self.max_length, "save_delta": False, "train": self.method_train(method, lr),
             "template": m.get("template", t.get("template", DEFAULT_TEMPLATE)),
             "label_words": m.get("label_words", t.get("label_words")), "delta": m.get("delta", "none")}
        for key in ("template_type", "template_options", "verbalizer", "verbalizer_options", "multi_token_handler",
                    "readout", "verbalizer_init"):
            if key in m:
                d[key] = m[key]
        if isinstance(d["label_words"], str):  # a verbalizer file; "{task}" stands for the task's name
            d["label_words"] = self._resolve(d["label_words"].replace("{task}", task))
        return RunConfig.from_dict(d)

    def _resolve(self, path: str) -> str:
        """A relative path next to the suite file when it exists there, else as given (from the cwd)."""
        here = Path(str(self.source)).parent / path if self.source else None
        return str(here) if here is not None and not Path(path).is_absolute() and here.exists() else path

    def config_hash(self, task: str, method: str) -> str:
        """Hash of everything that decides a run's result besides shots and seed (not the device). The task's
        data counts as written in the suite, not where it resolved on this machine, so the hash is the same on
        every machine and a report can select the current rows without the data."""
        t = {**self.tasks[task], "data": self.data_as_written.get(task, self.tasks[task]["data"])}
        t.pop("shots", None)  # in the run key already; a per-task shots must not re-hash the other shot counts
        d = {"task": t, "method": self.methods[method], "backbone": self.backbone,
             "max_length": self.max_length, "train": self.train}
        if self.methods[method]["kind"] in ("ipt", "multitask"):   # their rows depend on the source tasks too
            from promptdelta.bench.methods_harness import source_fingerprint

            d["sources"] = source_fingerprint(self, method, task)
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def expand(self, only: Sequence[str] | None = None) -> list[RunSpec]:
        """Every run, ordered task > shots > seed > method (so one data split serves all methods)."""
        specs = [RunSpec(t, m, k, s, self.config_hash(t, m))
                 for t in self.tasks for k in self.task_shots(t) for s in self.seeds for m in self.methods]
        return select(specs, only, self) if only else specs


def select(specs: list[RunSpec], only: Sequence[str], suite: Suite) -> list[RunSpec]:
    """Keep runs whose task, method or ``task/method`` matches a pattern of ``only`` (fnmatch)."""
    def hit(spec: RunSpec, pat: str) -> bool:
        return any(fnmatch.fnmatchcase(s, pat) for s in (spec.task, spec.method, f"{spec.task}/{spec.method}"))

    for pat in only:
        if not any(hit(s, pat) for s in specs):
            raise ConfigError(f"--only {pat!r} matches no task or method of suite {suite.name!r}; tasks: "
                              f"{list(suite.tasks)}, methods: {list(suite.methods)} (patterns: name, "
                              f"task/method, or fnmatch wildcards such as 'lora-*')")
    return [s for s in specs if any(hit(s, p) for p in only)]


# --------------------------------------------------------------------------------------------- loading


def load_suite(path: str | Path, check_data: bool = True) -> Suite:
    """Read and validate a suite YAML file; relative data/backbone paths resolve next to the file, else cwd.
    ``check_data=False`` (reports) accepts data paths that do not exist here."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"suite file {path} does not exist; pass an existing YAML file "
                               "(see examples/bench/)")
    try:  # strict: duplicate keys and alias bombs are ConfigErrors too
        raw = load_yaml(path.read_text(encoding="utf-8"), f"suite file {path}")
    except UnicodeDecodeError as e:
        raise ConfigError(f"suite file {path} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"suite file {path} is not valid YAML: {first}; fix the syntax") from None
    return suite_from_dict(raw, source=str(path), base_dir=path.parent, check_data=check_data)


def suite_from_dict(raw: Any, source: str = "<dict>", base_dir: Path | None = None, check_data: bool = True) -> Suite:
    """Validate a suite mapping (see the module docstring) and return a :class:`Suite`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"suite {source} must be a mapping with tasks: and methods:, got {type(raw).__name__}")
    _unknown(raw, SUITE_KEYS, f"suite {source}")
    for key in ("tasks", "methods"):
        if not isinstance(raw.get(key), dict) or not raw[key]:
            raise ConfigError(f"suite {source} needs a non-empty '{key}:' mapping of names to options "
                              f"(see examples/bench/tiny.yaml)")
    tasks = {str(n): _check_task(str(n), t, source, base_dir, check_data) for n, t in raw["tasks"].items()}
    as_written = {str(n): str(t["data"] if isinstance(t, dict) else t) for n, t in raw["tasks"].items()}
    methods = {str(n): _check_method(str(n), m, source) for n, m in raw["methods"].items()}
    train = dict(raw.get("train") or {})
    suite = Suite(name=str(raw.get("name") or Path(source).stem), tasks=tasks, methods=methods,
                  backbone=_resolve(str(raw.get("backbone", "minilm")), base_dir),
                  shots=_int_list(raw.get("shots", 16), "shots", source),
                  seeds=_int_list(raw.get("seeds", DEFAULT_SEEDS), "seeds", source),
                  max_length=int(raw.get("max_length", 128)), device=str(raw.get("device", "cpu")),
                  train=train, source=source, data_as_written=as_written)
    _check_combinations(suite)
    return suite


def _unknown(d: dict, valid: set[str], where: str) -> None:
    unknown = sorted(set(map(str, d)) - valid)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(valid)}")


def _int_list(value: Any, what: str, source: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < (0 if what == "seeds" else 1)
                         for v in values):
        raise ConfigError(f"{what}: {value!r} in suite {source} must be a positive integer or a non-empty "
                          f"list of them, e.g. {what}: {[16] if what == 'shots' else DEFAULT_SEEDS}")
    return list(values)


def _resolve(value: str, base_dir: Path | None) -> str:
    """A relative path that exists next to the suite file becomes absolute; anything else is kept."""
    if base_dir is not None and not Path(value).is_absolute() and (base_dir / value).exists():
        return str((base_dir / value).resolve())
    return value


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or value.endswith((".csv", ".jsonl", ".json"))


def _check_task(name: str, task: Any, source: str, base_dir: Path | None, check_data: bool = True) -> dict[str, Any]:
    if isinstance(task, str):
        task = {"data": task}
    if not isinstance(task, dict) or "data" not in task:
        raise ConfigError(f"task {name!r} in suite {source} needs a 'data:' source (data folder, CSV, "
                          f"datasets name or builtin:demo), e.g. {name}: {{data: ../shared/data/{name}}}")
    _unknown(task, TASK_KEYS, f"task {name!r} of suite {source}")
    task = copy.deepcopy(task)
    for key in ("shots", "dev_shots"):
        if key in task:
            task[key] = _int_list(task[key], key, f"{source} (task {name!r})")
            if key == "dev_shots" and len(task[key]) != 1:
                raise ConfigError(f"task {name!r}: dev_shots must be one integer (dev examples per class), got "
                                  f"{task[key]}")
    task["dev_shots"] = task["dev_shots"][0] if "dev_shots" in task else None
    if task["dev_shots"] is None:
        del task["dev_shots"]
    task["data"] = _resolve(str(task["data"]), base_dir)
    if check_data and _looks_like_path(task["data"]) and not Path(task["data"]).expanduser().exists():
        raise MissingFileError(f"task {name!r}: data {task['data']!r} does not exist (relative paths are "
                               f"tried next to the suite file, then from the current folder); fix the path")
    return task


def _check_method(name: str, method: Any, source: str) -> dict[str, Any]:
    method = {} if method is None else method
    if not isinstance(method, dict):
        raise ConfigError(f"method {name!r} in suite {source} must be a mapping of options, e.g. "
                          f"{{kind: prompt, verbalizer: manual, delta: lora}}")
    kind = method.get("kind", "prompt")
    if kind not in KINDS:
        raise ConfigError(f"method {name!r} has unknown kind {kind!r}; choose one of {list(KINDS)} "
                          f"(prompt = template x verbalizer x delta; the others are baselines)")
    _unknown(method, METHOD_KEYS[kind], f"method {name!r} (kind {kind}) of suite {source}")
    method = {**copy.deepcopy(method), "kind": kind}
    TrainConfig.from_dict({**method.get("train", {}), "progress": False})   # unknown train keys fail here
    for grid in ("lr_grid", "C_grid"):
        vals = method.get(grid)
        if vals is not None and (not isinstance(vals, list) or not vals
                                 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
                                        for v in vals)):
            raise ConfigError(f"method {name!r}: {grid}={vals!r} must be a non-empty list of positive numbers, "
                              f"e.g. {grid}: [1.0e-4, 1.0e-3]")
    if method.get("pooling", "cls") not in POOLINGS:
        raise ConfigError(f"method {name!r}: pooling={method['pooling']!r} is unknown; use one of {list(POOLINGS)}")
    return method


def _check_combinations(suite: Suite) -> None:
    """Build the RunConfig of every prompt method x task and check each delta method is registered."""
    import promptdelta.deltas  # noqa: F401  (registers the methods)
    from promptdelta.deltas.base import get_delta_method

    TrainConfig.from_dict({**suite.train, "progress": False})
    for m, opts in suite.methods.items():
        if opts["kind"] in ("s3delta", "ipt", "multitask", "lmbff", "autoprompt"):
            from promptdelta.bench.methods_harness import check_method

            check_method(suite, m)
        elif opts["kind"] != "prompt":
            continue
        for t in suite.tasks:
            try:
                config = suite.run_config(t, m, suite.shots[0], suite.seeds[0])
            except ConfigError as e:
                raise ConfigError(f"method {m!r} on task {t!r} of suite {suite.source}: {e}") from e
        if config.delta and config.delta["method"] != "frozen":
            try:
                get_delta_method(config.delta["method"])
            except Exception as e:
                raise ConfigError(f"method {m!r} of suite {suite.source}: {e}") from e
