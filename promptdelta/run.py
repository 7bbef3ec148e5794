"""``promptdelta run``: few-shot prompt-based classification over several seeds, as one function.

For each seed: sample k-shot train/dev from the train pool, copy the backbone, build the template and
verbalizer, attach the delta, train with dev selection, evaluate on the full test split, and write
``runs/<name>/`` (resolved config, metrics.json, one delta checkpoint per seed). An existing run folder,
finished or not, is never touched without a flag: the run goes to the first free ``<name>-2``, ``<name>-3``...
-- except with ``overwrite=True`` (``--overwrite``), which replaces the named run, and with ``train.resume``,
which continues the run its checkpoints name. ``run --recipe auto`` takes its folder the same way
(``prepare_run_dir``); the folder used is said in one line.

Resume continues exactly the run it names, or refuses: at its start a run with a checkpoint folder writes
``run.json`` into both folders (each names the other, plus the config that decides the results), and
``--resume`` takes the run folder from the checkpoint folder's record, never from ``--name``. It refuses,
naming both folders, when the records disagree, when the checkpoint folder holds no record, or when any
setting that changes results (seeds, shots, lr, steps, ...) differs. Seeds already in metrics.json are
finished: they are taken from it, never retrained or rewritten; metrics.json is merged per seed.

Before anything trains, :func:`preflight` checks what would otherwise fail after training: the devices,
the output and checkpoint folders (writable folders with free space), the test labels, and sizes
(max_length, soft tokens, LoRA rank) against the backbone.

Training checkpoints (``train.checkpoint_dir``) go to one subfolder per seed, ``<checkpoint_dir>/seed<N>``,
so a resumed multi-seed run picks each seed up where it stopped (a finished seed resumes from its final
checkpoint and is only evaluated again). Under torchrun (``promptdelta run --nproc N``) every rank runs
every seed, data-parallel, and only rank 0 writes the run folder.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from promptdelta.config import RunConfig
from promptdelta.errors import CheckpointError, ConfigError, DataError, TemplateError
from promptdelta.train.distributed import env_is_main, mark_run_written
from promptdelta.utils.io import atomic_write_json, atomic_write_text
from promptdelta.utils.checks import check_device
from promptdelta.utils.seed import seed_everything

logger = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    import transformers

    import promptdelta

    return {"promptdelta": promptdelta.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def build_template(config: RunConfig, tokenizer, backbone=None):
    """The template of ``config`` (``template_type``, inline text or a template file, ``template_options``),
    through the prompt registry (``pd.build_template``)."""
    from promptdelta.prompts.registry import build_template as build, config_parts

    (kind, options), _ = config_parts(config)
    return build(kind, tokenizer, None, options, backbone)


def build_verbalizer(config: RunConfig, tokenizer, classes: list[str], backbone):
    """The verbalizer of ``config`` (label words from the config, a file, or the class names), through the
    prompt registry (``pd.build_verbalizer``); an unknown kind is an error listing the known ones."""
    from promptdelta.prompts.registry import build_verbalizer as build, config_parts

    _, (kind, options) = config_parts(config)
    return build(kind, tokenizer, classes, options, backbone)


def _make_free_run_dir(asked: Path) -> Path:
    """Make and return ``asked``, or the first of ``asked-2``, ``asked-3``... that does not exist yet. Each try
    is one ``mkdir`` (which fails on an existing path), so two runs started at once never share a folder."""
    path, i = asked, 2
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            path, i = asked.parent / f"{asked.name}-{i}", i + 1
        except OSError as err:
            raise ConfigError(f"run folder {str(path)!r} cannot be made ({err.strerror or err}); pass another "
                              "--output-dir") from None


# ---- resume: the run folder and the checkpoint folder name each other --------------------------------
RUN_RECORD = "run.json"
# Settings that may change on resume: where things go and how they are shown, never what is computed.
_RESUME_FREE = ("name", "output_dir", "train.resume", "train.progress", "train.device", "train.eval_batch_size",
                "train.checkpoint_dir", "train.checkpoint_every", "train.keep_checkpoints")

# Settings added after run records were first written, with the value that reproduces a run recorded before them
# (train.fast_dropout: older runs trained with torch's dropout), so an older run resumes exactly as it began.
_ADDED_LATER = {"train.fast_dropout": False}


def result_settings(config: RunConfig) -> dict[str, Any]:
    """The config as flat ``key`` / ``train.key`` items, less what may change on resume."""
    d = config.to_dict()
    flat = {k: v for k, v in d.items() if k != "train"}
    flat.update({f"train.{k}": v for k, v in d["train"].items()})
    return {k: v for k, v in flat.items() if k not in _RESUME_FREE}


def config_hash(config: RunConfig) -> str:
    """SHA-256 of :func:`result_settings` (canonical JSON): equal hashes, equal results."""
    text = json.dumps(result_settings(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((path / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _same_path(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and Path(a).resolve() == Path(b).resolve()


def resume_dir(config: RunConfig) -> Path:
    """The run folder ``--resume`` continues: the one the checkpoint folder's record names, once both records
    agree with each other and with ``config``. Raises CheckpointError naming both folders otherwise."""
    ckpt = Path(config.train.checkpoint_dir)
    record = _read_record(ckpt)
    if record is None:
        state = "does not exist" if not ckpt.exists() else "holds no run record (run.json)"
        raise CheckpointError(f"--resume: checkpoint folder {str(ckpt)!r} {state}, so there is no run to continue; "
                              "check --checkpoint-dir, or start a new run without --resume")
    run_dir = Path(str(record.get("run_dir")))
    if config.name is not None and not _same_path(str(Path(config.output_dir) / config.name), str(run_dir)):
        raise CheckpointError(f"--resume: checkpoint folder {str(ckpt)!r} belongs to run {str(run_dir)!r}, not to "
                              f"{str(Path(config.output_dir) / config.name)!r}; drop --name (the checkpoint "
                              "folder names its run) or pass the checkpoint folder of that run")
    back = _read_record(run_dir)
    if back is None or not _same_path(back.get("checkpoint_dir"), str(ckpt)):
        theirs = "has no run record" if back is None else f"records checkpoint folder {back.get('checkpoint_dir')!r}"
        raise CheckpointError(f"--resume: checkpoint folder {str(ckpt)!r} names run {str(run_dir)!r}, but that run "
                              f"{theirs}; they do not belong together: pass the run's own --checkpoint-dir")
    now, then = result_settings(config), dict(record.get("settings") or {})
    older = [k for k in _ADDED_LATER if then and k not in then]   # recorded before the key existed
    then.update({k: _ADDED_LATER[k] for k in older})
    diffs = [f"{k}: run {then.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(now) | set(then))
             if now.get(k) != then.get(k)]
    if diffs or (not older and record.get("config_hash") != config_hash(config)):
        raise CheckpointError(f"--resume: run {str(run_dir)!r} (checkpoints {str(ckpt)!r}) was started with other "
                              f"settings ({'; '.join(diffs[:6]) or 'config hash differs'}); resume with the same "
                              "settings, or start a new run without --resume")
    return run_dir


def _write_records(config: RunConfig, run_dir: Path) -> None:
    """``run.json`` in the run folder and, when there is one, in the checkpoint folder."""
    ckpt = config.train.checkpoint_dir
    record = {"run_dir": str(run_dir.resolve()), "checkpoint_dir": str(Path(ckpt).resolve()) if ckpt else None,
              "config_hash": config_hash(config), "settings": result_settings(config)}
    atomic_write_json(run_dir / RUN_RECORD, record)
    if ckpt:
        atomic_write_json(Path(ckpt) / RUN_RECORD, record)


def finished_rows(run_dir: Path | None) -> dict[int, dict[str, Any]]:
    """Seed -> metrics row already in ``run_dir/metrics.json`` (those seeds are finished)."""
    if run_dir is None:
        return {}
    try:
        rows = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")).get("rows", [])
    except (OSError, ValueError, AttributeError):
        return {}
    return {r["seed"]: r for r in rows if isinstance(r, dict) and isinstance(r.get("seed"), int)}


def _write_metrics(run_dir: Path, seeds: list[int], rows: dict[int, dict[str, Any]]) -> None:
    """metrics.json merged per seed: this run's seeds in order, then any other seed already there."""
    merged = {**finished_rows(run_dir), **rows}
    ordered = [merged[s] for s in seeds if s in merged] + [r for s, r in merged.items() if s not in seeds]
    atomic_write_json(run_dir / "metrics.json", {"rows": ordered, "summary": summarise(ordered),
                                                  "versions": _versions()})


