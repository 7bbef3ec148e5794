"""``promptdelta run``: few-shot prompt-based classification over several seeds, as one function.

For each seed: sample k-shot train/dev from the train pool, copy the backbone, build the template and
verbalizer, attach the delta, train with dev selection, evaluate on the full test split, and write
``runs/<name>/`` (resolved config, metrics.json, one delta checkpoint per seed). An existing run folder
is never overwritten: a new name with a numeric suffix is chosen -- except with ``train.resume``, which
continues the named run in its folder.

Training checkpoints (``train.checkpoint_dir``) go to one subfolder per seed, ``<checkpoint_dir>/seed<N>``,
so a resumed multi-seed run picks each seed up where it stopped (a finished seed resumes from its final
checkpoint and is only evaluated again). Under torchrun (``promptdelta run --nproc N``) every rank runs
every seed, data-parallel, and only rank 0 writes the run folder.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from promptdelta.config import RunConfig
from promptdelta.errors import ConfigError
from promptdelta.train.distributed import env_is_main
from promptdelta.utils.io import atomic_save_safetensors, atomic_write_json, atomic_write_text
from promptdelta.utils.seed import seed_everything

logger = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    import transformers

    import promptdelta

    return {"promptdelta": promptdelta.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def default_label_words(classes: list[str]) -> list[list[str]]:
    """One label word per class from its name: ``"Sci/Tech"`` -> ``["sci"]``, ``"positive"`` -> ``["positive"]``."""
    return [[re.split(r"[^0-9a-zA-Z]+", c.strip())[0].lower() or c] for c in classes]


def _options(kind: str, cls, options: dict[str, Any]) -> dict[str, Any]:
    """Check template/verbalizer options against the class's signature; unknown keys are named."""
    import inspect

    valid = set(inspect.signature(cls).parameters) - {"text", "tokenizer", "backbone", "classes", "label_words"}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(f"unknown {kind} option(s) {unknown} for {cls.__name__}; valid: {sorted(valid)}")
    return dict(options)


def build_template(config: RunConfig, tokenizer, backbone=None):
    """The template of ``config.template_type`` from inline text or a template file."""
    from promptdelta.prompts import ManualTemplate, MixedTemplate, PtuningTemplate, SoftTemplate

    cls = {"manual": ManualTemplate, "mixed": MixedTemplate, "soft": SoftTemplate,
           "ptuning": PtuningTemplate}[config.template_type]
    kw = _options("template", cls, config.template_options)
    if cls is not ManualTemplate:
        kw["backbone"] = backbone
    if Path(config.template).suffix in (".txt", ".tpl") or Path(config.template).is_file():
        return cls.from_file(config.template, choice=config.template_choice, tokenizer=tokenizer, **kw)
    return cls(config.template, tokenizer=tokenizer, **kw)


def build_verbalizer(config: RunConfig, tokenizer, classes: list[str], backbone):
    """The verbalizer of ``config.verbalizer``; label words from the config, a file, or the class names."""
    from promptdelta.prompts import KnowledgeableVerbalizer, ManualVerbalizer, ProtoVerbalizer, SoftVerbalizer

    opts = config.verbalizer_options
    if config.verbalizer == "kpt":
        kw = _options("verbalizer", KnowledgeableVerbalizer, opts)
        if isinstance(config.label_words, str):
            return KnowledgeableVerbalizer.from_file(config.label_words, tokenizer=tokenizer, classes=classes, **kw)
        return KnowledgeableVerbalizer(tokenizer, classes=classes,
                                       label_words=config.label_words or default_label_words(classes), **kw)
    if config.verbalizer == "proto":
        kw = _options("verbalizer", ProtoVerbalizer, opts)
        return ProtoVerbalizer(classes, hidden_size=backbone.config.hidden_size, **kw)

    words = config.label_words
    if isinstance(words, str):  # a verbalizer file
        manual = ManualVerbalizer.from_file(words, tokenizer=tokenizer, classes=classes,
                                            multi_token_handler=config.multi_token_handler)
        words = manual.label_words
    if words is None:
        words = default_label_words(classes)
    if config.verbalizer == "manual":
        return ManualVerbalizer(tokenizer, classes=classes, label_words=words,
                                multi_token_handler=config.multi_token_handler)
    return SoftVerbalizer(tokenizer, classes=classes, label_words=words, backbone=backbone)


