"""The training loop: AdamW, warm-up + linear decay, clipping, dev selection, early stopping; plus the knobs
that make it scale and survive faults: gradient accumulation, bf16/fp16 autocast, data parallelism and FSDP
on torch.distributed (see :mod:`promptdelta.train.distributed`), atomic checkpoints with exact resume (see
:mod:`promptdelta.train.checkpoint`), skipping of non-finite losses and readable out-of-memory errors.

Works with any model that offers ``collate(examples) -> batch``, ``loss(batch) -> (loss, logits)`` and
``forward(batch) -> logits`` (e.g. :class:`promptdelta.PromptForClassification`). Only parameters with
``requires_grad=True`` are optimised: attach a delta first to train only the delta.

Batch semantics: ``batch_size`` is the *global* micro-batch (split over ranks under torchrun); one optimizer
step consumes ``grad_accum`` micro-batches, and the step's gradient is that of the mean loss over all of its
examples, so ``batch_size=4, grad_accum=2`` equals ``batch_size=8`` and N ranks equal one process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
# imported with the module, not lazily: scikit-learn's first import draws from Python's global `random`, so a
# lazy import inside a run would change that run's random stream (and break exact resume)
from sklearn.metrics import accuracy_score, f1_score
from tqdm.auto import tqdm

from promptdelta.errors import CheckpointError, ConfigError, PromptDeltaError
from promptdelta.speed import fast_dropout, torch_dropout
from promptdelta.train import checkpoint as ckpt
from promptdelta.train import distributed as ddp
from promptdelta.train.config import TrainConfig
from promptdelta.utils.checks import check_device
from promptdelta.utils.seed import seed_everything

logger = logging.getLogger(__name__)


class TrainingError(PromptDeltaError, RuntimeError):
    """Training cannot go on (too many non-finite losses, out of memory); the message names the fix."""


class NonFiniteLossError(TrainingError, FloatingPointError):
    """More non-finite losses than ``max_nonfinite_steps`` allows."""


class TrainingOutOfMemoryError(TrainingError, MemoryError):
    """A batch did not fit in memory; the message gives the batch size and the knobs that help."""


def compute_metrics(labels: Sequence[int], preds: Sequence[int], num_classes: int | None = None) -> dict:
    """Accuracy and macro-F1 (scikit-learn); macro-F1 averages over all classes of the task."""

    label_set = list(range(num_classes)) if num_classes else None
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro", labels=label_set, zero_division=0)),
    }


HEAD_PREFIXES = ("template.", "verbalizer.")   # a PromptForClassification's own (non-backbone) parameters


def _param_groups(model: torch.nn.Module, weight_decay: float, head_lr: float | None = None) -> list[dict]:
    """AdamW groups: weight decay except on biases, norms and vectors; with ``head_lr``, the template's and
    verbalizer's parameters (a soft verbalizer's head, soft prompt tokens) in groups of their own at that lr."""
    groups: dict[tuple[bool, bool], list] = {(h, d): [] for h in (False, True) for d in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = head_lr is not None and name.startswith(HEAD_PREFIXES)
        groups[(head, not (p.ndim < 2 or "norm" in name.lower() or name.endswith("bias")))].append(p)
    if head_lr is not None and not (groups[(True, True)] or groups[(True, False)]):
        raise ConfigError(f"train.head_lr={head_lr} but the model has no trainable template or verbalizer "
                          "parameters (names starting with 'template.' or 'verbalizer.'); drop head_lr or use "
                          "a trainable template / verbalizer such as verbalizer: soft")
    out = [{"params": groups[(False, True)], "weight_decay": weight_decay},
           {"params": groups[(False, False)], "weight_decay": 0.0}]
    if head_lr is not None:
        out += [{"params": groups[(True, True)], "weight_decay": weight_decay, "lr": head_lr},
                {"params": groups[(True, False)], "weight_decay": 0.0, "lr": head_lr}]
    return out


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """LR multiplier: linear 0 -> 1 over ``warmup`` steps, then linear 1 -> 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def is_out_of_memory(err: BaseException) -> bool:
    """True for CUDA OOM and for CPU allocation failures surfaced as RuntimeError."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Switch on activation checkpointing in each backbone inside ``model``: a native one's
    ``gradient_checkpointing_enable()`` or a ``transformers`` model's own (non-reentrant). Returns how many
    were switched on; raises :class:`ConfigError` when there is none."""
    def visit(module: torch.nn.Module) -> int:
        enable = getattr(module, "gradient_checkpointing_enable", None)
        if not callable(enable):
            return sum(visit(child) for child in module.children())
        if hasattr(module, "supports_gradient_checkpointing"):           # a transformers PreTrainedModel
            if not module.supports_gradient_checkpointing:
                raise ConfigError(f"{type(module).__name__} (transformers) does not support gradient "
                                  "checkpointing; set train.gradient_checkpointing=false")
            if hasattr(module, "activation_checkpointing_enable"):         # the name from transformers 5.x on
                module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            enable()
        return 1

    count = visit(model)
    if not count:
        raise ConfigError(f"train.gradient_checkpointing=true, but {type(model).__name__} holds no backbone with "
                          "gradient_checkpointing_enable() (native BERT/RoBERTa/GPT-2/T5 or a transformers "
                          "model); set it to false for this model")
    return count


