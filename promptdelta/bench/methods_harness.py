"""Issue 21's two-phase methods as harness kinds: ``kind: s3delta``, ``ipt``, ``multitask``, ``lmbff``,
``autoprompt``.

Each first finds something on data other than the task's test split, then trains an ordinary prompt model
(the method's template x verbalizer, the suite's train settings, dev selection) through
:func:`promptdelta.bench.harness.run_trained`, so its row has every field of a prompt row plus its own:

- s3delta (Hu et al. 2022): the gated super-network of (layer, LoRA | adapter | BitFit) candidates is
  trained on the task's train split under the budget (``search:``), scored on dev (``search_dev``); its
  emitted plan (``emitted``: plain ``attach`` calls, ``plan_cost`` <= ``budget``) is attached to a fresh
  backbone and trained as usual.
- ipt (Qin et al. 2021): a prefix prompt (``subspace.num_tokens``) is trained on each SOURCE task (default:
  every other task of the suite whose data differs from this task's; never the task under test), all
  starting from one initialisation so they differ by what each task taught; ``fit_subspace`` finds a
  ``dim``-dimensional subspace of them; on the task only z (``dim`` numbers) and the verbalizer's head train.
- lmbff (Gao et al. 2021): label words searched on the frozen backbone (top-``k`` per class by the train
  log-likelihood, combinations ranked by zero-shot dev accuracy; ``label_search:``) replace the task's
  (``label_words``, ``search_dev``, ``candidates`` in the row); the row then trains as a prompt row would.
- autoprompt (Shin et al. 2020): ``triggers.n`` trigger slots before the mask of the task's template,
  filled by the gradient-guided search on train (frozen backbone, the row's verbalizer); the found manual
  template (``template``, ``trigger_tokens``, ``search_loss`` in the row) is the row's template.
- multitask: one delta + one shared soft prompt trained over the source tasks with structured templates
  (``Task: <name>. Labels: <words>.`` before each task's own template) and the task-mixing sampler
  (``prompts/multitask.py``), then transferred: the task's model starts from that delta and prompt.

What the source tasks give (prompts, subspaces, multi-task deltas) depends only on them and the seed, so it
is cached in ``cache_dir`` (``<results>.cache/`` beside the results file): a suite trains each once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from promptdelta.bench.suite import RunSpec, Suite
from promptdelta.errors import ConfigError
from promptdelta.utils.io import atomic_save_safetensors
from promptdelta.utils.seed import seed_everything

SEARCH_KEYS = {"budget", "steps", "lr", "gate_lr", "penalty", "methods", "targets", "r", "alpha", "bottleneck"}
SUBSPACE_KEYS = {"dim", "method", "num_tokens"}
MULTITASK_KEYS = {"num_soft_tokens", "steps", "lr", "temperature"}
LABEL_SEARCH_KEYS = {"k", "max_combos"}
TRIGGER_KEYS = {"n", "iters", "num_candidates", "batch_size"}
Data = tuple[Any, Any, Any]


def check_method(suite: Suite, name: str) -> None:
    """Validate a method of one of these kinds (nested keys, source tasks) when the suite loads."""
    m = suite.methods[name]
    nested = {"search": SEARCH_KEYS, "subspace": SUBSPACE_KEYS, "multitask": MULTITASK_KEYS,
              "label_search": LABEL_SEARCH_KEYS, "triggers": TRIGGER_KEYS}
    for key, valid in nested.items():
        if key in m:
            if not isinstance(m[key], dict) or set(m[key]) - valid:
                raise ConfigError(f"method {name!r}: {key}: must be a mapping with keys from {sorted(valid)}, got "
                                  f"{m[key]!r}")
    if m["kind"] == "s3delta" and not isinstance(m.get("search", {}).get("budget"), int):
        raise ConfigError(f"method {name!r} (kind s3delta) needs search: {{budget: N}}, the trainable-parameter "
                          f"budget of the emitted delta, e.g. search: {{budget: 40000, steps: 30}}")
    if "source_tasks" in m:
        st = m["source_tasks"]
        if not isinstance(st, list) or not st or any(t not in suite.tasks for t in st):
            raise ConfigError(f"method {name!r}: source_tasks={st!r} must be a non-empty list of this suite's "
                              f"tasks {list(suite.tasks)} (leave it out for every other task)")
    if m["kind"] in ("ipt", "multitask"):
        for t in suite.tasks:
            if not source_tasks(suite, name, t):
                raise ConfigError(f"method {name!r} on task {t!r}: no source task left (sources never include "
                                  f"the task under test or a task on the same data); add tasks or source_tasks")


def source_tasks(suite: Suite, method: str, task: str) -> list[str]:
    """The tasks whose training data a method may use for ``task``: its ``source_tasks`` (default: all), less
    ``task`` itself and any task reading the same data (e.g. sst2-t2 for sst2: same texts, other template)."""
    chosen = suite.methods[method].get("source_tasks") or list(suite.tasks)
    data = suite.data_as_written.get(task, suite.tasks[task]["data"])
    return [t for t in chosen if t != task and suite.data_as_written.get(t, suite.tasks[t]["data"]) != data]


def source_fingerprint(suite: Suite, method: str, task: str) -> dict[str, Any]:
    """The source tasks' entries (as written), for the config hash: a changed source re-runs the row."""
    return {t: {**suite.tasks[t], "data": suite.data_as_written.get(t, suite.tasks[t]["data"])}
            for t in source_tasks(suite, method, task)}