# ---- checks before training ---------------------------------------------------------------------------
MIN_FREE_BYTES = 64 << 20          # a delta, metrics and checkpoints of a small run fit; less is a full disk


def check_writable(folder: Path, what: str, flag: str) -> None:
    """Raise ConfigError unless ``folder`` is (or can be made) a folder we can write a file into, with free space."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".promptdelta-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
        free = shutil.disk_usage(folder).free
    except OSError as err:
        raise ConfigError(f"{what} {str(folder)!r} is not a writable folder ({err.strerror or err}); pass "
                          f"another {flag}") from None
    if free < MIN_FREE_BYTES:
        raise ConfigError(f"{what} {str(folder)!r} has {free >> 20} MiB free, less than the {MIN_FREE_BYTES >> 20} "
                          f"MiB a run needs; free some space or pass another {flag}")


def check_test_labels(test) -> None:
    """Every test example needs a label: the run scores the test split after training."""
    missing = [ex for ex in test if getattr(ex, "label", None) is None]
    if missing:
        raise DataError(f"{len(missing)} of {len(test)} test examples have no label (first: "
                        f"{getattr(missing[0], 'guid', '?')!r}); promptdelta run scores the test split, so label "
                        "it, or train on a labelled split and label new texts with the saved delta")


def check_sizes(config: RunConfig, backbone) -> None:
    """max_length, soft tokens and LoRA rank against the backbone, before anything is allocated for them."""
    cfg = getattr(backbone, "config", None)
    positions = getattr(cfg, "max_position_embeddings", None)
    if isinstance(positions, int) and config.max_length > positions:
        raise ConfigError(f"max_length={config.max_length} exceeds the backbone's {positions} positions; use "
                          f"max_length <= {positions}")
    soft = config.template_options.get("num_tokens")
    if isinstance(soft, int) and not isinstance(soft, bool) and soft >= config.max_length:
        raise ConfigError(f"template_options.num_tokens={soft} soft tokens do not fit in max_length="
                          f"{config.max_length} (the input must fit too); use fewer, e.g. 20")
    from promptdelta.prompts.dsl import is_template_file, parse_template

    if not is_template_file(config.template):
        pieces = parse_template(config.template, require_mask=False)
        n_soft = sum(p.duplicate or 1 for p in pieces if p.kind == "soft")
        if n_soft >= config.max_length:
            raise ConfigError(f"the template holds {n_soft} soft tokens, which do not fit in max_length="
                              f"{config.max_length}; lower 'duplicate' or raise max_length")
    hidden = getattr(cfg, "hidden_size", None)
    r = config.delta.get("r") if isinstance(config.delta, dict) else None
    if isinstance(hidden, int) and isinstance(r, int) and not isinstance(r, bool) and r > hidden:
        raise ConfigError(f"delta r={r} is larger than the backbone's hidden size {hidden} (a rank above the "
                          f"layer width adds nothing but memory); use r <= {hidden}, typically 4-64")


def check_shows_input(template) -> None:
    """A template must show each example's text (a placeholder or meta piece), or every input looks alike."""
    pieces = getattr(template, "pieces", None)
    if pieces is not None and not any(p.kind in ("placeholder", "meta") for p in pieces):
        raise TemplateError(f"template {getattr(template, 'text', '')!r} never shows the input, so every example "
                            'gets the same prediction; add {"placeholder":"text_a"} where the text should go')