@dataclass
class FitState:
    step: int = 0
    best_score: float = -math.inf
    best_step: int = 0
    evals_without_gain: int = 0
    history: list[dict] = field(default_factory=list)
    skipped_steps: int = 0                # steps skipped for a non-finite loss


@dataclass
class _Run:
    """What one ``fit`` call carries between steps (everything a checkpoint must restore)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    generator: torch.Generator
    best: dict[str, torch.Tensor]
    total: int
    epoch: int = 0
    order: list[int] = field(default_factory=list)
    pos: int = 0                          # index into ``order`` of the next example


def _text_length(example: Any) -> int:
    """Characters of an example's texts: a cheap proxy for its token count, used to batch by length."""
    return sum(len(v) for v in (getattr(example, "text_a", None), getattr(example, "text_b", None))
               if isinstance(v, str))


class Trainer:
    """Train the trainable parameters of a prompt model and select the best dev checkpoint.

    >>> result = Trainer(clf, lr=1e-3, epochs=20).fit(train, dev).evaluate(test)
    """

    def __init__(self, model: torch.nn.Module, config: TrainConfig | None = None, **overrides: Any) -> None:
        base = asdict(config) if config is not None else {}
        base.update(overrides)
        self.config = TrainConfig.from_dict(base)
        self.device = ddp.resolve_device(self.config.device)
        check_device(self.device)                 # a clear error for cuda on a CPU build, cuda:7 of 2 GPUs
        # under FSDP the whole model never goes to the device at once: fully_shard moves one layer at a time
        self._unplaced = self.config.fsdp and ddp.env_world_size() > 1
        self.model = model if self._unplaced else model.to(self.device)
        self.state = FitState()
        self.train_time_s = 0.0
        self.dist = ddp.DistContext()
        self._fsdp: ddp.FSDPRoot | None = None     # the FSDP root to call instead of the model, once sharded

    def _info(self, msg: str, *args: Any) -> None:
        if self.dist.is_main:
            logger.info(msg, *args)

    def _warn(self, msg: str, *args: Any) -> None:
        if self.dist.is_main:
            logger.warning(msg, *args)

    # ---- training ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def sharded(self) -> bool:
        """Whether the model's parameters are FSDP shards (``fsdp=True`` under torchrun, after ``fit`` began)."""
        return self._fsdp is not None

    def _shard(self) -> None:
        """Apply FSDP (train.fsdp); with one process there is nothing to shard, so it only checks the model."""
        if self._fsdp is not None:
            return
        units = ddp.fsdp_units(self.model)                  # a single process gets the same ConfigError
        if not self.dist.enabled:
            self._info("train.fsdp=true in a single process: nothing to shard, training unsharded")
            return
        self._fsdp = ddp.shard_model(self.model, self.device, self.dist, units)
        self._info("FSDP: %d layer units + root sharded over %d ranks", len(units), self.dist.world_size)

    def _place(self) -> None:
        if self._unplaced and self._fsdp is None:
            self.model.to(self.device)
        self._unplaced = False

    def _call(self, batch: Mapping[str, Any], loss: bool = False) -> Any:
        """``model.loss(batch)`` (loss=True) or ``model(batch)``, through the FSDP root once sharded."""
        if self._fsdp is not None:
            return self._fsdp(batch, loss=loss)
        return self.model.loss(batch) if loss else self.model(batch)

    @contextlib.contextmanager
    def consolidated(self) -> Iterator[torch.nn.Module]:
        """The model with whole parameters, for saving (delta files, state dicts): under FSDP each shard is
        gathered into a CPU tensor for the block (every rank must enter it; only rank 0 should write), then
        the shards come back. Without FSDP, the model as it is."""
        if self._fsdp is None:
            yield self.model
            return
        with ddp.full_parameters(self.model) as model:
            yield model

    def _examples(self, items: Any) -> Sequence:
        """InputExamples from strings, dicts, a datasets.Dataset or a DataFrame (pd.data.as_examples)."""
        from promptdelta.data.examples import as_examples

        return as_examples(items, getattr(getattr(self.model, "verbalizer", None), "classes", None))

    def _check_labels(self, examples: Sequence) -> None:
        check = getattr(getattr(self.model, "verbalizer", None), "check_labels", None)
        if check is not None:
            check(examples)

    def _validate(self, train: Sequence, dev: Sequence | None) -> None:
        if not self.trainable_parameters():
            raise ConfigError("the model has no trainable parameters; attach a delta "
                              "(pd.attach(model, 'lora')) or unfreeze parameters before training")
        if len(train) == 0:
            raise ConfigError("the training set is empty; check the data source and the shots setting")
        self._check_labels(train)
        if dev:
            self._check_labels(dev)

    def _new_run(self, n_train: int) -> _Run:
        cfg = self.config
        micro_per_epoch = math.ceil(n_train / cfg.batch_size)
        total = cfg.max_steps or math.ceil(micro_per_epoch / cfg.grad_accum) * cfg.epochs
        optimizer = torch.optim.AdamW(_param_groups(self.model, cfg.weight_decay, cfg.head_lr), lr=cfg.lr)
        scheduler = linear_warmup_decay(optimizer, int(cfg.warmup_ratio * total), total)
        scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        gen = torch.Generator().manual_seed(cfg.seed)
        return _Run(optimizer, scheduler, scaler, gen, self._snapshot(), total)

    def fit(self, train: Sequence, dev: Sequence | None = None) -> "Trainer":
        """Train on ``train``; evaluate on ``dev`` each epoch (or every ``eval_every`` steps) and keep the best."""
        cfg = self.config
        train, dev = self._examples(train), (self._examples(dev) if dev is not None else None)
        self._validate(train, dev)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.dist = ddp.init_distributed(self.device)
        if cfg.fsdp:
            self._shard()
        self._place()
        seed_everything(cfg.seed)
        run = self._new_run(len(train))
        if cfg.resume:
            self._resume(run, len(train))
        t0 = time.perf_counter()
        if cfg.eval_at_start and dev and self.state.step == 0 and not self.state.history:
            if self._evaluate_dev(dev, float("nan")):                 # e.g. a linear-probe-initialised head
                run.best = self._snapshot()
        bar = tqdm(total=run.total, initial=self.state.step, desc="train", leave=False,
                   disable=not (cfg.progress and self.dist.is_main))
        # fused CPU dropout + attention while training (torch's dropout was ~12% of a step), or torch's dropout
        # everywhere with fast_dropout false (native backbones run the fused one by themselves); undone after
        if not cfg.fast_dropout:
            speedup = torch_dropout(self.model)
        else:
            speedup = fast_dropout(self.model) if torch.device(self.device).type == "cpu" else None
        try:
            while self.state.step < run.total:
                if run.pos >= len(run.order):
                    run.order = torch.randperm(len(train), generator=run.generator).tolist()
                    run.pos, run.epoch = 0, run.epoch + 1
                indices = run.order[run.pos:run.pos + cfg.batch_size * cfg.grad_accum]
                run.pos += len(indices)
                loss = self._train_step(train, indices, run)
                if loss is None:
                    continue
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                self._after_step(run, dev, loss, end_of_epoch=run.pos >= len(run.order))
        finally:
            if speedup is not None:
                speedup.restore()
        bar.close()
        self.train_time_s = time.perf_counter() - t0
        if cfg.checkpoint_dir:
            self.save_checkpoint(run)
        if dev:
            self._restore(run.best)
            self._info("restored best dev checkpoint from step %d (%s=%.4f)",
                       self.state.best_step, cfg.metric, self.state.best_score)
        return self

    def _after_step(self, run: _Run, dev: Sequence | None, loss: float, end_of_epoch: bool) -> None:
        """Dev evaluation, early stopping and periodic checkpoints after one optimizer step."""
        cfg, step = self.config, self.state.step
        due = (step % cfg.eval_every == 0) if cfg.eval_every else end_of_epoch
        if dev and (due or step >= run.total):
            if self._evaluate_dev(dev, loss):
                run.best = self._snapshot()
            if cfg.patience and self.state.evals_without_gain >= cfg.patience:
                self._info("early stopping at step %d (no dev gain for %d evaluations)", step, cfg.patience)
                run.total = step
        if cfg.checkpoint_dir and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < run.total:
            self.save_checkpoint(run)

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.config.precision == "fp32":
            yield
            return
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        with torch.autocast(device_type=torch.device(self.device).type, dtype=dtype):
            yield

    def _micro_batches(self, indices: list[int]) -> Iterator[tuple[list[int], float]]:
        """This rank's shard of each micro-batch of one optimizer step, with its loss weight
        ``len(shard) / len(indices)``. Under FSDP every rank must run every forward and backward (each holds
        collectives), so an empty shard becomes one example of the micro-batch with weight 0."""
        bs, ctx = self.config.batch_size, self.dist
        for i in range(0, len(indices), bs):
            part = ddp.shard(indices[i:i + bs], ctx.rank, ctx.world_size)
            if part:
                yield part, len(part) / len(indices)
            elif self._fsdp is not None:
                yield indices[i:i + 1], 0.0

    def _accumulate_grads(self, train: Sequence, indices: list[int], scaler: Any = None) -> tuple[float, float]:
        """Forward and backward over ``indices`` (all ranks, each its shards): leaves in ``.grad`` the gradient
        of the mean loss over all of them, summed over ranks. Returns (that mean loss, >0 if any was
        non-finite), both reduced over ranks."""
        loss_sum, bad = 0.0, 0.0
        try:
            for part, weight in self._micro_batches(indices):
                with self._autocast():
                    loss, _ = self._call(self.model.collate([train[j] for j in part]), loss=True)
                if not torch.isfinite(loss.detach()):
                    bad = 1.0
                    if self._fsdp is None:
                        break
                weighted = loss if weight == 1.0 else loss * weight
                (scaler.scale(weighted) if scaler else weighted).backward()
                loss_sum += float(weighted.detach())
        except Exception as err:  # noqa: BLE001 - only OOM is translated, everything else re-raised
            if is_out_of_memory(err):
                raise self._oom_error("training", len(indices)) from err
            raise
        if self._fsdp is not None:       # FSDP has reduce-scattered (summed) the gradients after each backward
            loss_sum, bad = ddp.all_reduce_sum([loss_sum, bad], self.device)
        elif self.dist.enabled:
            loss_sum, bad = ddp.all_reduce_grads(self.trainable_parameters(), [loss_sum, bad])
        return loss_sum, bad

    def _train_step(self, train: Sequence, indices: list[int], run: _Run) -> float | None:
        """One optimizer step over ``indices`` (all ranks); returns the step's mean loss, or None if skipped."""
        self.model.train()
        params = self.trainable_parameters()
        run.optimizer.zero_grad(set_to_none=True)
        loss_sum, bad = self._accumulate_grads(train, indices, run.scaler)
        if bad:
            self._skip_nonfinite(run)
            return None
        self._optimizer_step(run, params)
        self.state.step += 1
        return loss_sum

    def _optimizer_step(self, run: _Run, params: list[torch.nn.Parameter]) -> None:
        if run.scaler is not None:
            run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        run.scheduler.step()

    def _skip_nonfinite(self, run: _Run) -> None:
        run.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_steps += 1
        limit = self.config.max_nonfinite_steps
        if self.state.skipped_steps > limit:
            raise NonFiniteLossError(
                f"the loss was non-finite (NaN/inf) in {self.state.skipped_steps} steps (limit "
                f"train.max_nonfinite_steps={limit}), the last at step {self.state.step}; lower train.lr, "
                "use precision='fp32' or 'bf16' instead of fp16, lower max_grad_norm, or check the inputs")
        self._warn("non-finite loss at step %d: skipped the batch (%d/%d allowed)", self.state.step,
                   self.state.skipped_steps, limit)

    def _oom_error(self, phase: str, n: int) -> TrainingOutOfMemoryError:
        cfg = self.config
        if phase == "evaluation":
            return TrainingOutOfMemoryError(
                f"out of memory during evaluation with eval_batch_size={n}; lower train.eval_batch_size "
                "or the template's max_length")
        return TrainingOutOfMemoryError(
            f"out of memory during training at step {self.state.step} with batch_size={cfg.batch_size} "
            f"(x grad_accum={cfg.grad_accum}, {self.dist.world_size} rank(s)); lower train.batch_size and "
            "raise train.grad_accum to keep the same effective batch, use precision='bf16', lower "
            "max_length, or train a smaller delta (fewer targets / lower rank)")

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
        """Copies of the trainable parameters (under FSDP: of this rank's shards, no communication)."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def _restore(self, snap: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, v in snap.items():
                params[n].copy_(v)

    # ---- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, run: _Run) -> Path | None:
        """Write the full training state to ``checkpoint_dir`` (rank 0 only); all ranks wait for it."""
        path = None
        gather = ddp.full_tensor if self._fsdp is not None else (lambda t: t)
        if self.dist.is_main or self._fsdp is not None:     # under FSDP every rank gathers, rank 0 writes
            tensors = {f"param.{n}": gather(v) for n, v in self._snapshot().items()}
            tensors.update({f"best.{n}": gather(v) for n, v in run.best.items()})
            opt_state = run.optimizer.state_dict()
            if self._fsdp is not None:
                opt_state = ddp.full_optimizer_state(opt_state)
        if self.dist.is_main:
            opt_tensors, opt_meta = ckpt.optimizer_to_flat(opt_state)
            rng_tensors, rng_meta = ckpt.capture_rng(run.generator)
            tensors.update(opt_tensors)
            tensors.update(rng_tensors)
            state = {"fit_state": asdict(self.state), "epoch": run.epoch, "order": run.order, "pos": run.pos,
                     "total": run.total, "optimizer": opt_meta, "scheduler": run.scheduler.state_dict(),
                     "scaler": run.scaler.state_dict() if run.scaler else None, "rng": rng_meta,
                     "config": asdict(self.config)}
            path = ckpt.save_checkpoint(self.config.checkpoint_dir, self.state.step, tensors, state,
                                        keep_last=self.config.keep_checkpoints)
            logger.debug("wrote checkpoint %s", path)
        ddp.barrier(self.dist)
        return path

    def _resume(self, run: _Run, n_train: int) -> None:
        path = ckpt.latest_checkpoint(self.config.checkpoint_dir)
        if path is None:
            self._info("no complete checkpoint in %s; starting from scratch", self.config.checkpoint_dir)
            return
        tensors, state = ckpt.load_checkpoint(path)
        ckpt.check_resume(path, state, asdict(self.config), n_train)
        self._load_params({k[6:]: v for k, v in tensors.items() if k.startswith("param.")}, path)
        params = dict(self.model.named_parameters())           # _load_params checked the names
        run.best = {k[5:]: ddp.shard_like(v.to(self.device), params[k[5:]])
                    for k, v in tensors.items() if k.startswith("best.")}
        opt_state = ckpt.optimizer_from_flat(tensors, state["optimizer"])
        if self._fsdp is not None:                # whole tensors in the file -> this rank's shards
            opt_state = ddp.shard_optimizer_state(opt_state, run.optimizer)
        run.optimizer.load_state_dict(opt_state)
        run.scheduler.load_state_dict(state["scheduler"])
        if run.scaler is not None and state["scaler"]:
            run.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(run.generator, tensors, state["rng"])
        run.epoch, run.order, run.pos, run.total = state["epoch"], state["order"], state["pos"], state["total"]
        self.state = FitState(**state["fit_state"])
        self._info("resumed from %s (step %d, epoch %d)", path, self.state.step, run.epoch)

    def _load_params(self, saved: dict[str, torch.Tensor], path: Path) -> None:
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if set(saved) != set(params) or any(saved[n].shape != params[n].shape for n in params):
            missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
            raise CheckpointError(f"checkpoint {str(path)!r} was written for other trainable parameters "
                                  f"(missing {missing[:5]}, unexpected {extra[:5]}, or shapes differ); "
                                  "resume with the same model, delta and template, or use a new checkpoint_dir")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(ddp.shard_like(saved[n], p) if ddp.is_sharded(p) else saved[n])

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, examples: Sequence) -> torch.Tensor:
        """Predicted class index for each example, (N,). Under torchrun each rank predicts a share."""
        examples = self._examples(examples)
        self._place()
        self.model.eval()
        ctx, bs = self.dist, self.config.eval_batch_size
        mine = list(range(ctx.rank, len(examples), ctx.world_size))
        # longest first, so each batch pads to similar lengths (2-3x faster on mixed-length test sets);
        # the predictions are put back in input order below
        order = sorted(range(len(mine)), key=lambda i: -_text_length(examples[mine[i]]))
        mine = [mine[i] for i in order]
        preds: list[torch.Tensor] = []
        try:
            for i in range(0, len(mine), bs):
                with self._autocast():
                    logits = self._call(self.model.collate([examples[j] for j in mine[i:i + bs]]))  # (B, C)
                preds.append(logits.argmax(-1).cpu())
            if self._fsdp is not None:   # as many forwards as the busiest rank: each holds collectives
                most = math.ceil(math.ceil(len(examples) / ctx.world_size) / bs)
                for _ in range(most - math.ceil(len(mine) / bs)):
                    with self._autocast():
                        self._call(self.model.collate([examples[0]]))
        except Exception as err:  # noqa: BLE001
            if is_out_of_memory(err):
                raise self._oom_error("evaluation", bs) from err
            raise
        local = torch.empty(len(mine), dtype=torch.long)
        if preds:
            local[torch.tensor(order)] = torch.cat(preds)
        if not ctx.enabled:
            return local
        out = torch.empty(len(examples), dtype=torch.long)
        for rank, part in enumerate(ddp.gather_objects(local.tolist(), ctx)):
            out[rank::ctx.world_size] = torch.tensor(part, dtype=torch.long)
        return out

    def evaluate(self, examples: Sequence) -> dict[str, float]:
        """Accuracy, macro-F1 and evaluation throughput on labelled ``examples``."""
        examples = self._examples(examples)
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
