"""One builder for prompt models: templates and verbalizers by name, and the classifier folder.

Every template and verbalizer class registers itself at the end of its own file (as deltas do with
``register_delta``), with ONE factory signature and an exporter:

    factory(tokenizer, classes, options, backbone) -> module     build it from JSON-able options
    export(module) -> options                                    the options that rebuild it (tensors apart)

``build_template`` / ``build_verbalizer`` / ``build_classifier`` are the one path by which ``promptdelta run``,
the bench harness and ``PromptForClassification.from_pretrained`` assemble a prompt model. An unknown name is a
ConfigError listing the known ones.

A classifier folder (``save_classifier`` / ``load_classifier``, behind ``clf.save_pretrained`` and
``PromptForClassification.from_pretrained``):

    classifier.json        format, promptdelta version, classes, template/verbalizer {kind, options},
                           readout, max_length, scoring, backbone identity + fingerprint, deltas
    prompt.safetensors     template.* and verbalizer.* tensors (soft vectors, heads, KPT weights, calibration)
    tokenizer/             the tokenizer (tokenizer.save_pretrained), so the folder tokenises on its own
    backbone/              only when the backbone's own weights were trained (full fine-tuning): an HF folder
    delta/ or deltas/<n>/  the attached delta, or each of several (DeltaHandle.save; reloaded with pd.load_delta)

The folder is written into a temporary sibling and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptdelta.errors import BackboneError, CheckpointError, ConfigError, MissingFileError
from promptdelta.utils.io import atomic_save_safetensors, atomic_write_json

logger = logging.getLogger(__name__)

Factory = Callable[[Any, "list[str] | None", dict, Any], nn.Module]   # (tokenizer, classes, options, backbone)
Exporter = Callable[[nn.Module], dict]

FORMAT = "promptdelta.classifier/1"
CONFIG_FILE = "classifier.json"
TENSORS_FILE = "prompt.safetensors"
TOKENIZER_DIR = "tokenizer"
DELTAS_DIR = "deltas"
BACKBONE_DIR = "backbone"


@dataclass(frozen=True)
class PromptEntry:
    """One registered template or verbalizer kind.

    ``config_keys``: the RunConfig fields (besides ``*_options``) that feed this kind's options, e.g. a manual
    verbalizer takes ``label_words`` and ``multi_token_handler``, a proto verbalizer neither."""

    name: str
    cls: type
    factory: Factory
    export: Exporter
    config_keys: tuple[str, ...] = ()


_TEMPLATES: dict[str, PromptEntry] = {}
_VERBALIZERS: dict[str, PromptEntry] = {}


def _register(table: dict[str, PromptEntry], what: str, entry: PromptEntry) -> None:
    if entry.name in table:
        raise ConfigError(f"a {what} named {entry.name!r} is already registered ({table[entry.name].cls.__name__}); "
                          f"pick another name. Known: {sorted(table)}")
    table[entry.name] = entry


def register_template(name: str, cls: type, factory: Factory, export: Exporter,
                      config_keys: Sequence[str] = ()) -> None:
    """Make ``build_template(name, ...)`` call ``factory``, and let classifier folders save ``cls``."""
    _register(_TEMPLATES, "template", PromptEntry(name, cls, factory, export, tuple(config_keys)))


def register_verbalizer(name: str, cls: type, factory: Factory, export: Exporter,
                        config_keys: Sequence[str] = ()) -> None:
    """Make ``build_verbalizer(name, ...)`` call ``factory``, and let classifier folders save ``cls``."""
    _register(_VERBALIZERS, "verbalizer", PromptEntry(name, cls, factory, export, tuple(config_keys)))


def _loaded() -> None:
    """Import every built-in prompt file, so their registration blocks have run."""
    import promptdelta.prompts  # noqa: F401
    import promptdelta.recipe_export  # noqa: F401  (the auto recipe's "plain" template, "linear" verbalizer)


def registered_templates() -> list[str]:
    _loaded()
    return sorted(_TEMPLATES)


def registered_verbalizers() -> list[str]:
    _loaded()
    return sorted(_VERBALIZERS)


def _entry(table: dict[str, PromptEntry], what: str, kind: str) -> PromptEntry:
    _loaded()
    if kind not in table:
        raise ConfigError(f"unknown {what} {kind!r}; known {what}s: {', '.join(sorted(table))}")
    return table[kind]


def _entry_of(table: dict[str, PromptEntry], what: str, module: nn.Module) -> PromptEntry:
    _loaded()
    for entry in table.values():
        if type(module) is entry.cls:
            return entry
    raise CheckpointError(f"{type(module).__name__} is not a registered {what}, so it cannot be saved; register "
                          f"it with register_{what}(name, cls, factory, export) at the end of its file")


# ------------------------------------------------------------------------------------------- building
def build_template(kind: str, tokenizer: Any, classes: Sequence[str] | None = None,
                   options: Mapping[str, Any] | None = None, backbone: Any = None) -> nn.Module:
    """The template ``kind`` ("manual", "mixed", "soft", "ptuning", ...) from its options (e.g. ``text``)."""
    entry = _entry(_TEMPLATES, "template", kind)
    return entry.factory(tokenizer, None if classes is None else list(classes), dict(options or {}), backbone)


def build_verbalizer(kind: str, tokenizer: Any, classes: Sequence[str] | None,
                     options: Mapping[str, Any] | None = None, backbone: Any = None) -> nn.Module:
    """The verbalizer ``kind`` ("manual", "soft", "kpt", "proto", "multi_mask", ...) over ``classes``."""
    entry = _entry(_VERBALIZERS, "verbalizer", kind)
    return entry.factory(tokenizer, None if classes is None else list(classes), dict(options or {}), backbone)


def _part(spec: Any, options: Mapping[str, Any] | None, what: str) -> tuple[str, dict[str, Any]]:
    """A kind name (+ options) or a {"kind": ..., "options": ...} dict -> (kind, options)."""
    if isinstance(spec, str):
        return spec, dict(options or {})
    if isinstance(spec, Mapping) and "kind" in spec:
        return str(spec["kind"]), {**dict(spec.get("options") or {}), **dict(options or {})}
    raise ConfigError(f"{what}={spec!r}: pass a {what} object, a kind name (e.g. 'manual') or "
                      f"{{'kind': ..., 'options': {{...}}}}")


def build_classifier(backbone: nn.Module, tokenizer: Any, classes: Sequence[str], template: Any = "manual",
                     verbalizer: Any = "manual", *, template_options: Mapping[str, Any] | None = None,
                     verbalizer_options: Mapping[str, Any] | None = None, readout: str = "mask",
                     max_length: int = 256, **model_kw: Any) -> nn.Module:
    """PromptForClassification from a backbone and template/verbalizer objects, kind names or specs.

    >>> clf = pd.build_classifier(model, tok, ["negative", "positive"],
    ...                           template_options={"text": '{"placeholder":"text_a"} It was {"mask"}.'},
    ...                           verbalizer_options={"label_words": [["bad"], ["good"]]})
    """
    from promptdelta.prompts.model import PromptForClassification

    if not isinstance(template, nn.Module):
        kind, opts = _part(template, template_options, "template")
        template = build_template(kind, tokenizer, classes, opts, backbone)
    if not isinstance(verbalizer, nn.Module):
        kind, opts = _part(verbalizer, verbalizer_options, "verbalizer")
        verbalizer = build_verbalizer(kind, tokenizer, classes, opts, backbone)
    return PromptForClassification(backbone, template, verbalizer, max_length=max_length, readout=readout,
                                   **model_kw)


def config_parts(config: Any) -> tuple[tuple[str, dict], tuple[str, dict]]:
    """A RunConfig -> ((template kind, options), (verbalizer kind, options)) for the builders."""
    t_opts = {"text": config.template, "choice": config.template_choice, **config.template_options}
    entry = _entry(_VERBALIZERS, "verbalizer", config.verbalizer)
    v_opts = dict(config.verbalizer_options)
    for key in entry.config_keys:                      # e.g. label_words, multi_token_handler
        value = getattr(config, key)
        if value is not None:
            v_opts.setdefault(key, value)
    return (config.template_type, t_opts), (config.verbalizer, v_opts)


# ------------------------------------------------------------------------------- helpers for factories
def default_label_words(classes: Sequence[str]) -> list[list[str]]:
    """One label word per class from its name: ``"Sci/Tech"`` -> ``["sci"]``, ``"positive"`` -> ``["positive"]``."""
    return [[re.split(r"[^0-9a-zA-Z]+", c.strip())[0].lower() or c] for c in classes]


def check_options(what: str, cls: type, options: Mapping[str, Any], taken: Sequence[str] = ()) -> dict[str, Any]:
    """``options`` checked against ``cls``'s constructor; unknown keys raise ConfigError naming the valid ones."""
    skip = {"self", "text", "tokenizer", "backbone", "classes", "label_words", "token_ids", "prefix_init",
            "hidden_size", "kwargs"} | set(taken)
    valid = set(inspect.signature(cls).parameters) - skip
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {unknown} for {cls.__name__}; valid: "
                          f"{sorted(valid | set(taken))}")
    return dict(options)


