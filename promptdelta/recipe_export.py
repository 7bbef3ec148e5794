"""Save what the auto recipe (promptdelta/recipe.py) chose as a folder that ``promptdelta predict`` reads.

The recipe's scorers embed the plain texts (``bench.baselines.embed``: ``tokenize_pairs`` with the tokenizer's
own pair encoding, mean of the last hidden states) and put a logistic head on top. That is a prompt model
with two small parts registered here:

    "plain"  template     tokenize_pairs(examples, max_length): no template words, no mask; the readout is
                          "mean", so the classifier reads exactly the embedding the head was fitted on
    "linear" verbalizer   logits = W h + b (C, H). A binary sklearn head p1 = sigmoid(w.h + b) is the
                          softmax of [0, w.h + b]; a multiclass (multinomial) head is softmax(W h + b) as it
                          is; a class the head never saw gets bias -inf (probability 0, as in the recipe)

so ``logreg`` is the frozen body + that head (the body's name recorded, as ``promptdelta run`` does) and
``setfit`` the tuned body (its full weights in ``backbone/``, as after full fine-tuning) + its head. A mean
of several scorers (the ``ensemble`` choice, or SetFit over several bodies) has no single-model form (the
members run different bodies), so it is a folder of member classifier folders plus ``ensemble.json``:

    ensemble.json         format, classes, members [{name, folder, weight}]: P(y|x) = sum_k w_k P_k(y|x)
    members/<k>-<name>/   one classifier folder per member (each readable on its own)

``load_recipe(path)`` reads either kind; ``RecipeEnsemble.predict`` returns the same ``Predictions`` as a
classifier's (probabilities the weighted mean, labels their argmax).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from promptdelta.errors import CheckpointError, MissingFileError, TemplateError
from promptdelta.prompts.registry import (_swap_into_place, load_classifier, need_backbone, register_template,
                                          register_verbalizer, save_classifier)
from promptdelta.prompts.template import Template
from promptdelta.prompts.verbalizer import Verbalizer
from promptdelta.utils.io import atomic_write_json

ENSEMBLE_FORMAT = "promptdelta.ensemble/1"
ENSEMBLE_FILE = "ensemble.json"
RECIPE_FILE = "recipe.json"
MEMBERS_DIR = "members"


# ------------------------------------------------------------------------------ the prompt parts
def _check_tokenize(examples: Sequence[Any], max_length: Any) -> None:
    if not isinstance(max_length, int) or max_length <= 0:
        raise TemplateError(f"max_length must be a positive int, got {max_length!r}; pass e.g. max_length=128")
    if len(examples) == 0:
        raise TemplateError("tokenize() got no examples; pass a non-empty list of InputExample")


class PlainTemplate(Template):
    """The plain texts as the tokenizer encodes them (text_a, or the pair text_a + text_b with its own special
    tokens and token types): what sentence-embedding heads were fitted on. No mask: read it with
    ``readout="mean"`` (``mask_pos`` is 0, the first token, for the model's bookkeeping only). ``windows``: a
    single text longer than max_length is read whole in windows (``bench.baselines.tokenize_windows``: R >= B
    rows and their ``row_group``, which the mean readout pools per example)."""

    def __init__(self, tokenizer: Any, kind: str | None = None, windows: bool = False) -> None:
        super().__init__(tokenizer, kind)
        self.windows = bool(windows)

    def tokenize(self, examples: Sequence[Any], max_length: int = 256) -> dict[str, torch.Tensor]:
        from promptdelta.bench.baselines import tokenize_pairs, tokenize_windows

        _check_tokenize(examples, max_length)
        encode = tokenize_windows if self.windows else tokenize_pairs
        batch = encode(self.tokenizer, list(examples), max_length)                # (R, T) each
        batch["mask_pos"] = torch.zeros(batch["input_ids"].shape[0], 1, dtype=torch.long)   # (R, 1)
        return batch


class LinearVerbalizer(Verbalizer):
    """A linear head on the readout: label logits = W h + b, W (C, H). Zero at first; set by the exporter."""

    def __init__(self, classes: Sequence[str], hidden_size: int) -> None:
        super().__init__(classes)
        self.head = nn.Linear(hidden_size, len(self.classes))
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()

    def set_head(self, head: Any) -> None:
        """Copy a fitted sklearn LogisticRegression (its softmax(W h + b) becomes this head's)."""
        w, b = head_weights(head, self.num_classes)
        with torch.no_grad():
            self.head.weight.copy_(w)
            self.head.bias.copy_(b)

    def process(self, hidden: torch.Tensor, logits: torch.Tensor | None, backbone: Any) -> torch.Tensor:
        hidden, _ = self.single_mask(hidden, logits)
        return self.head(hidden.to(self.head.weight.dtype))                    # (B, H) -> (B, C)


class PriorLinearVerbalizer(LinearVerbalizer):
    """The recipe's prior head: label logits = cos(h, e_c) / tau + W h^ + b, h^ = h / |h| (B, H) -> (B, C): the
    body's zero-shot similarity to each class's description vector e_c (C, H) plus a linear head fitted on top
    of it (``recipe.fit_prior_head``). W = 0, b = 0 is the zero-shot classifier itself."""

    def __init__(self, classes: Sequence[str], class_embeds: torch.Tensor, temperature: float) -> None:
        super().__init__(classes, class_embeds.shape[1])
        if temperature <= 0:
            raise CheckpointError(f"temperature must be positive, got {temperature}; save the recipe again")
        self.register_buffer("class_embeds", nn.functional.normalize(class_embeds.detach().float(), dim=-1))  # (C, H)
        self.temperature = float(temperature)

    def set_weights(self, weight: Any, bias: Any) -> None:
        """Copy a fitted W (C, H) and b (C,)."""
        with torch.no_grad():
            self.head.weight.copy_(torch.as_tensor(np.asarray(weight), dtype=torch.float32))
            self.head.bias.copy_(torch.as_tensor(np.asarray(bias), dtype=torch.float32))

    def process(self, hidden: torch.Tensor, logits: torch.Tensor | None, backbone: Any) -> torch.Tensor:
        hidden, _ = self.single_mask(hidden, logits)
        h = nn.functional.normalize(hidden.to(self.head.weight.dtype), dim=-1)             # (B, H)
        return h @ self.class_embeds.T / self.temperature + self.head(h)                     # (B, C)


class PairTemplate(Template):
    """A text pair's two texts encoded apart, as rows 2i (text_a) and 2i + 1 (text_b) of one batch: B pairs ->
    (2B, T) rows, read with ``readout="mean"`` and paired again by ``PairCosineVerbalizer``."""

    def __init__(self, tokenizer: Any, kind: str | None = None) -> None:
        super().__init__(tokenizer, kind)

    def tokenize(self, examples: Sequence[Any], max_length: int = 256) -> dict[str, torch.Tensor]:
        from promptdelta.bench.baselines import tokenize_pairs
        from promptdelta.data.examples import InputExample

        _check_tokenize(examples, max_length)
        rows = [InputExample(text=t or "") for ex in examples for t in (ex.text, ex.text_b)]
        batch = tokenize_pairs(self.tokenizer, rows, max_length)                  # (2B, T) each
        batch["mask_pos"] = torch.zeros(len(rows), 1, dtype=torch.long)          # (2B, 1)
        if all(ex.label is not None for ex in examples):
            batch["labels"] = torch.tensor([ex.label for ex in examples], dtype=torch.long)   # (B,)
        return batch


class PairCosineVerbalizer(LinearVerbalizer):
    """Label logits from the cosine of a pair's two readouts: (2B, H) -> z = SCALE cos(h_a, h_b) (B, 1) ->
    w z + b (B, C), a linear head on one feature (a logistic regression fitted by the recipe, ``set_head``)."""

    SCALE = 10.0        # the feature the head was fitted on: cosines live in [-1, 1]

    def __init__(self, classes: Sequence[str]) -> None:
        super().__init__(classes, 1)

    def process(self, hidden: torch.Tensor, logits: torch.Tensor | None, backbone: Any) -> torch.Tensor:
        hidden, _ = self.single_mask(hidden, logits)
        pairs = nn.functional.normalize(hidden.to(self.head.weight.dtype), dim=-1).reshape(-1, 2, hidden.shape[-1])
        z = self.SCALE * (pairs[:, 0] * pairs[:, 1]).sum(-1, keepdim=True)       # (B, 1)
        return self.head(z)                                                      # (B, C)


def _build_pair(tokenizer: Any, classes: list[str] | None, options: dict[str, Any], backbone: Any) -> Template:
    return PairTemplate(tokenizer, kind=options.get("kind"))


def _build_pair_cosine(tokenizer: Any, classes: list[str] | None, options: dict[str, Any],
                       backbone: Any) -> Verbalizer:
    if not classes:
        raise CheckpointError("a pair-cosine verbalizer needs its classes; pass classes=[...]")
    return PairCosineVerbalizer(classes)


def _build_prior_linear(tokenizer: Any, classes: list[str] | None, options: dict[str, Any],
                         backbone: Any) -> Verbalizer:
    if not classes:
        raise CheckpointError("a prior-linear verbalizer needs its classes; pass classes=[...]")
    hidden = need_backbone(backbone, "prior-linear verbalizer").config.hidden_size
    return PriorLinearVerbalizer(classes, torch.ones(len(classes), hidden), float(options.get("temperature", 1.0)))


def _build_plain(tokenizer: Any, classes: list[str] | None, options: dict[str, Any], backbone: Any) -> Template:
    return PlainTemplate(tokenizer, kind=options.get("kind"), windows=bool(options.get("windows", False)))


def _build_linear(tokenizer: Any, classes: list[str] | None, options: dict[str, Any], backbone: Any) -> Verbalizer:
    if not classes:
        raise CheckpointError("a linear verbalizer needs its classes; pass classes=[...]")
    return LinearVerbalizer(classes, need_backbone(backbone, "linear verbalizer").config.hidden_size)


register_template("plain", PlainTemplate, _build_plain, lambda t: {"kind": t.kind, "windows": t.windows})
register_verbalizer("linear", LinearVerbalizer, _build_linear, lambda v: {})
register_verbalizer("prior-linear", PriorLinearVerbalizer, _build_prior_linear,
                    lambda v: {"temperature": v.temperature})
register_template("pair", PairTemplate, _build_pair, lambda t: {"kind": t.kind})
register_verbalizer("pair-cosine", PairCosineVerbalizer, _build_pair_cosine, lambda v: {})


# --------------------------------------------------------------------------------- scorer -> classifier
def _leaves(proba: Any, weight: float = 1.0) -> list[tuple[Any, float]]:
    """A recipe scorer as (leaf scorer, weight) pairs: a mean of members splits its weight equally."""
    members = getattr(proba, "members", None)
    if members is not None:
        return [leaf for m in members for leaf in _leaves(m, weight / len(members))]
    if getattr(proba, "head", None) is None and getattr(proba, "clf", None) is None:
        raise CheckpointError("this recipe scorer carries no head or model to save (a custom candidate?); save "
                              "the recipe's built-in candidates (setfit, logreg, ensemble, lora-soft, ...)")
    return [(proba, weight)]


def head_weights(head: Any, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fitted sklearn LogisticRegression -> (W (C, H), b (C,)) with softmax(W h + b) = its predict_proba."""
    coef = np.asarray(head.coef_, dtype=np.float64)                            # (K, H), K = 1 when binary
    icpt = np.asarray(head.intercept_, dtype=np.float64)                       # (K,)
    seen = [int(c) for c in head.classes_]
    if len(seen) == 2 and coef.shape[0] == 1:       # sigmoid(z) = softmax([0, z])[1]
        coef, icpt = np.stack([np.zeros_like(coef[0]), coef[0]]), np.array([0.0, icpt[0]])
    w = np.zeros((n_classes, coef.shape[1]))
    b = np.full(n_classes, -math.inf)               # a class absent from training: probability 0
    w[seen], b[seen] = coef, icpt
    return torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)


def leaf_classifier(leaf: Any, tokenizer: Any, classes: Sequence[str], max_length: int) -> nn.Module:
    """One recipe scorer as a PromptForClassification with the same probabilities."""
    from promptdelta.prompts.registry import build_classifier

    if getattr(leaf, "clf", None) is not None:       # already a prompt model (lora-soft, similarity, ...)
        return leaf.clf
    body, head = leaf.body, leaf.head
    if hasattr(head, "class_embeds"):                # recipe.PriorHead: zero-shot logits + a head on top
        verbalizer = PriorLinearVerbalizer(classes, torch.as_tensor(head.class_embeds), head.temperature)
        verbalizer.set_weights(head.weight, head.bias)
    else:                                            # an sklearn LogisticRegression
        verbalizer = LinearVerbalizer(classes, body.config.hidden_size)
        verbalizer.set_head(head)
    template = PlainTemplate(tokenizer, windows=getattr(leaf, "windows", False))
    return build_classifier(body, tokenizer, list(classes), template, verbalizer, readout="mean",
                            max_length=max_length)


def _embeds_body(leaf: Any) -> bool | None:
    """Write the body's weights when the candidate tuned them, or when no name records where it came from."""
    if getattr(leaf, "clf", None) is not None:     # a delta's folder needs its base by name (to_hf has no delta)
        from promptdelta.deltas.base import deltas_of

        backbone = leaf.clf.backbone
        return None if getattr(backbone, "name_or_path", None) or deltas_of(backbone) else True
    return bool(leaf.tuned) or not getattr(leaf.body, "name_or_path", None)


def _record(result: Any) -> dict[str, Any]:
    return {"chosen": result.chosen, "dev": result.dev_score, "refit": result.refit, "members": result.members,
            "max_length": result.max_length, "table": result.table}


def _check_free(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"{path} already exists and is not empty; pass overwrite=True (--overwrite) to replace "
                              f"it, or choose another path")


def save_recipe(result: Any, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``result`` (a RecipeResult) at ``path``: one classifier folder, or an ensemble folder of them."""
    if result.proba is None or result.tokenizer is None or not result.classes:
        raise CheckpointError("this RecipeResult has no scorer, tokenizer or classes to save; make it with "
                              "promptdelta.recipe.auto_recipe")
    path = Path(path)
    _check_free(path, overwrite)
    leaves = _leaves(result.proba)
    names = _leaf_names(leaves)
    extra = {RECIPE_FILE: _record(result)}
    if len(leaves) == 1:
        clf = leaf_classifier(leaves[0][0], result.tokenizer, result.classes, result.max_length)
        return save_classifier(clf, path, overwrite=overwrite, extra_files=extra,
                               save_backbone=_embeds_body(leaves[0][0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        members = []
        for k, ((leaf, weight), name) in enumerate(zip(leaves, names)):
            folder = f"{MEMBERS_DIR}/{k}-{name}"
            clf = leaf_classifier(leaf, result.tokenizer, result.classes, result.max_length)
            save_classifier(clf, tmp / folder, save_backbone=_embeds_body(leaf))
            members.append({"name": name, "folder": folder, "weight": weight})
        atomic_write_json(tmp / RECIPE_FILE, extra[RECIPE_FILE])
        atomic_write_json(tmp / ENSEMBLE_FILE, {"format": ENSEMBLE_FORMAT, "classes": list(result.classes),
                                                "combine": "weighted mean of the members' probabilities",
                                                "members": members})          # last: marks a whole folder
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _leaf_names(leaves: list[tuple[Any, float]]) -> list[str]:
    """Each leaf's candidate kind: setfit (a tuned body), logreg (a frozen one) or model (a prompt model)."""
    names = []
    for leaf, _ in leaves:
        names.append("setfit" if getattr(leaf, "tuned", False) else "logreg" if hasattr(leaf, "head")
                     else "model")
    return names


# ---------------------------------------------------------------------------------------- loading
class RecipeEnsemble(nn.Module):
    """Several classifiers over the same classes: P(y | x) = sum_k w_k P_k(y | x) (weights sum to 1)."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float], classes: Sequence[str]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.weights = [float(w) for w in weights]
        self.classes = list(classes)

    def predict_proba(self, inputs: Any, batch_size: int = 32, columns: Mapping[str, str] | None = None
                      ) -> torch.Tensor:
        """(N, C) weighted mean of the members' class probabilities."""
        from promptdelta.predict import predict

        probs = [w * predict(m, inputs, batch_size=batch_size, columns=columns).probs
                 for m, w in zip(self.models, self.weights)]
        return torch.stack(probs).sum(0)

    def predict(self, inputs: Any, batch_size: int = 32, top_k: int | None = None, progress: bool = False,
                columns: Mapping[str, str] | None = None) -> Any:
        """``Predictions`` like a classifier's: probabilities the members' weighted mean (logits = their log)."""
        from promptdelta.predict import Predictions

        return Predictions(self.classes, self.predict_proba(inputs, batch_size, columns).log(), top_k)


def load_recipe(path: str | os.PathLike) -> nn.Module:
    """A folder written by ``RecipeResult.save_pretrained`` (or ``promptdelta run --recipe auto``): a
    PromptForClassification, or a RecipeEnsemble of them."""
    import json

    path = Path(path)
    if not (path / ENSEMBLE_FILE).is_file():
        return load_classifier(path)
    try:
        record = json.loads((path / ENSEMBLE_FILE).read_text(encoding="utf-8"))
        members, classes = record["members"], record["classes"]
        ok = record["format"] == ENSEMBLE_FORMAT and all({"folder", "weight"} <= set(m) for m in members)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path / ENSEMBLE_FILE} is not a {ENSEMBLE_FORMAT} file; save the recipe again")
    models = []
    for m in members:
        folder = Path(str(m["folder"]))
        if folder.is_absolute() or ".." in folder.parts:
            raise CheckpointError(f"{path / ENSEMBLE_FILE} lists member folder {m['folder']!r} outside the ensemble; "
                                  f"save the recipe again")
        if not (path / folder).is_dir():
            raise MissingFileError(f"{path} is missing {folder}, which {ENSEMBLE_FILE} lists; copy the whole folder")
        models.append(load_classifier(path / folder))
    return RecipeEnsemble(models, [m["weight"] for m in members], classes)


# ------------------------------------------------------------------------- promptdelta run --recipe auto
def open_run_dir(config: Any, overwrite: bool, echo: Callable[[str], None] | None = None) -> Path:
    """Before any training: the output folder is writable; then the run folder is made with its config.yaml and
    run.json by run.py's ``prepare_run_dir``, as for ``promptdelta run``: an existing run of the same name is
    kept and this one goes to ``<name>-2`` (``--overwrite`` replaces it), the folder used said in one line."""
    import dataclasses

    from promptdelta.errors import ConfigError
    from promptdelta.run import check_writable, prepare_run_dir

    if config.train.resume:
        raise ConfigError("--resume continues a trained run; the auto recipe has no checkpoints to resume: drop "
                          "--resume (the run then goes to a new folder), or pass --overwrite to run it again")
    check_writable(Path(config.output_dir), "output folder", "--output-dir")
    name = config.name or recipe_run_name(config)
    return prepare_run_dir(dataclasses.replace(config, name=name), overwrite, echo)


def recipe_run_name(config: Any) -> str:
    data = Path(str(config.data).replace("builtin:", "")).name or "data"
    return f"{data}-recipe-auto-{f'{config.shots}shot' if config.shots else 'full'}"


def write_seed(run_dir: Path, seed: int, result: Any, rows: list[dict[str, Any]]) -> Path:
    """``run_dir/seed<N>/`` (the choice, see ``save_recipe``) and metrics.json over the seeds done so far."""
    from promptdelta.run import _versions, best_seed

    seed_dir = save_recipe(result, run_dir / f"seed{seed}")
    accs = [r["accuracy"] for r in rows]
    summary = {"accuracy_mean": float(np.mean(accs)),
               "accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
               "seeds": len(rows), **best_seed(rows)}
    atomic_write_json(run_dir / "metrics.json", {"recipe": "auto", "rows": rows, "summary": summary,
                                                 "versions": _versions()})
    return seed_dir