def source_splits(suite: Suite, task: str, shots: int, seed: int) -> tuple[Any, Any]:
    """(train, dev) of a source task; its test split is dropped here, so no phase can read it."""
    from promptdelta.bench import harness

    train, dev, _ = harness.load_task(suite, task, shots, seed)
    return train, dev


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _publish(folder: Path, write: Callable[[Path], Any]) -> None:
    """Fill a temporary folder with ``write(tmp)``, then rename it to ``folder`` in one step, so a reader (another
    worker of the suite) sees the whole folder or none; when another worker published it first, keep theirs."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name[:40]}-", dir=folder.parent))
    try:
        write(tmp)
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prompt_model(suite: Suite, task: str, method: str, shots: int, seed: int, base: torch.nn.Module,
                  tokenizer: Any, classes: list[str], attach: Callable[[torch.nn.Module], Any],
                  structured: dict[str, str] | None = None, soft_tokens: int = 0,
                  overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """The method's template x verbalizer on ``task`` over a fresh copy of ``base``, deltas from ``attach``
    (called right after a re-seed, so every task's delta starts from the same initialisation)."""
    from promptdelta.prompts.registry import build_classifier
    from promptdelta.run import build_template, build_verbalizer

    config = suite.run_config(task, method, shots, seed)
    if structured is not None:                     # multitask: "Task: ... Labels: ..." before the template
        from promptdelta.config import RunConfig
        from promptdelta.prompts.multitask import structured_text

        d = {**config.to_dict(), "template": structured_text(structured, list(structured), config.template),
             "template_type": "soft", "template_options": {"num_tokens": soft_tokens}}
        config = RunConfig.from_dict(d)
    if overrides:                                  # lmbff's words, autoprompt's template
        config = config.with_overrides(**overrides)
    seed_everything(seed)
    model = copy.deepcopy(base)
    template = build_template(config, tokenizer, model)
    verbalizer = build_verbalizer(config, tokenizer, classes, model)
    seed_everything(seed)
    attach(model)
    return build_classifier(model, tokenizer, classes, template, verbalizer, max_length=config.max_length,
                            readout=config.readout)


def _train_config(suite: Suite, method: str, overrides: dict[str, Any] | None = None):
    from promptdelta.train.config import TrainConfig

    return TrainConfig.from_dict({**suite.method_train(method), **(overrides or {})})


# ------------------------------------------------------------------------------------------------ s3delta


def prepare_s3delta(suite: Suite, spec: RunSpec, base: torch.nn.Module, tokenizer: Any, train: Any, dev: Any
                    ) -> tuple[Callable[[], torch.nn.Module], dict[str, Any]]:
    """Search on ``train`` (scored on ``dev``), emit the plan; returns (fresh model with the plan, row fields)."""
    from promptdelta.deltas import attach
    from promptdelta.deltas.s3delta import apply_plan, emit_plan, search
    from promptdelta.train import Trainer

    opts = dict(suite.methods[spec.method]["search"])
    budget, steps = int(opts.pop("budget")), int(opts.pop("steps", 30))
    lrs = {k: float(opts.pop(k)) for k in ("lr", "gate_lr", "penalty") if k in opts}
    classes, handle = list(train.classes), {}
    model = _prompt_model(suite, spec.task, spec.method, spec.shots, spec.seed, base, tokenizer, classes,
                          lambda m: handle.setdefault("h", attach(m, "s3delta", **opts)))
    cfg = _train_config(suite, spec.method)
    rng, examples = random.Random(spec.seed), list(train)
    batches = (model.collate(rng.sample(examples, min(cfg.batch_size, len(examples)))) for _ in range(steps))
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(("template.", "verbalizer."))]
    t0 = time.perf_counter()
    model.train()
    losses = search(handle["h"], lambda b: model.loss(b)[0], batches, budget, extra_params=head,
                    extra_lr=cfg.head_lr, **lrs)
    search_s = time.perf_counter() - t0
    search_dev = Trainer(model, cfg, seed=spec.seed).evaluate(dev)[cfg.metric] if len(dev) else None
    plan = emit_plan(handle["h"], budget)
    info = {"budget": budget, "emitted": plan.calls, "plan_cost": plan.cost, "search_dev": search_dev,
            "search_time_s": search_s, "search_loss": [losses[0], losses[-1]] if losses else []}

    def make() -> torch.nn.Module:
        return _prompt_model(suite, spec.task, spec.method, spec.shots, spec.seed, base, tokenizer, classes,
                             lambda m: apply_plan(m, plan))
    return make, info


