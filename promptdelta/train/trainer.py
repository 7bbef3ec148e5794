"""The training loop: AdamW, warm-up + linear decay, clipping, dev selection, early stopping.

Works with any model that offers ``collate(examples) -> batch``, ``loss(batch) -> (loss, logits)`` and
``forward(batch) -> logits`` (e.g. :class:`promptdelta.PromptForClassification`). Only parameters with
``requires_grad=True`` are optimised: attach a delta first to train only the delta.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import torch
from sklearn.metrics import accuracy_score, f1_score
from tqdm.auto import tqdm

from promptdelta.errors import ConfigError
from promptdelta.utils.seed import seed_everything

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyperparameters of :class:`Trainer`. Unknown keys raise :class:`ConfigError`."""

    lr: float = 1e-3
    epochs: int = 20
    max_steps: int | None = None          # stop after this many optimizer steps (overrides epochs)
    batch_size: int = 8
    eval_batch_size: int = 64
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 13
    patience: int | None = None           # early stopping: evaluations without dev improvement
    eval_every: int | None = None         # evaluate every N steps; None = once per epoch
    metric: str = "accuracy"              # "accuracy" or "macro_f1": the dev metric to select on
    device: str = "cpu"
    progress: bool = True                 # tqdm bars

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0, "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1,
            "eval_batch_size": self.eval_batch_size >= 1, "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "weight_decay": self.weight_decay >= 0, "max_grad_norm": self.max_grad_norm > 0,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "patience": self.patience is None or self.patience >= 1,
            "eval_every": self.eval_every is None or self.eval_every >= 1,
            "metric": self.metric in ("accuracy", "macro_f1"),
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"train.{name}={getattr(self, name)!r} is out of range; "
                                  f"see TrainConfig in promptdelta/train/trainer.py for valid values")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "TrainConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown train config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**d)


def compute_metrics(labels: Sequence[int], preds: Sequence[int], num_classes: int | None = None) -> dict:
    """Accuracy and macro-F1 (scikit-learn); macro-F1 averages over all classes of the task."""
    label_set = list(range(num_classes)) if num_classes else None
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro", labels=label_set, zero_division=0)),
    }


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """LR multiplier: linear 0 -> 1 over ``warmup`` steps, then linear 1 -> 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class FitState:
    step: int = 0
    best_score: float = -math.inf
    best_step: int = 0
    evals_without_gain: int = 0
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Train the trainable parameters of a prompt model and select the best dev checkpoint.

    >>> result = Trainer(clf, lr=1e-3, epochs=20).fit(train, dev).evaluate(test)
    """

    def __init__(self, model: torch.nn.Module, config: TrainConfig | None = None, **overrides: Any) -> None:
        base = asdict(config) if config is not None else {}
        base.update(overrides)
        self.config = TrainConfig.from_dict(base)
        self.model = model.to(self.config.device)
        self.state = FitState()
        self.train_time_s = 0.0

    # ---- training ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _check_labels(self, examples: Sequence) -> None:
        check = getattr(getattr(self.model, "verbalizer", None), "check_labels", None)
        if check is not None:
            check(examples)

    def fit(self, train: Sequence, dev: Sequence | None = None) -> "Trainer":
        """Train on ``train``; evaluate on ``dev`` each epoch (or every ``eval_every`` steps) and keep the best."""
        cfg = self.config
        if not self.trainable_parameters():
            raise ConfigError("the model has no trainable parameters; attach a delta "
                              "(pd.attach(model, 'lora')) or unfreeze parameters before training")
        if len(train) == 0:
            raise ConfigError("the training set is empty; check the data source and the shots setting")
        self._check_labels(train)
        if dev:
            self._check_labels(dev)
        seed_everything(cfg.seed)
        steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        total = cfg.max_steps or steps_per_epoch * cfg.epochs
        optimizer = torch.optim.AdamW(_param_groups(self.model, cfg.weight_decay), lr=cfg.lr)
        scheduler = linear_warmup_decay(optimizer, int(cfg.warmup_ratio * total), total)
        gen = torch.Generator().manual_seed(cfg.seed)
        best = self._snapshot()
        t0 = time.perf_counter()
        bar = tqdm(total=total, desc="train", disable=not cfg.progress, leave=False)
        while self.state.step < total:
            order = torch.randperm(len(train), generator=gen).tolist()
            for i in range(0, len(order), cfg.batch_size):
                loss = self._train_step([train[j] for j in order[i:i + cfg.batch_size]], optimizer, scheduler)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                end_of_epoch = i + cfg.batch_size >= len(order)
                due = (self.state.step % cfg.eval_every == 0) if cfg.eval_every else end_of_epoch
                if dev and (due or self.state.step >= total):
                    if self._evaluate_dev(dev, loss):
                        best = self._snapshot()
                    if cfg.patience and self.state.evals_without_gain >= cfg.patience:
                        logger.info("early stopping at step %d (no dev gain for %d evaluations)",
                                    self.state.step, cfg.patience)
                        total = self.state.step
                if self.state.step >= total:
                    break
        bar.close()
        self.train_time_s = time.perf_counter() - t0
        if dev:
            self._restore(best)
            logger.info("restored best dev checkpoint from step %d (%s=%.4f)",
                        self.state.best_step, cfg.metric, self.state.best_score)
        return self

    def _train_step(self, examples: list, optimizer, scheduler) -> float:
        self.model.train()
        batch = self.model.collate(examples)
        loss, _ = self.model.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.state.step}; "
                                     "lower the learning rate or check the inputs")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        self.state.step += 1
        return float(loss.item())

    def _evaluate_dev(self, dev: Sequence, train_loss: float) -> bool:
        metrics = self.evaluate(dev)
        score = metrics[self.config.metric]
        self.state.history.append({"step": self.state.step, "train_loss": train_loss,
                                   **{f"dev_{k}": v for k, v in metrics.items()}})
        if score > self.state.best_score:
            self.state.best_score, self.state.best_step = score, self.state.step
            self.state.evals_without_gain = 0
            return True
        self.state.evals_without_gain += 1
        return False

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def _restore(self, snap: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, v in snap.items():
                params[n].copy_(v)

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, examples: Sequence) -> torch.Tensor:
        """Predicted class index for each example, (N,)."""
        self.model.eval()
        preds = []
        bs = self.config.eval_batch_size
        for i in range(0, len(examples), bs):
            logits = self.model(self.model.collate(list(examples[i:i + bs])))  # (B, C)
            preds.append(logits.argmax(-1).cpu())
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)

    def evaluate(self, examples: Sequence) -> dict[str, float]:
        """Accuracy, macro-F1 and evaluation throughput on labelled ``examples``."""
        if len(examples) == 0:
            raise ConfigError("cannot evaluate on an empty set of examples")
        t0 = time.perf_counter()
        preds = self.predict(examples).tolist()
        seconds = time.perf_counter() - t0
        labels = [ex.label for ex in examples]
        num_classes = getattr(getattr(self.model, "verbalizer", None), "num_classes", None)
        metrics = compute_metrics(labels, preds, num_classes)
        metrics["n"] = len(examples)
        metrics["examples_per_s"] = len(examples) / max(seconds, 1e-9)
        return metrics