def template_text(options: dict[str, Any], cls: type) -> tuple[str, dict[str, Any]]:
    """Pop ``text`` (inline, or a template file read at line ``choice``) from ``options``; -> (text, rest)."""
    from promptdelta.config import DEFAULT_TEMPLATE
    from promptdelta.prompts.dsl import is_template_file, read_template_line

    text = options.pop("text", DEFAULT_TEMPLATE)
    choice = options.pop("choice", 0)
    kw = check_options("template", cls, options, taken=("text", "choice"))
    if is_template_file(text):
        text = read_template_line(text, choice)
    return text, kw


def need_backbone(backbone: Any, what: str) -> Any:
    """``backbone``, or a ConfigError for a factory that sizes its parameters from it."""
    if backbone is None:
        raise ConfigError(f"a {what} is sized from the backbone; pass backbone=model (from pd.load_backbone)")
    return backbone


def label_words_option(options: dict[str, Any], tokenizer: Any, classes: Sequence[str] | None) -> Any:
    """Pop ``label_words`` (+ ``choice`` for a file): a verbalizer file's words, the given ones, or class names."""
    from promptdelta.prompts.verbalizer import ManualVerbalizer

    words, choice = options.pop("label_words", None), options.pop("choice", 0)
    if isinstance(words, (str, os.PathLike)):        # an OpenPrompt verbalizer file
        words = ManualVerbalizer.from_file(words, tokenizer=tokenizer, classes=classes, choice=choice).label_words
    if words is None:
        if classes is None:
            raise ConfigError("no label words and no classes; pass classes=[...] or label_words")
        words = default_label_words(classes)
    return words