# ---------------------------------------------------------------------------------------------------- ipt


def _source_prompt(suite: Suite, spec: RunSpec, src: str, base: torch.nn.Module, tokenizer: Any,
                   cache: Path) -> torch.Tensor:
    """The trained prefix prompt (D,) of source task ``src`` for this seed (cached)."""
    from safetensors.torch import load_file

    from promptdelta.deltas import attach
    from promptdelta.deltas.ipt import prompt_vector
    from promptdelta.run import fit_or_zero_shot

    m = suite.methods[spec.method]
    n_tok = int(m.get("subspace", {}).get("num_tokens", 10))
    key = _hash({"task": source_fingerprint(suite, spec.method, spec.task).get(src), "n": n_tok, "seed": spec.seed,
                 "shots": spec.shots, "train": {**suite.method_train(spec.method), **m.get("source_train", {})},
                 "prompt": {k: m.get(k) for k in ("template", "verbalizer", "readout", "verbalizer_options")},
                 "backbone": suite.backbone, "max_length": suite.max_length})
    path = cache / "ipt" / f"{src}-seed{spec.seed}-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["prompt"]
    train, dev = source_splits(suite, src, spec.shots, spec.seed)
    handle = {}
    model = _prompt_model(suite, src, spec.method, spec.shots, spec.seed, base, tokenizer, list(train.classes),
                          lambda mod: handle.setdefault("h", attach(mod, "prefix", num_tokens=n_tok)))
    fit_or_zero_shot(model, _train_config(suite, spec.method, m.get("source_train")), train, dev, spec.seed)
    prompt = prompt_vector(handle["h"]).detach().float().contiguous()
    atomic_save_safetensors(path, {"prompt": prompt}, metadata={"task": src, "seed": str(spec.seed)})
    return prompt


