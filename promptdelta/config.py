"""Run configuration: one dataclass that YAML files and CLI flags both map onto.

An unknown key or a bad value raises :class:`ConfigError` naming it and the valid choices.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from promptdelta.errors import ConfigError, MissingFileError
from promptdelta.train.trainer import TrainConfig

DEFAULT_TEMPLATE = '{"placeholder":"text_a","shortenable":true} It was {"mask"}.'
DEFAULT_SEEDS = [13, 21, 42, 87, 100]
VERBALIZERS = ("manual", "soft", "proto", "kpt")
TEMPLATES = ("manual", "mixed", "soft", "ptuning")


def _default_delta() -> dict[str, Any]:
    return {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 8, "alpha": 16}


@dataclass
class RunConfig:
    """Everything ``promptdelta run`` needs. See ``examples/configs/*.yaml``."""

    name: str | None = None                      # run folder name under output_dir (default: derived)
    backbone: str = "minilm"                     # preset, local HF folder, or hub id
    data: str = "builtin:demo"                   # data folder, CSV, datasets folder/name, builtin:demo
    template: str = DEFAULT_TEMPLATE             # template text, or a path to a template file
    template_choice: int = 0                     # line of the template file
    template_type: str = "manual"                # manual | mixed | soft (prompt tuning) | ptuning
    template_options: dict = field(default_factory=dict)   # e.g. {num_tokens: 20} or {prompt_encoder: mlp}
    verbalizer: str = "soft"                     # manual | soft | proto | kpt
    verbalizer_options: dict = field(default_factory=dict) # e.g. {proto_dim: 128} for proto
    label_words: Any = None                      # {class: [words]}, [[words] per class], a file, or None
    multi_token_handler: str = "first"           # manual verbalizer: first | mean | max
    delta: Any = field(default_factory=_default_delta)   # {method: lora|bitfit, targets, ...} or "none"
    shots: int | None = 16                       # k per class for train and for dev; None = full data
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    max_length: int = 128
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs"
    save_delta: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if isinstance(self.delta, str):
            self.delta = None if self.delta.lower() in ("none", "") else {"method": self.delta}
        if self.delta is not None:
            if not isinstance(self.delta, dict) or "method" not in self.delta:
                raise ConfigError("delta must be 'none', a method name, or a mapping with a 'method' key, "
                                  f"e.g. {{method: lora, r: 8}}; got {self.delta!r}")
        if self.verbalizer not in VERBALIZERS:
            raise ConfigError(f"verbalizer={self.verbalizer!r} is unknown; choose one of {list(VERBALIZERS)}")
        if self.template_type not in TEMPLATES:
            raise ConfigError(f"template_type={self.template_type!r} is unknown; choose one of {list(TEMPLATES)}")
        if self.multi_token_handler not in ("first", "mean", "max"):
            raise ConfigError(f"multi_token_handler={self.multi_token_handler!r}; choose first, mean or max")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"shots={self.shots} must be >= 1 (or null for the full data)")
        if isinstance(self.seeds, int):
            self.seeds = [self.seeds]
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed, e.g. [13, 21, 42, 87, 100]")
        if self.max_length < 8:
            raise ConfigError(f"max_length={self.max_length} is too small; use at least 8 (typically 128-512)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a run config must be a mapping of keys to values, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**copy.deepcopy(d))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"config file {path} does not exist; pass an existing YAML file "
                                   "(see examples/configs/)")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **overrides: Any) -> "RunConfig":
        """A copy with top-level keys (and ``train.<key>`` keys) replaced; None values are ignored."""
        d = self.to_dict()
        for key, value in overrides.items():
            if value is None:
                continue
            if key.startswith("train."):
                d["train"][key.split(".", 1)[1]] = value
            else:
                d[key] = value
        return RunConfig.from_dict(d)
