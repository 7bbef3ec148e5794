"""TrainConfig: the hyperparameters and knobs of :class:`promptdelta.train.Trainer`, checked on creation
(types, ranges, combinations); an unknown key or a bad value is a ConfigError that names it and the fix."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

from promptdelta.errors import ConfigError
from promptdelta.utils.checks import check_types

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps|xpu(:\d+)?)$")   # what torch.device takes that we can train on


@dataclass
class TrainConfig:
    """Hyperparameters of :class:`Trainer`. Unknown keys raise :class:`ConfigError`."""

    lr: float = 1e-3
    head_lr: float | None = None          # lr of the template's and verbalizer's own parameters (None: lr)
    epochs: int = 20
    max_steps: int | None = None          # stop after this many optimizer steps (overrides epochs)
    batch_size: int = 8                   # global micro-batch (all ranks together)
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
    grad_accum: int = 1                   # micro-batches per optimizer step
    precision: str = "fp32"               # fp32 | bf16 (autocast, CPU and GPU) | fp16 (GPU, loss scaling)
    max_nonfinite_steps: int = 5          # skip up to this many steps with a non-finite loss, then abort
    checkpoint_dir: str | None = None     # where training checkpoints go (None = no checkpoints)
    checkpoint_every: int | None = None   # also checkpoint every N steps (always at the end)
    keep_checkpoints: int = 2             # keep the newest K checkpoints
    resume: bool = False                  # continue from the newest complete checkpoint in checkpoint_dir
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward (less memory)
    fsdp: bool = False                    # under torchrun: shard every weight over ranks, layer by layer (FSDP2)
    eval_at_start: bool = False           # score dev before the first step: the untrained model is a candidate
    fast_dropout: bool = True             # on CPU: fused dropout + attention while training (promptdelta.speed)

    def __post_init__(self) -> None:
        check_types(self, _FIELD_TYPES, "train.", "TrainConfig in promptdelta/train/config.py")
        checks = {
            "lr": self.lr > 0, "head_lr": self.head_lr is None or self.head_lr > 0, "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1,
            "eval_batch_size": self.eval_batch_size >= 1, "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "weight_decay": self.weight_decay >= 0, "max_grad_norm": self.max_grad_norm > 0,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "patience": self.patience is None or self.patience >= 1,
            "eval_every": self.eval_every is None or self.eval_every >= 1,
            "metric": self.metric in ("accuracy", "macro_f1"),
            "grad_accum": self.grad_accum >= 1, "precision": self.precision in PRECISIONS,
            "max_nonfinite_steps": self.max_nonfinite_steps >= 0,
            "checkpoint_every": self.checkpoint_every is None or self.checkpoint_every >= 1,
            "keep_checkpoints": self.keep_checkpoints >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"train.{name}={getattr(self, name)!r} is out of range; "
                                  f"see TrainConfig in promptdelta/train/config.py for valid values")
        if not DEVICE.match(self.device):
            raise ConfigError(f"train.device={self.device!r} is not a device name; use cpu, cuda, cuda:<index> "
                              "(e.g. cuda:0), mps or xpu")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ConfigError(f"train.checkpoint_every={self.checkpoint_every} needs train.checkpoint_dir: set it to "
                              "the folder the checkpoints should go to (--checkpoint-dir)")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("train.resume=true needs train.checkpoint_dir: set it to the folder the "
                              "interrupted run wrote its checkpoints to")
        if self.precision == "fp16" and not str(self.device).startswith("cuda"):
            raise ConfigError(f"precision='fp16' needs a CUDA device (device={self.device!r}); use "
                              "precision='bf16' on CPU, or device='cuda'")
        if self.fsdp and self.precision == "fp16":
            raise ConfigError("train.fsdp=true does not work with precision='fp16': the loss scaler would check "
                              "and unscale each rank's gradient shards on their own; use precision='bf16' (no "
                              "scaler needed) or 'fp32' with fsdp, or set train.fsdp=false")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "TrainConfig":
        if d is not None and not isinstance(d, Mapping):
            raise ConfigError(f"train must be a mapping of keys to values, e.g. {{lr: 0.001, epochs: 20}}; got a "
                              f"{type(d).__name__}")
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise ConfigError(f"unknown train config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**d)


_FIELD_TYPES: dict[str, tuple] = {
    "lr": (float,), "head_lr": (float, None), "epochs": (int,), "max_steps": (int, None), "batch_size": (int,), "eval_batch_size": (int,),
    "warmup_ratio": (float,), "weight_decay": (float,), "max_grad_norm": (float,), "seed": (int,),
    "patience": (int, None), "eval_every": (int, None), "metric": (str,), "device": (str,), "progress": (bool,),
    "grad_accum": (int,), "precision": (str,), "max_nonfinite_steps": (int,), "checkpoint_dir": (str, None),
    "checkpoint_every": (int, None), "keep_checkpoints": (int,), "resume": (bool,),
    "gradient_checkpointing": (bool,), "fsdp": (bool,), "eval_at_start": (bool,), "fast_dropout": (bool,),
}