def _subspace_folder(suite: Suite, spec: RunSpec, base: torch.nn.Module, tokenizer: Any, cache: Path
                     ) -> tuple[Path, list[str]]:
    """Fit (or reuse) the subspace of the source tasks' prompts; returns its folder and the sources."""
    from promptdelta.deltas.ipt import fit_subspace, prompt_layout

    sub = suite.methods[spec.method].get("subspace", {})
    dim, how, n_tok = int(sub.get("dim", 3)), str(sub.get("method", "pca")), int(sub.get("num_tokens", 10))
    sources = source_tasks(suite, spec.method, spec.task)
    prompts = torch.stack([_source_prompt(suite, spec, s, base, tokenizer, cache) for s in sources])   # (n, D)
    key = _hash({"prompts": hashlib.sha256(prompts.numpy().tobytes()).hexdigest(), "dim": dim, "method": how})
    folder = cache / "ipt" / f"subspace-{'+'.join(sources)}-seed{spec.seed}-{key}"
    if not folder.is_dir():
        subspace, _ = fit_subspace(prompts, prompt_layout(base, n_tok), dim=dim, method=how, seed=spec.seed)
        _publish(folder, lambda tmp: subspace.save(tmp, overwrite=True))
    return folder, sources


def prepare_ipt(suite: Suite, spec: RunSpec, base: torch.nn.Module, tokenizer: Any, train: Any, dev: Any,
                cache: Path) -> tuple[Callable[[], torch.nn.Module], dict[str, Any]]:
    """The subspace of the other tasks' prompts; the model tunes z only (plus the verbalizer's head)."""
    from promptdelta.deltas import attach
    from promptdelta.deltas.ipt import subspace_digest

    t0 = time.perf_counter()
    folder, sources = _subspace_folder(suite, spec, base, tokenizer, cache)
    info = {"source_tasks": sources, "subspace": folder.name, "subspace_sha256": subspace_digest(folder),
            "source_time_s": time.perf_counter() - t0}

    def make() -> torch.nn.Module:
        model = _prompt_model(suite, spec.task, spec.method, spec.shots, spec.seed, base, tokenizer,
                              list(train.classes), lambda m: attach(m, "ipt", subspace=str(folder)))
        info["delta_params"] = sum(p.numel() for n, p in model.named_parameters()
                                   if p.requires_grad and not n.startswith(("template.", "verbalizer.")))
        return model
    return make, info


# ---------------------------------------------------------------------------------------------- multitask


def _fields(suite: Suite, task: str, classes: list[str]) -> dict[str, str]:
    """The structured fields of ``task``: its name and its label words (first word per class)."""
    words = suite.tasks[task].get("label_words")
    if isinstance(words, dict):
        words = [words[c] for c in classes] if set(classes) <= set(words) else list(words.values())
    firsts = [w[0] if isinstance(w, list) else str(w) for w in words] if isinstance(words, list | dict) else classes
    return {"task": task, "labels": ", ".join(map(str, firsts))}