def preflight(config: RunConfig, write: bool) -> None:
    """Checks that need neither the backbone nor training: devices, writable folders, the data's test labels."""
    from promptdelta import data as pdata

    check_device(config.train.device)
    if write and env_is_main():
        check_writable(Path(config.output_dir), "output folder", "--output-dir")
    if config.train.checkpoint_dir and env_is_main():
        check_writable(Path(config.train.checkpoint_dir), "checkpoint folder", "--checkpoint-dir")
    _, _, test = pdata.load(config.data, shots=config.shots, seed=config.seeds[0], columns=config.columns or None)
    check_test_labels(test)


def run_state(run_dir: Path) -> str:
    """What an existing folder holds: "finished" (metrics.json has a row for every seed its config.yaml names),
    "unfinished" (a run that stopped before its last seed), or "not a run" (a file, or a folder with none of
    config.yaml, metrics.json, run.json; an empty folder counts as an unfinished run)."""
    names = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else None
    if names is None or (names and not names & {"config.yaml", "metrics.json", RUN_RECORD}):
        return "not a run"
    try:
        seeds = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")).get("seeds")
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        seeds = None
    done = finished_rows(run_dir)
    return "finished" if isinstance(seeds, list) and seeds and set(seeds) <= set(done) else "unfinished"