def _free_run_dir(output_dir: Path, name: str, resume: bool = False) -> Path:
    """``output_dir/name``, or the first free ``name-2``, ``name-3``...; with ``resume`` the named folder itself."""
    if resume and (output_dir / name).is_dir():
        logger.info("resuming run %s in its folder", output_dir / name)
        return output_dir / name
    path, i = output_dir / name, 2
    while path.exists():
        path, i = output_dir / f"{name}-{i}", i + 1
    if path.name != name:
        logger.info("run folder %s exists; writing to %s instead (nothing is overwritten)",
                    output_dir / name, path)
    return path


def default_run_name(config: RunConfig) -> str:
    data = Path(config.data.replace("builtin:", "")).name or "data"
    method = config.delta["method"] if config.delta else "full"
    shots = f"{config.shots}shot" if config.shots else "full"
    return f"{data}-{method}-{config.verbalizer}-{shots}"


def count_trainable(module: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return trainable, total


def apply_delta(model: torch.nn.Module, delta: dict[str, Any] | None):
    """Attach ``delta`` ({"method": ..., **options}) to ``model``; returns its handle, or None.

    ``None`` leaves every weight trainable (full fine-tuning); ``{"method": "frozen"}`` freezes the whole
    backbone, so only the template's and verbalizer's own parameters train (prompt tuning, soft/proto
    verbalizers; a manual verbalizer and template then have nothing to train and are evaluated zero-shot).
    """
    from promptdelta.deltas import attach

    if not delta:
        return None
    if delta["method"] == "frozen":
        model.requires_grad_(False)
        return None
    return attach(model, delta["method"], **{k: v for k, v in delta.items() if k != "method"})


def fit_or_zero_shot(model: torch.nn.Module, train_config, train, dev, seed: int, lr: float | None = None):
    """A fitted Trainer; when ``model`` has nothing to train, a Trainer that only scored ``dev`` (zero-shot)."""
    from promptdelta.train import Trainer

    trainer = Trainer(model, train_config, seed=seed, **({} if lr is None else {"lr": lr}))
    if any(p.requires_grad for p in model.parameters()):
        return trainer.fit(train, dev)
    logger.info("nothing to train (frozen backbone, manual template and verbalizer): zero-shot evaluation")
    if dev:
        trainer.state.best_score = trainer.evaluate(dev)[train_config.metric]
    return trainer


def init_verbalizer(clf, config: RunConfig, train, dev, seed: int, train_config):
    """Apply ``config.verbalizer_init`` to a built prompt model; returns the TrainConfig to train it with.

    ``probe`` (LP-FT): the soft verbalizer's head becomes a logistic-regression probe of the frozen readout
    (C chosen on dev), and dev is also scored before the first step so the probe stays a selection candidate."""
    if config.verbalizer_init != "probe":
        return train_config
    from promptdelta.prompts.probe import probe_init

    probe_init(clf, train, dev, seed=seed, batch_size=train_config.eval_batch_size)
    return dataclasses.replace(train_config, eval_at_start=True)


def seed_train_config(config: RunConfig, seed: int):
    """``config.train`` with this seed's own checkpoint folder, ``<checkpoint_dir>/seed<seed>``."""
    if not config.train.checkpoint_dir:
        return config.train
    return dataclasses.replace(config.train, checkpoint_dir=str(Path(config.train.checkpoint_dir) / f"seed{seed}"))


def run_one_seed(config: RunConfig, base_model, tokenizer, seed: int, run_dir: Path | None) -> dict[str, Any]:
    """Train and evaluate one seed; returns its metrics row."""
    from promptdelta import data as pdata
    from promptdelta.prompts import PromptForClassification

    train, dev, test = pdata.load(config.data, shots=config.shots, seed=seed)
    seed_everything(seed)
    model = copy.deepcopy(base_model)
    template = build_template(config, tokenizer, model)
    verbalizer = build_verbalizer(config, tokenizer, list(train.classes), model)
    handle = apply_delta(model, config.delta)
    clf = PromptForClassification(model, template, verbalizer, max_length=config.max_length,
                                   readout=config.readout)
    trainable, total = count_trainable(clf)
    t0 = time.perf_counter()
    train_config = init_verbalizer(clf, config, train, dev, seed, seed_train_config(config, seed))
    trainer = fit_or_zero_shot(clf, train_config, train, dev, seed)
    train_s = time.perf_counter() - t0
    metrics = trainer.evaluate(test)
    row = {"seed": seed, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
           "trainable_params": trainable, "total_params": total, "train_time_s": train_s,
           "steps": trainer.state.step, "best_step": trainer.state.best_step,
           "dev_" + config.train.metric: trainer.state.best_score,
           "n_train": len(train), "n_dev": len(dev), "n_test": len(test)}
    if config.save_delta and (run_dir is not None or trainer.sharded):
        with trainer.consolidated():      # under FSDP every rank gathers the sharded weights; rank 0 writes
            if run_dir is not None:
                save_seed(run_dir / f"seed{seed}", handle, template, verbalizer, trainer, config.train.resume)
    return row


def save_seed(seed_dir: Path, handle, template, verbalizer, trainer, overwrite: bool) -> None:
    """Write one seed's delta, template/verbalizer tensors and dev history under ``seed_dir``."""
    if handle is not None:
        handle.save(seed_dir / "delta", overwrite=overwrite)
    prompt_state = {f"template.{k}": v for k, v in template.state_dict().items()}
    prompt_state.update({f"verbalizer.{k}": v for k, v in verbalizer.state_dict().items()})
    if prompt_state:
        atomic_save_safetensors(seed_dir / "prompt.safetensors", prompt_state)
    atomic_write_json(seed_dir / "history.json", trainer.state.history)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def stat(key: str) -> tuple[float, float]:
        vals = [r[key] for r in rows]
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    acc, f1 = stat("accuracy"), stat("macro_f1")
    return {"accuracy_mean": acc[0], "accuracy_std": acc[1], "macro_f1_mean": f1[0], "macro_f1_std": f1[1],
            "train_time_s_mean": stat("train_time_s")[0], "seeds": len(rows)}


def format_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    head = f"{'seed':>6} {'accuracy':>9} {'macro-F1':>9} {'trainable':>11} {'% model':>8} {'time (s)':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        pct = 100.0 * r["trainable_params"] / max(1, r["total_params"])
        lines.append(f"{r['seed']:>6} {r['accuracy']:>9.4f} {r['macro_f1']:>9.4f} {r['trainable_params']:>11,d} "
                     f"{pct:>7.3f}% {r['train_time_s']:>9.1f}")
    lines.append("-" * len(head))
    lines.append(f"{'mean':>6} {summary['accuracy_mean']:>9.4f} {summary['macro_f1_mean']:>9.4f}")
    lines.append(f"{'std':>6} {summary['accuracy_std']:>9.4f} {summary['macro_f1_std']:>9.4f}")
    return "\n".join(lines)


def run(config: RunConfig, *, write: bool = True, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every seed of ``config``; returns ``{"run_dir", "rows", "summary", "table"}``.

    Only the main process writes (rank 0 under torchrun); the others return ``run_dir=None``."""
    from promptdelta.backbones import load_backbone

    base_model, tokenizer = load_backbone(config.backbone)
    run_dir = None
    if write and env_is_main():
        name = config.name or default_run_name(config)
        run_dir = _free_run_dir(Path(config.output_dir), name, resume=config.train.resume)
        run_dir.mkdir(parents=True, exist_ok=config.train.resume)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    rows: list[dict[str, Any]] = []
    for seed in config.seeds:
        row = run_one_seed(config, base_model, tokenizer, seed, run_dir)
        rows.append(row)
        if echo and env_is_main():
            echo(f"seed {seed}: accuracy {row['accuracy']:.4f}  macro-F1 {row['macro_f1']:.4f}  "
                 f"({row['train_time_s']:.1f} s)")
        if run_dir is not None:
            atomic_write_json(run_dir / "metrics.json", {"rows": rows, "summary": summarise(rows),
                                                          "versions": _versions()})
    summary = summarise(rows)
    return {"run_dir": str(run_dir) if run_dir else None, "rows": rows, "summary": summary,
            "table": format_table(rows, summary)}