def _multitask_folder(suite: Suite, spec: RunSpec, base: torch.nn.Module, tokenizer: Any, cache: Path
                      ) -> tuple[Path, list[str]]:
    """Train (or reuse) one delta + one soft prompt over the source tasks; returns the folder and the sources."""
    from promptdelta.deltas import deltas_of
    from promptdelta.prompts.multitask import MultiTaskPrompt, TaskSpec
    from promptdelta.run import apply_delta, build_verbalizer

    m = suite.methods[spec.method]
    mt = {"num_soft_tokens": 8, "steps": 120, "lr": 1e-3, "temperature": 2.0, **m.get("multitask", {})}
    sources = source_tasks(suite, spec.method, spec.task)
    key = _hash({"sources": source_fingerprint(suite, spec.method, spec.task), "seed": spec.seed, "mt": mt,
                 "shots": spec.shots, "method": {k: v for k, v in m.items() if k not in ("train", "lr_grid")},
                 "backbone": suite.backbone, "max_length": suite.max_length})
    folder = cache / "multitask" / f"{'+'.join(sources)}-seed{spec.seed}-{key}"
    if folder.is_dir():
        return folder, sources
    seed_everything(spec.seed)
    model = copy.deepcopy(base)
    apply_delta(model, m["delta"])
    multi = MultiTaskPrompt(model, tokenizer, [], num_soft_tokens=int(mt["num_soft_tokens"]), keys=("task", "labels"),
                            readout=m.get("readout", "mask"), max_length=suite.max_length)
    for src in sources:
        train, dev = source_splits(suite, src, spec.shots, spec.seed)
        config = suite.run_config(src, spec.method, spec.shots, spec.seed)
        fields = _fields(suite, src, list(train.classes))
        words = [[w] for w in fields["labels"].split(", ")]
        multi.add_task(TaskSpec(src, list(train), list(train.classes), words, list(dev), fields, body=config.template),
                       verbalizer=build_verbalizer(config, tokenizer, list(train.classes), model))
    multi.train_steps(int(mt["steps"]), lr=float(mt["lr"]), batch_size=_train_config(suite, spec.method).batch_size,
                      temperature=float(mt["temperature"]), seed=spec.seed)
    (handle,) = deltas_of(model).values()

    def write(tmp: Path) -> None:
        handle.save(tmp / "delta")
        atomic_save_safetensors(tmp / "soft_prompt.safetensors", {"soft_prompt": multi.soft_prompt.detach()})
    _publish(folder, write)
    return folder, sources


def prepare_multitask(suite: Suite, spec: RunSpec, base: torch.nn.Module, tokenizer: Any, train: Any, dev: Any,
                      cache: Path) -> tuple[Callable[[], torch.nn.Module], dict[str, Any]]:
    """Multi-task training over the source tasks, then transfer: the task starts from its delta and prompt."""
    from safetensors.torch import load_file

    from promptdelta.deltas import load_delta

    t0 = time.perf_counter()
    folder, sources = _multitask_folder(suite, spec, base, tokenizer, cache)
    soft = load_file(str(folder / "soft_prompt.safetensors"))["soft_prompt"]                # (n, H)
    info = {"source_tasks": sources, "multitask": folder.name, "source_time_s": time.perf_counter() - t0}
    fields = _fields(suite, spec.task, list(train.classes))

    def make() -> torch.nn.Module:
        clf = _prompt_model(suite, spec.task, spec.method, spec.shots, spec.seed, base, tokenizer,
                            list(train.classes), lambda m: load_delta(m, folder / "delta"), structured=fields,
                            soft_tokens=soft.shape[0])
        with torch.no_grad():
            clf.template.soft_embeds.copy_(soft)
        return clf
    return make, info


# -------------------------------------------------------------------------------------------------- lmbff


def prepare_lmbff(suite: Suite, spec: RunSpec, base: torch.nn.Module, tokenizer: Any, train: Any, dev: Any
                  ) -> tuple[Callable[[], torch.nn.Module], dict[str, Any]]:
    """LM-BFF's label-word search on the frozen backbone (top-k words per class on train, combinations ranked
    by zero-shot dev accuracy); the best combination is the row's verbalizer, trained with the row's delta."""
    from promptdelta.prompts.lmbff import search_label_words
    from promptdelta.run import apply_delta, build_template

    m = suite.methods[spec.method]
    opts = {"k": 4, "max_combos": 10000, **m.get("label_search", {})}
    config = suite.run_config(spec.task, spec.method, spec.shots, spec.seed)
    classes = list(train.classes)
    t0 = time.perf_counter()
    found = search_label_words(base, tokenizer, build_template(config, tokenizer, base), list(train), list(dev),
                               classes, k=int(opts["k"]), n_best=1, max_combos=int(opts["max_combos"]),
                               readout=config.readout)
    words = [[w] for w in found.combos[0]]
    info = {"label_words": dict(zip(classes, found.combos[0])), "search_dev": found.dev_accuracy[0],
            "candidates": found.candidates, "search_time_s": time.perf_counter() - t0}

    def make() -> torch.nn.Module:
        return _prompt_model(suite, spec.task, spec.method, spec.shots, spec.seed, base, tokenizer, classes,
                             lambda mod: apply_delta(mod, config.delta), overrides={"label_words": words})
    return make, info