def _kept_note(asked: Path, state: str) -> str:
    """Why the run went to another folder than ``asked``, and how to get at the one that is there."""
    if state == "finished":
        return f"{asked} holds a finished run, kept; --overwrite replaces it"
    if state == "not a run":
        return f"{asked} exists and is not a run folder, kept"
    ckpt = (_read_record(asked) or {}).get("checkpoint_dir")
    how = f"--resume --checkpoint-dir {ckpt} continues it" if ckpt else "it has no checkpoints to resume"
    return f"{asked} holds an unfinished run, kept; {how}"


def _replace_run(run_dir: Path) -> None:
    """``--overwrite``: move a run folder aside (one rename: it is either whole or gone), then delete it."""
    if run_state(run_dir) == "not a run":
        raise ConfigError(f"--overwrite: {str(run_dir)!r} is not a run folder (no config.yaml, metrics.json or "
                          "run.json); it is left alone: pick another --name")
    old = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
    try:
        os.rename(run_dir, old)
    except OSError as err:
        raise ConfigError(f"--overwrite: run folder {str(run_dir)!r} cannot be replaced ({err.strerror or err}); "
                          "nothing was changed: pass another --name or --output-dir") from None
    logger.warning("--overwrite: replacing run %s", run_dir)
    try:
        shutil.rmtree(old)
    except OSError as err:   # the new run goes ahead: the old one is out of its way, only its space is not freed
        logger.warning("--overwrite: could not delete the replaced run, now %s (%s); remove it by hand", old, err)


def prepare_run_dir(config: RunConfig, overwrite: bool, echo: Callable[[str], None] | None = None) -> Path:
    """The run folder, made and recorded: resumed, replaced (``overwrite``), or ``runs/<name>`` when free, else
    the first free ``<name>-2``, ``<name>-3``... (an existing run, finished or not, is never touched without a
    flag). The folder used is said in one line through ``echo`` (logged when there is none)."""
    say = echo or logger.info
    if config.train.resume:
        run_dir = resume_dir(config)
        say(f"run folder: {run_dir} (resumed; checkpoints in {config.train.checkpoint_dir})")
        return run_dir
    asked = Path(config.output_dir) / (config.name or default_run_name(config))
    note = ""
    if overwrite and asked.exists():
        _replace_run(asked)
        note = "the run there was replaced: --overwrite"
    elif asked.exists() or asked.is_symlink():
        note = _kept_note(asked, run_state(asked))
    run_dir = _make_free_run_dir(asked)
    _write_records(config, run_dir)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    say(f"run folder: {run_dir}" + (f" ({note})" if note else ""))
    return run_dir


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
    from promptdelta.prompts.registry import build_classifier

    train, dev, test = pdata.load(config.data, shots=config.shots, seed=seed, columns=config.columns or None)
    seed_everything(seed)
    model = copy.deepcopy(base_model)
    template = build_template(config, tokenizer, model)
    check_shows_input(template)
    verbalizer = build_verbalizer(config, tokenizer, list(train.classes), model)
    apply_delta(model, config.delta)
    clf = build_classifier(model, tokenizer, list(train.classes), template, verbalizer,
                           max_length=config.max_length, readout=config.readout)
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
                save_seed(run_dir / f"seed{seed}", clf, trainer, config.train.resume)
    return row


