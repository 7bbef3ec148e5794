"""Run configuration: one dataclass that YAML files and CLI flags both map onto.

An unknown key or a bad value raises :class:`ConfigError` naming it and the valid choices. YAML files are
read strictly: a key given twice in one mapping is an error (PyYAML would keep the last silently), and a
document whose aliases expand to more than ``MAX_CONFIG_NODES`` values (an alias bomb) is refused before
anything copies it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from promptdelta.errors import ConfigError, MissingFileError
from promptdelta.train.config import TrainConfig
from promptdelta.utils.checks import check_types

DEFAULT_TEMPLATE = '{"placeholder":"text_a","shortenable":true} It was {"mask"}.'
DEFAULT_SEEDS = [13, 21, 42, 87, 100]
VERBALIZERS = ("manual", "soft", "proto", "kpt")
TEMPLATES = ("manual", "mixed", "soft", "ptuning")
MAX_CONFIG_NODES = 100_000         # values in a config once YAML aliases are expanded (real ones hold < 1,000)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+=@,-]+$")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":      # `<<: *base` may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise ConfigError(f"key {key!r} is given twice (lines {seen[key]} and {line}) in one mapping; "
                                      "keep one of them (YAML would silently drop the first)")
                seen[key] = line
            except TypeError:          # an unhashable key: SafeLoader's own error names it
                break
        return super().construct_mapping(node, deep=deep)


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values ``node`` stands for once every alias is expanded (shared nodes counted each time)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1                  # a cycle (a recursive alias) counts once
    if isinstance(node, yaml.SequenceNode):
        n = 1 + sum(_expanded_nodes(v, memo) for v in node.value)
    elif isinstance(node, yaml.MappingNode):
        n = 1 + sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
    else:
        n = 1
    memo[id(node)] = min(n, MAX_CONFIG_NODES + 1)
    return memo[id(node)]


def _count_values(obj: Any, memo: dict[int, int], open_: set[int] | None = None) -> int:
    """The same count for a Python value (dicts/lists that share children, as YAML aliases make them);
    a value that contains itself is a ConfigError (nothing could copy or print it)."""
    if not isinstance(obj, (dict, list, tuple)):
        return 1
    open_ = set() if open_ is None else open_
    if id(obj) in open_:
        raise ConfigError("the config contains itself (a recursive YAML alias such as `&a [*a]`); write the "
                          "values out instead")
    if id(obj) not in memo:
        open_.add(id(obj))
        items = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else list(obj)
        memo[id(obj)] = min(1 + sum(_count_values(v, memo, open_) for v in items), MAX_CONFIG_NODES + 1)
        open_.discard(id(obj))
    return memo[id(obj)]


def load_yaml(text: str, where: str) -> Any:
    """Parse one YAML document strictly (no duplicate keys, no alias bombs); ``where`` names it in errors."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, {}) > MAX_CONFIG_NODES:
            raise ConfigError(f"{where} expands to more than {MAX_CONFIG_NODES:,} values through YAML aliases "
                              "(&name / *name), far more than a config holds; write the values out, or use "
                              "fewer nested aliases")
        try:
            return loader.construct_document(node)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    finally:
        loader.dispose()


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
    readout: str = "mask"                        # what the verbalizer reads: mask state | mean of all states
    verbalizer_init: str = "words"               # soft verbalizer head: label-word embeddings | probe (LP-FT)
    delta: Any = field(default_factory=_default_delta)   # {method: lora|bitfit, ...}, "none" (full) or "frozen"
    shots: int | None = 16                       # k per class for train and for dev; None = full data
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    max_length: int = 128
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs"
    save_delta: bool = True
    columns: dict = field(default_factory=dict)  # our field -> your column, e.g. {text: sentence, label: y}

    def __post_init__(self) -> None:
        check_types(self, _FIELD_TYPES, "", "RunConfig in promptdelta/config.py and examples/configs/*.yaml")
        if not isinstance(self.train, TrainConfig):   # a mapping, or null (YAML 'train:' with nothing under it)
            self.train = TrainConfig.from_dict(self.train)
        if isinstance(self.delta, str):
            # "none"/"full": every weight trains; "frozen": only template/verbalizer parameters train
            self.delta = None if self.delta.lower() in ("none", "full", "") else {"method": self.delta.lower()}
        if self.delta is not None and not isinstance(self.delta.get("method"), str):
            raise ConfigError("delta must be 'none', a method name, or a mapping with a 'method' key naming the "
                              f"method, e.g. {{method: lora, r: 8}}; got {self.delta!r}")
        if self.verbalizer not in VERBALIZERS:
            raise ConfigError(f"verbalizer={self.verbalizer!r} is unknown; choose one of {list(VERBALIZERS)}")
        if self.template_type not in TEMPLATES:
            raise ConfigError(f"template_type={self.template_type!r} is unknown; choose one of {list(TEMPLATES)}")
        if self.readout not in ("mask", "mean"):
            raise ConfigError(f"readout={self.readout!r}; choose mask (the mask's hidden state) or mean (the mean "
                              "of all hidden states)")
        if self.verbalizer_init not in ("words", "probe"):
            raise ConfigError(f"verbalizer_init={self.verbalizer_init!r}; choose words (label-word embeddings) or "
                              "probe (a logistic-regression probe of the frozen readout, then tuning: LP-FT)")
        if self.verbalizer_init == "probe" and self.verbalizer != "soft":
            raise ConfigError(f"verbalizer_init='probe' fits the linear head of a soft verbalizer, but "
                              f"verbalizer={self.verbalizer!r}; use verbalizer: soft or verbalizer_init: words")
        if self.multi_token_handler not in ("first", "mean", "max"):
            raise ConfigError(f"multi_token_handler={self.multi_token_handler!r}; choose first, mean or max")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"shots={self.shots} must be >= 1 (or null for the full data)")
        if isinstance(self.seeds, int):
            self.seeds = [self.seeds]
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed, e.g. [13, 21, 42, 87, 100]")
        bad = [s for s in self.seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 32]
        if bad:
            raise ConfigError(f"seeds={self.seeds!r} holds {bad[0]!r}; every seed must be an int in [0, 2**32), "
                              "e.g. [13, 21, 42]")
        if self.max_length < 8:
            raise ConfigError(f"max_length={self.max_length} is too small; use at least 8 (typically 128-512)")
        if len(set(self.seeds)) != len(self.seeds):
            dup = next(s for s in self.seeds if self.seeds.count(s) > 1)
            raise ConfigError(f"seeds={self.seeds} names seed {dup} more than once (each seed is one run); "
                              "list every seed once")
        if self.name is not None and (not _SAFE_NAME.match(self.name) or self.name in (".", "..")):
            raise ConfigError(f"name={self.name!r} is not a plain folder name (it must stay inside output_dir); "
                              "use letters, digits and - _ . + = @ , only, e.g. sst2-lora-16shot")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a run config must be a mapping of keys to values, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {sorted(known)}")
        if _count_values(d, {}) > MAX_CONFIG_NODES:        # before deepcopy/asdict would expand shared values
            raise ConfigError(f"the config holds more than {MAX_CONFIG_NODES:,} values once shared (aliased) "
                              "parts are counted each time; a run config needs far fewer: remove the repeats")
        return cls(**copy.deepcopy(d))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"config file {path} does not exist; pass an existing YAML file "
                                   "(see examples/configs/)")
        try:
            d = load_yaml(path.read_text(encoding="utf-8"), f"config file {path}") or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text ({e}); save it as UTF-8") from e
        except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as e:
            # PyYAML raises ValueError for impossible dates (2001-13-45), not YAMLError
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


_FIELD_TYPES: dict[str, tuple] = {
    "name": (str, None), "backbone": (str,), "data": (str,), "template": (str,), "template_choice": (int,),
    "template_type": (str,), "template_options": (dict,), "verbalizer": (str,), "verbalizer_options": (dict,),
    "label_words": (dict, list, str, None), "multi_token_handler": (str,), "readout": (str,), "verbalizer_init": (str,),
    "delta": (dict, str, None),
    "shots": (int, None), "seeds": (list, int), "max_length": (int,), "train": (TrainConfig, dict, None),
    "output_dir": (str,), "save_delta": (bool,), "columns": (dict,),
}
