"""The peers as harness methods: ``kind: setfit`` and ``kind: peft``, run through their own packages.

Both run on the harness's (train, dev, test) splits and seeds, on the suite's backbone (exported to an HF
folder with ``base.to_hf()``), and return the same row fields as ``run_logreg_spec``, plus ``peer`` = the
package versions and the exact arguments passed, so a row says what was run.

- setfit (Tunstall et al. 2022): sentence-transformers fine-tuned on sampled same/different-class pairs with
  cosine-similarity regression, then a logistic head on its embeddings. ``num_iterations`` pairs per example.
- peft (Hu et al. 2021, LoRA through ``peft.get_peft_model``) + a linear head on the mean-pooled states,
  trained with AdamW; the epoch with the best dev accuracy is tested.

They are an optional extra (``pip install promptdelta[peers]``): ``missing_extra(kind)`` names what is
absent, and the harness skips such methods with that message instead of failing the suite.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from promptdelta.errors import BackboneError, ConfigError
from promptdelta.utils.seed import seed_everything

PEER_KINDS = ("setfit", "peft", "recipe")        # recipe: promptdelta's own auto recipe, run the same way
REQUIRES = {"setfit": ("setfit", "sentence_transformers", "datasets"), "peft": ("peft",)}
SETFIT_KEYS = {"num_iterations", "num_epochs", "batch_size", "body_lr", "head_C", "max_iter"}
PEFT_KEYS = {"r", "alpha", "dropout", "target_modules", "lr", "epochs", "batch_size", "weight_decay"}


def missing_extra(kind: str) -> str | None:
    """None when ``kind``'s packages import, else a one-line message naming them and the install command."""
    absent = [m for m in REQUIRES.get(kind, ()) if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    return (f"method kind {kind!r} needs {', '.join(absent)} (not installed); install the extra with "
            f"`pip install promptdelta[peers]` or `pip install {' '.join(absent)}`")


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return "unknown"


def _texts(examples: Sequence[Any], sep: str) -> list[str]:
    """One string per example; a pair task joins its two texts with the tokenizer's separator."""
    return [ex.text_a if not getattr(ex, "text_b", None) else f"{ex.text_a} {sep} {ex.text_b}" for ex in examples]


def _hf_folder(base: nn.Module, tokenizer: Any, folder: Path) -> Path:
    """The native backbone written as an HF folder (weights + tokenizer) that the peers load."""
    if not hasattr(base, "to_hf"):
        raise BackboneError(f"{type(base).__name__} has no to_hf(), so the peers cannot load it; use a "
                            f"BERT/RoBERTa/GPT-2/T5/Llama backbone for kind setfit/peft")
    base.to_hf().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _accuracy(preds: Sequence[int], examples: Sequence[Any]) -> float:
    return float(np.mean(np.asarray(preds) == np.asarray([ex.label for ex in examples]))) if len(examples) else 0.0


def _unknown(options: dict[str, Any], keys: set[str], kind: str) -> None:
    extra = sorted(set(options) - keys - {"kind", "note"})
    if extra:
        raise ConfigError(f"unknown option(s) {extra} for kind {kind}; valid: {sorted(keys)}")


# ------------------------------------------------------------------------------------------------ setfit


def run_setfit(base: nn.Module, tokenizer: Any, data: tuple, max_length: int, options: dict[str, Any],
               seed: int) -> dict[str, Any]:
    """SetFit through the ``setfit`` package; the head's C is chosen on dev from ``head_C`` (a list)."""
    _unknown(options, SETFIT_KEYS, "setfit")
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, models
    from setfit import SetFitModel, Trainer, TrainingArguments
    from sklearn.linear_model import LogisticRegression

    train, dev, test = data
    sep = tokenizer.sep_token or " "
    args = {"num_iterations": int(options.get("num_iterations", 20)), "num_epochs": int(options.get("num_epochs", 1)),
            "batch_size": int(options.get("batch_size", 16)), "body_learning_rate": float(options.get("body_lr", 2e-5)),
            "max_length": max_length, "seed": seed}
    grid = [float(c) for c in (options.get("head_C") or [1.0])]
    seed_everything(seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _hf_folder(copy.deepcopy(base), tokenizer, Path(tmp) / "hf")
        word = models.Transformer(str(folder), max_seq_length=max_length)
        dim = getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension
        body = SentenceTransformer(modules=[word, models.Pooling(dim(), "mean")], device="cpu")
        model = SetFitModel(model_body=body, model_head=LogisticRegression(max_iter=int(options.get("max_iter", 1000))))
        ds = Dataset.from_dict({"text": _texts(train, sep), "label": [ex.label for ex in train]})
        targs = TrainingArguments(output_dir=str(Path(tmp) / "out"), report_to="none", save_strategy="no",
                                  **{k: v for k, v in args.items()})
        t0 = time.perf_counter()
        Trainer(model=model, args=targs, train_dataset=ds).train()
        # the body is now tuned; the head's C is picked on dev (the embeddings are computed once)
        x_train = model.model_body.encode(_texts(train, sep), convert_to_numpy=True)
        x_dev = model.model_body.encode(_texts(dev, sep), convert_to_numpy=True)
        best, grid_dev = None, {}
        for c in grid:
            head = LogisticRegression(C=c, max_iter=int(options.get("max_iter", 1000)), random_state=seed)
            head.fit(x_train, [ex.label for ex in train])
            grid_dev[f"{c:g}"] = _accuracy(head.predict(x_dev), dev) if len(dev) else 0.0
            if best is None or grid_dev[f"{c:g}"] > grid_dev[f"{best[1]:g}"]:
                best = (head, c)
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        preds = best[0].predict(model.model_body.encode(_texts(test, sep), convert_to_numpy=True)).tolist()
        eval_s = time.perf_counter() - t1
        n_body = sum(p.numel() for p in model.model_body.parameters())
    n_head = int(best[0].coef_.size + best[0].intercept_.size)
    return {"preds": preds, "dev_score": grid_dev[f"{best[1]:g}"], "chosen": {"head_C": best[1]},
            "grid_dev": grid_dev, "train_time_s": train_s, "eval_time_s": eval_s, "steps": 0,
            "trainable_params": n_body + n_head, "total_params": n_body + n_head,
            "peer": {"package": "setfit", "versions": {m: _version(m) for m in REQUIRES["setfit"]},
                     "args": {**args, "head_C": grid, "pooling": "mean", "pair_sep": sep}}}


# -------------------------------------------------------------------------------------------------- peft


class _PeftHead(nn.Module):
    """peft-wrapped HF encoder -> mean pool (B, H) -> linear (B, C)."""

    def __init__(self, encoder: nn.Module, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(hidden, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * m).sum(1) / m.sum(1).clamp(min=1.0))


def run_peft(base: nn.Module, tokenizer: Any, data: tuple, max_length: int, options: dict[str, Any],
             seed: int) -> dict[str, Any]:
    """LoRA through ``peft.get_peft_model`` + a linear head; the best-dev epoch's weights are tested."""
    _unknown(options, PEFT_KEYS, "peft")
    import peft
    from transformers import AutoModel

    train, dev, test = data
    sep = tokenizer.sep_token or " "
    args = {"r": int(options.get("r", 8)), "lora_alpha": int(options.get("alpha", 16)),
            "lora_dropout": float(options.get("dropout", 0.0)),
            "target_modules": list(options.get("target_modules") or ["query", "value"])}
    fit = {"lr": float(options.get("lr", 1e-3)), "epochs": int(options.get("epochs", 20)),
           "batch_size": int(options.get("batch_size", 8)), "weight_decay": float(options.get("weight_decay", 0.0))}
    seed_everything(seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _hf_folder(copy.deepcopy(base), tokenizer, Path(tmp) / "hf")
        encoder = AutoModel.from_pretrained(folder)
    try:
        encoder = peft.get_peft_model(encoder, peft.LoraConfig(**args))
    except ValueError as e:
        raise ConfigError(f"peft LoRA on {type(encoder).__name__}: {e}; set target_modules to its "
                          f"attention projections") from e
    model = _PeftHead(encoder, encoder.config.hidden_size, len(train.classes))

    def batches(examples: Sequence[Any], shuffle: bool) -> Any:
        order = torch.randperm(len(examples)).tolist() if shuffle else list(range(len(examples)))
        for i in range(0, len(order), fit["batch_size"]):
            chunk = [examples[j] for j in order[i:i + fit["batch_size"]]]
            enc = tokenizer(_texts(chunk, sep), padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            yield enc["input_ids"], enc["attention_mask"], torch.tensor([ex.label for ex in chunk])

    @torch.no_grad()
    def predict(examples: Sequence[Any]) -> list[int]:
        model.eval()
        return [p for ids, mask, _ in batches(examples, False) for p in model(ids, mask).argmax(-1).tolist()]

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=fit["lr"], weight_decay=fit["weight_decay"])
    best_score, best_state, best_epoch, steps, dev_curve = -1.0, None, 0, 0, {}
    t0 = time.perf_counter()
    for epoch in range(1, fit["epochs"] + 1):
        model.train()
        for ids, mask, labels in batches(list(train), True):
            loss = nn.functional.cross_entropy(model(ids, mask), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        score = _accuracy(predict(list(dev)), dev)
        dev_curve[str(epoch)] = score
        if score > best_score:       # keep only the trainable tensors of the best epoch
            best_score, best_epoch = score, epoch
            best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.load_state_dict(best_state, strict=False)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    preds = predict(list(test))
    eval_s = time.perf_counter() - t1
    return {"preds": preds, "dev_score": best_score, "chosen": {"epoch": best_epoch, "lr": fit["lr"]},
            "grid_dev": dev_curve, "train_time_s": train_s, "eval_time_s": eval_s, "steps": steps,
            "trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in model.parameters()),
            "peer": {"package": "peft", "versions": {"peft": _version("peft")},
                     "args": {**args, **fit, "pooling": "mean", "pair_sep": sep}}}


def run_recipe_cell(base: nn.Module, tokenizer: Any, data: tuple, max_length: int, options: dict[str, Any],
                    seed: int, task: dict[str, Any]) -> dict[str, Any]:
    """``kind: recipe``: promptdelta's auto recipe (recipe.py) with the task's template and label words."""
    from promptdelta.recipe import CANDIDATES, DEFAULT_TEMPLATE, auto_recipe

    train, dev, test = data
    words = task.get("label_words")
    if isinstance(words, dict):                        # {class: [words]} -> one list per class, in class order
        words = [words[c] for c in train.classes]
    candidates = list(options.get("candidates") or CANDIDATES)
    t0 = time.perf_counter()
    out = auto_recipe(base, tokenizer, train, dev, budget_s=float(options.get("budget_s", 1800)), seed=seed,
                      template=task.get("template") or DEFAULT_TEMPLATE, label_words=words,
                      candidates=candidates, max_length=max_length, refit=bool(options.get("refit", True)),
                      echo=lambda s: None)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    preds = out.predict(list(test))
    n = sum(p.numel() for p in base.parameters())
    # what the chosen predictor trained: whole bodies (setfit, and an ensemble holding it), else a head/delta
    body = out.chosen in ("setfit", "ensemble")
    head = len(train.classes) * (base.config.hidden_size + 1)
    return {"preds": preds, "dev_score": out.dev_score, "chosen": {"candidate": out.chosen},
            "grid_dev": {r["name"]: r["dev"] for r in out.table if r["name"] != "refit"}, "train_time_s": train_s,
            "eval_time_s": time.perf_counter() - t1, "steps": 0, "trainable_params": n + head if body else head,
            "total_params": n + head,
            "peer": {"package": "promptdelta.recipe", "args": {"candidates": candidates, "budget_s": out.budget_s,
                                                              "refit": out.refit, "table": out.table}}}


RUNNERS = {"setfit": run_setfit, "peft": run_peft, "recipe": run_recipe_cell}


def run_peer_spec(suite: Any, spec: Any, base: nn.Module, tokenizer: Any, data: tuple) -> dict[str, Any]:
    """One harness cell of a peer method: the row fields ``run_logreg_spec`` gives, plus ``peer``."""
    from promptdelta.bench.harness import PeakMemory, _test_metrics

    options = suite.methods[spec.method]
    kind = options["kind"]
    message = missing_extra(kind)
    if message:
        raise ConfigError(message)
    with PeakMemory(suite.device) as mem:
        extra = {"task": suite.tasks[spec.task]} if kind == "recipe" else {}
        out = RUNNERS[kind](base, tokenizer, data, suite.max_length, dict(options), spec.seed, **extra)
    return {**_test_metrics(out["preds"], data[2], out["eval_time_s"]), "dev_score": out["dev_score"],
            "dev_metric": "accuracy", "chosen": out["chosen"], "grid_dev": out["grid_dev"],
            "trainable_params": out["trainable_params"], "total_params": out["total_params"],
            "peak_mem_mb": mem.peak_mb, "peak_mem_kind": mem.kind, "train_mem_mb": None,
            "train_time_s": out["train_time_s"], "grid_train_time_s": out["train_time_s"], "steps": out["steps"],
            "step_time_s": out["train_time_s"] / out["steps"] if out["steps"] else None, "peer": out["peer"]}


def skip_missing_peers(suite: Any, todo: list[Any], say: Any) -> list[Any]:
    """``todo`` without the runs of peer methods whose extra is missing; says once per method why."""
    keep, told = [], set()
    for spec in todo:
        message = missing_extra(suite.methods[spec.method]["kind"])
        if message is None:
            keep.append(spec)
        elif spec.method not in told:
            told.add(spec.method)
            say(f"skipping method {spec.method!r}: {message}")
    return keep