def save_seed(seed_dir: Path, clf, trainer, overwrite: bool) -> None:
    """Write one seed as a classifier folder (``clf.save_pretrained``: template, verbalizer, deltas, tokenizer,
    backbone identity), plus its dev history; ``promptdelta predict --model <seed_dir>`` then serves it."""
    from promptdelta.prompts.registry import save_classifier

    save_classifier(clf, seed_dir, overwrite=overwrite, extra_files={"history.json": trainer.state.history})


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def stat(key: str) -> tuple[float, float]:
        vals = [r[key] for r in rows]
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    acc, f1 = stat("accuracy"), stat("macro_f1")
    out = {"accuracy_mean": acc[0], "accuracy_std": acc[1], "macro_f1_mean": f1[0], "macro_f1_std": f1[1],
           "train_time_s_mean": stat("train_time_s")[0], "seeds": len(rows)}
    return {**out, **best_seed(rows)}


def best_seed(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The seed to deploy, chosen on dev (never test): {"best_seed", "best_seed_dir", "best_dev_<metric>"};
    its folder ``seed<N>`` is a classifier for ``promptdelta predict --model``. Ties go to the first seed."""
    dev_key = next((k for k in rows[0] if k.startswith("dev_")), None) if rows else None
    scored = [r for r in rows if dev_key and isinstance(r.get(dev_key), (int, float))]
    if not scored:
        return {}
    best = max(scored, key=lambda r: r[dev_key])
    return {"best_seed": best["seed"], "best_seed_dir": f"seed{best['seed']}", f"best_{dev_key}": best[dev_key]}


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


def run(config: RunConfig, *, write: bool = True, echo: Callable[[str], None] | None = None,
        overwrite: bool = False) -> dict[str, Any]:
    """Run every seed of ``config``; returns ``{"run_dir", "rows", "summary", "table"}``.

    Only the main process writes (rank 0 under torchrun); the others return ``run_dir=None``. ``overwrite``
    replaces an existing run folder of the same name instead of writing ``<name>-2``; ``echo`` gets one line
    per seed and the line naming the run folder (``prepare_run_dir``)."""
    from promptdelta.backbones import load_backbone

    if overwrite and config.train.resume:
        raise ConfigError("--overwrite and --resume contradict each other: --resume continues a run, --overwrite "
                          "replaces it; pass one of them")
    # every rank refuses alike before anything loads (or is made), and skips the same finished seeds
    done = finished_rows(resume_dir(config)) if config.train.resume else {}
    preflight(config, write)
    base_model, tokenizer = load_backbone(config.backbone)
    check_sizes(config, base_model)
    run_dir = prepare_run_dir(config, overwrite, echo) if write and env_is_main() else None
    rows: dict[int, dict[str, Any]] = {}
    for seed in config.seeds:
        if seed in done:                        # finished: its files are final, never rewritten
            rows[seed] = done[seed]
            logger.info("seed %d finished earlier (in %s/metrics.json); kept as it is", seed, run_dir)
            continue
        row = run_one_seed(config, base_model, tokenizer, seed, run_dir)
        rows[seed] = row
        if echo and env_is_main():
            echo(f"seed {seed}: accuracy {row['accuracy']:.4f}  macro-F1 {row['macro_f1']:.4f}  "
                 f"({row['train_time_s']:.1f} s)")
        if run_dir is not None:
            _write_metrics(run_dir, config.seeds, rows)
    ordered = [rows[s] for s in config.seeds]
    summary = summarise(ordered)
    if run_dir is not None:                     # under `run --nproc N`: the launcher may check the run is whole
        mark_run_written(run_dir, config.seeds)
    return {"run_dir": str(run_dir) if run_dir else None, "rows": ordered, "summary": summary,
            "table": format_table(ordered, summary)}