# --------------------------------------------------------------------------------------- exporting
def template_spec(template: nn.Module) -> dict[str, Any]:
    """{"kind", "options"} that rebuild ``template`` through build_template (its tensors travel apart)."""
    entry = _entry_of(_TEMPLATES, "template", template)
    return {"kind": entry.name, "options": entry.export(template)}


def verbalizer_spec(verbalizer: nn.Module) -> dict[str, Any]:
    """{"kind", "options"} that rebuild ``verbalizer`` through build_verbalizer (its tensors travel apart)."""
    entry = _entry_of(_VERBALIZERS, "verbalizer", verbalizer)
    return {"kind": entry.name, "options": entry.export(verbalizer)}


def prompt_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Everything learned or estimated: the state dict plus each submodule's ``calibration`` prior (C, W)."""
    out = dict(module.state_dict())
    for name, sub in module.named_modules():
        cal = getattr(sub, "calibration", None)
        if isinstance(cal, torch.Tensor):
            out[f"{name}.calibration" if name else "calibration"] = cal
    return out


def load_prompt_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Inverse of ``prompt_tensors``: keys and shapes must fit exactly."""
    cal = {k: v for k, v in tensors.items() if k == "calibration" or k.endswith(".calibration")}
    state = {k: v for k, v in tensors.items() if k not in cal}
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise CheckpointError(f"{where} does not fit the rebuilt {type(module).__name__}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, other shape {bad[:5]}; save the classifier again")
    module.load_state_dict(state)
    for key, value in cal.items():
        sub = module.get_submodule(key.rpartition(".")[0]) if "." in key else module
        sub.set_calibration(value)


# ------------------------------------------------------------------------------------ the folder
def _backbone_identity(backbone: nn.Module) -> dict[str, Any]:
    from promptdelta.deltas.base import model_fingerprint

    return {"name_or_path": getattr(backbone, "name_or_path", None), "dtype": getattr(backbone, "load_dtype", None),
            "kind": getattr(backbone, "kind", None), "model_class": type(backbone).__name__,
            "fingerprint": model_fingerprint(backbone)}


def backbone_trains(backbone: nn.Module) -> bool:
    """Whether the backbone's own weights (not a delta's) are trainable: full fine-tuning changed them."""
    from promptdelta.deltas.base import deltas_of

    delta_ids = {id(p) for h in deltas_of(backbone).values() for p in h.parameters()}
    return any(p.requires_grad and id(p) not in delta_ids for p in backbone.parameters())


def save_classifier(clf: nn.Module, path: str | os.PathLike, overwrite: bool = False,
                    extra_files: Mapping[str, Any] | None = None, save_backbone: bool | None = None) -> Path:
    """Write ``clf`` as a classifier folder (see the module docstring); ``extra_files``: {name: JSON} beside it.

    ``save_backbone``: also write the backbone's weights into ``backbone/`` (an HF checkpoint folder), which
    the folder then loads instead of the recorded one; None: when its own weights train (full fine-tuning)."""
    import promptdelta
    from promptdelta.deltas.base import deltas_of

    path = Path(path)
    embed = backbone_trains(clf.backbone) if save_backbone is None else save_backbone
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        what = "a classifier" if (path / CONFIG_FILE).is_file() else "a non-empty folder or a file"
        raise CheckpointError(f"{path} already holds {what}; pass overwrite=True to replace it, or choose another "
                              f"path")
    deltas = deltas_of(clf.backbone)
    config = {"format": FORMAT, "promptdelta_version": promptdelta.__version__,
              "classes": list(clf.verbalizer.classes), "template": template_spec(clf.template),
              "verbalizer": verbalizer_spec(clf.verbalizer), "readout": clf.readout, "max_length": clf.max_length,
              "scoring": clf.scoring, "length_normalize": clf.length_normalize,
              "backbone": {**_backbone_identity(clf.backbone), "embedded": BACKBONE_DIR if embed else None},
              "deltas": [{"name": n, "method": h.method, "folder": _delta_folder(n, len(deltas))}
                         for n, h in deltas.items()]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tensors = {f"template.{k}": v for k, v in prompt_tensors(clf.template).items()}
        tensors.update({f"verbalizer.{k}": v for k, v in prompt_tensors(clf.verbalizer).items()})
        atomic_save_safetensors(tmp / TENSORS_FILE, tensors, metadata={"format": FORMAT})
        clf.template.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        if embed:
            clf.backbone.to_hf().save_pretrained(str(tmp / BACKBONE_DIR))
        for name, handle in deltas.items():
            handle.save(tmp / _delta_folder(name, len(deltas)))
        for name, obj in (extra_files or {}).items():
            atomic_write_json(tmp / name, obj)
        atomic_write_json(tmp / CONFIG_FILE, config)              # last: its presence marks a whole folder
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved classifier (%d classes, %d deltas) to %s", len(config["classes"]), len(deltas), path)
    return path


def _delta_folder(name: str, count: int) -> str:
    """``delta`` for a classifier's only delta (the layout run folders always had), else ``deltas/<name>``."""
    return "delta" if count == 1 else f"{DELTAS_DIR}/{name}"


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` folder to ``path``; an old ``path`` is moved aside first, then removed."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def read_classifier_config(path: str | os.PathLike) -> dict[str, Any]:
    """classifier.json of a folder; a folder that is not a classifier gets a one-line error naming what it lacks."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"classifier folder {path} does not exist; pass a folder written by "
                               f"clf.save_pretrained() or a seed folder of `promptdelta run`")
    if not (path / CONFIG_FILE).is_file():
        hint = (" (it is a delta folder: load it with pd.load_delta(model, folder))"
                if (path / "delta.json").is_file() else "")
        if (path / "ensemble.json").is_file():
            hint = " (it is the auto recipe's ensemble: load it with promptdelta.recipe_export.load_recipe(folder))"
        raise MissingFileError(f"{path} is not a classifier folder: it has no {CONFIG_FILE}{hint}; pass a folder "
                               f"written by clf.save_pretrained()")
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} is not valid JSON ({e}); save the classifier again") from None
    need = ("format", "classes", "template", "verbalizer", "backbone", "deltas")
    missing = [k for k in need if k not in config] if isinstance(config, dict) else list(need)
    if missing or config.get("format") != FORMAT:
        raise CheckpointError(f"{path / CONFIG_FILE} is not a {FORMAT} file (missing {missing or 'nothing'}, "
                              f"format {config.get('format') if isinstance(config, dict) else None!r}); save the "
                              f"classifier again")
    for d in config["deltas"]:                 # only folders inside the classifier are ever read
        folder = Path(str(d.get("folder", "")))
        if not d.get("folder") or folder.is_absolute() or ".." in folder.parts:
            raise CheckpointError(f"{path / CONFIG_FILE} lists delta folder {d.get('folder')!r}; a classifier's "
                                  f"deltas live in its own delta/ or deltas/<name>/: save the classifier again")
    embedded = [config["backbone"]["embedded"]] if config["backbone"].get("embedded") else []
    for name in (TENSORS_FILE, TOKENIZER_DIR, *embedded, *(d["folder"] for d in config["deltas"])):
        if not (path / name).exists():
            raise MissingFileError(f"{path} is missing {name}, which {CONFIG_FILE} lists; copy the whole folder "
                                   f"or save the classifier again")
    return config


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError / OSError on a bad file
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); save the classifier again") from None


def _check_backbone(backbone: nn.Module, saved: Mapping[str, Any], path: Path) -> None:
    from promptdelta.deltas.base import model_fingerprint

    here, there = model_fingerprint(backbone), saved["fingerprint"]
    if here != there:
        made = f"{saved.get('model_class')} {saved.get('name_or_path') or '(a live model)'}"
        this = f"{type(backbone).__name__} {getattr(backbone, 'name_or_path', None) or '(a live model)'}"
        raise BackboneError(f"classifier {path} was made on {made} (weights {str(there.get('weights'))[:12]}) but "
                            f"the given backbone is {this} (weights {str(here.get('weights'))[:12]}); pass the "
                            f"backbone it was trained on, or backbone=None to load the recorded one")


def load_classifier(path: str | os.PathLike, backbone: nn.Module | None = None, tokenizer: Any = None,
                    delta_names: Mapping[str, str] | None = None) -> nn.Module:
    """Rebuild a classifier folder; ``backbone=None`` loads the recorded backbone with ``pd.load_backbone``
    (or the folder's own ``backbone/`` after full fine-tuning).

    A given backbone must have the recorded fingerprint; the folder's deltas are attached to it (renamed by
    ``delta_names`` {saved name: new name} where given), and the classifier's ``delta_names`` lists them."""
    from promptdelta.backbones import load_backbone

    path = Path(path)
    config = read_classifier_config(path)
    ident = config["backbone"]
    if tokenizer is None:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIR), use_fast=True)
    if backbone is None:
        if not (ident.get("embedded") or ident.get("name_or_path")):
            raise BackboneError(f"classifier {path} was made on a live {ident.get('model_class')} with no recorded "
                                f"name or path; pass backbone=... (the model it was trained on)")
        source = path / ident["embedded"] if ident.get("embedded") else ident["name_or_path"]
        backbone, _ = load_backbone(source, tokenizer=tokenizer, dtype=ident.get("dtype"))
    _check_backbone(backbone, ident, path)
    classes, t, v = config["classes"], config["template"], config["verbalizer"]
    template = build_template(t["kind"], tokenizer, classes, t["options"], backbone)
    verbalizer = build_verbalizer(v["kind"], tokenizer, classes, v["options"], backbone)
    tensors = read_tensors(path / TENSORS_FILE)
    for prefix, module in (("template.", template), ("verbalizer.", verbalizer)):
        part = {k[len(prefix):]: x for k, x in tensors.items() if k.startswith(prefix)}
        load_prompt_tensors(module, part, f"{path / TENSORS_FILE} ({prefix[:-1]})")
    names = _attach_deltas(backbone, path, config["deltas"], delta_names or {})
    clf = build_classifier(backbone, tokenizer, classes, template, verbalizer, readout=config["readout"],
                           max_length=config["max_length"], scoring=config["scoring"],
                           length_normalize=config["length_normalize"])
    clf.delta_names = names
    return clf


def _attach_deltas(backbone: nn.Module, path: Path, deltas: list[dict], rename: Mapping[str, str]) -> list[str]:
    """Load each listed delta folder onto ``backbone``; on a failure the ones already attached are detached."""
    from promptdelta.deltas.base import load_delta

    handles = []
    try:
        for d in deltas:
            handles.append(load_delta(backbone, path / d["folder"], name=rename.get(d["name"], d["name"])))
    except BaseException:
        for h in handles:
            h.detach()
        raise
    return [h.name for h in handles]