def prepare_autoprompt(suite: Suite, spec: RunSpec, base: torch.nn.Module, tokenizer: Any, train: Any, dev: Any
                       ) -> tuple[Callable[[], torch.nn.Module], dict[str, Any]]:
    """AutoPrompt's trigger search on the frozen backbone: ``n`` trigger slots before the task template's mask,
    searched on train with the row's verbalizer; the found manual template is the row's, trained as usual."""
    from promptdelta.prompts.autoprompt import TRIGGER, AutoPrompt
    from promptdelta.prompts.lmbff import accuracy
    from promptdelta.run import apply_delta, build_verbalizer

    opts = {"n": 3, "iters": 9, "num_candidates": 10, "batch_size": 16,
            **suite.methods[spec.method].get("triggers", {})}
    config = suite.run_config(spec.task, spec.method, spec.shots, spec.seed)
    if config.template.count('{"mask"}') != 1:
        raise ConfigError(f"method {spec.method!r} (kind autoprompt) on task {spec.task!r}: the template needs one "
                          f'{{"mask"}} to put the triggers before; got {config.template!r}')
    text = config.template.replace('{"mask"}', " ".join([TRIGGER] * int(opts["n"])) + ' {"mask"}')
    classes, frozen = list(train.classes), copy.deepcopy(base)         # the search never touches the shared base
    t0 = time.perf_counter()
    search = AutoPrompt(frozen, tokenizer, build_verbalizer(config, tokenizer, classes, frozen), text,
                        num_candidates=int(opts["num_candidates"]), max_length=suite.max_length,
                        readout=config.readout)
    found = search.search(list(train), iters=int(opts["iters"]), batch_size=int(opts["batch_size"]), seed=spec.seed)
    info = {"template": found.template, "trigger_tokens": found.trigger_tokens,   # search_dev: zero-shot, found
            "search_loss": [found.initial_loss, found.final_loss], "search_time_s": time.perf_counter() - t0,
            "search_dev": accuracy(search.clf, list(dev)) if len(dev) else None}

    def make() -> torch.nn.Module:
        return _prompt_model(suite, spec.task, spec.method, spec.shots, spec.seed, base, tokenizer, classes,
                             lambda mod: apply_delta(mod, config.delta), overrides={"template": found.template})
    return make, info


# ---------------------------------------------------------------------------------------------- runner


def run_method_spec(suite: Suite, spec: RunSpec, base: torch.nn.Module, tokenizer: Any, data: Data,
                    cache_dir: str | Path | None = None) -> dict[str, Any]:
    """One row of kind s3delta, ipt, multitask, lmbff or autoprompt: the method's first phase, then ``run_trained`` on its model."""
    from promptdelta.bench.harness import run_trained

    kind = suite.methods[spec.method]["kind"]
    train, dev, test = data
    with tempfile.TemporaryDirectory() as tmp:   # no results folder (a direct call): cache for this row only
        cache = Path(cache_dir) if cache_dir is not None else Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        if kind == "s3delta":
            make, info = prepare_s3delta(suite, spec, base, tokenizer, train, dev)
        elif kind == "autoprompt":
            make, info = prepare_autoprompt(suite, spec, base, tokenizer, train, dev)
        elif kind == "lmbff":
            make, info = prepare_lmbff(suite, spec, base, tokenizer, train, dev)
        elif kind == "ipt":
            make, info = prepare_ipt(suite, spec, base, tokenizer, train, dev, cache)
        else:
            make, info = prepare_multitask(suite, spec, base, tokenizer, train, dev, cache)
        row = run_trained(suite, spec, base, tokenizer, (train, dev, test), make=make)
    return {**row, **info}
