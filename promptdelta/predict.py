"""Predict with a trained classifier: ``clf.predict(inputs)`` and ``promptdelta predict``.

``predict`` takes strings, dicts, InputExamples, a ``datasets.Dataset`` or a pandas DataFrame and returns a
:class:`Predictions` (labels, class probabilities ``softmax(label logits)``). Why it is fast: rows are sorted by
token count (longest first; ``sorted_batches``) so each batch pads to rows of similar length, the model runs in
eval mode under ``torch.inference_mode``, every attached delta that can merge is folded into the base weights
for the call (and unfolded after), so LoRA costs nothing at inference, and with the mask readout on native
BERT/RoBERTa the last layer runs at the mask row only (``PromptForClassification.pruned_positions``; exact).
Results come back in input order.

``promptdelta predict --model runs/x/seed13 --input FILE --output FILE`` reads JSONL, CSV, plain text (one
input per line) or stdin (``-``), maps columns with ``--columns text=review,text_b=premise`` and writes JSONL or
CSV (by the output's suffix; stdout without ``--output``) with the label and the probabilities.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptdelta.data.examples import InputExample
from promptdelta.errors import ConfigError, DataError, DeltaError, MissingFileError

logger = logging.getLogger(__name__)

TEXT_COLUMNS = ("text", "text_a", "sentence")          # tried in order when --columns names no text column
FORMATS = ("jsonl", "csv", "text")
CHUNK_ROWS = 4096                                      # rows tokenised in one call, then sorted by token count
_PER_TOKEN = ("input_ids", "attention_mask", "token_type_ids")   # (n, T) tensors a batch trims to its width


# ------------------------------------------------------------------------------------------- results
@dataclass
class Prediction:
    """One row's answer: the most probable class and the class probabilities (top_k of them when set)."""

    label: str
    probs: dict[str, float]


class Predictions:
    """Predictions for N inputs over C classes, in input order.

    ``labels`` (class names), ``label_ids`` LongTensor (N,), ``probs`` FloatTensor (N, C) = softmax of the label
    logits, ``classes``. ``len``, iteration and ``[i]`` give :class:`Prediction` rows; ``top_k`` keeps the k most
    probable classes of each row's ``probs`` dict, most probable first. ``tolist()``, ``shape`` and ``dtype``
    are those of ``label_ids`` (what ``predict`` returned before it returned probabilities).
    """

    def __init__(self, classes: Sequence[str], logits: torch.Tensor, top_k: int | None = None) -> None:
        self.classes = list(classes)
        self.label_ids = logits.argmax(-1) if logits.numel() else torch.zeros(0, dtype=torch.long)   # (N,)
        self.probs = logits.float().softmax(-1)                                                  # (N, C)
        self.top_k = top_k

    @property
    def labels(self) -> list[str]:
        return [self.classes[i] for i in self.label_ids.tolist()]

    def __len__(self) -> int:
        return len(self.label_ids)

    def __getitem__(self, i: int | slice) -> Prediction | list[Prediction]:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        probs = dict(zip(self.classes, self.probs[i].tolist()))
        if self.top_k is not None:
            probs = dict(sorted(probs.items(), key=lambda kv: -kv[1])[:self.top_k])
        return Prediction(self.classes[int(self.label_ids[i])], probs)

    def __iter__(self) -> Iterator[Prediction]:
        return (self[i] for i in range(len(self)))

    def to_rows(self) -> list[dict[str, Any]]:
        """[{"label": ..., "probs": {class: p}}] (what ``promptdelta predict`` writes)."""
        return [{"label": p.label, "probs": p.probs} for p in self]

    def tolist(self) -> list[int]:
        return self.label_ids.tolist()

    @property
    def shape(self) -> torch.Size:
        return self.label_ids.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.label_ids.dtype

    def __repr__(self) -> str:
        return f"Predictions({len(self)} rows, classes={self.classes})"


# ------------------------------------------------------------------------------------------- inputs
def parse_columns(text: str | None) -> dict[str, str]:
    """``"text=review,text_b=premise"`` -> {"text": "review", "text_b": "premise"} (example field = column)."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        field, eq, column = part.partition("=")
        if not eq or not field.strip() or not column.strip():
            raise ConfigError(f"--columns {text!r}: {part!r} is not FIELD=COLUMN; write e.g. "
                              f"--columns text=review,text_b=premise")
        out[field.strip()] = column.strip()
    return out


def _row_example(row: Mapping[str, Any], columns: Mapping[str, str], where: str) -> InputExample:
    """One dict -> InputExample: text (and text_b) from their columns, every other column as meta."""
    cols = dict(columns)
    if "text" not in cols and "text_a" in cols:
        cols["text"] = cols.pop("text_a")
    text_col = cols.get("text") or next((c for c in TEXT_COLUMNS if c in row), None)
    if text_col is None or text_col not in row:
        have = ", ".join(map(str, row)) or "none"
        raise DataError(f"{where} has no column {text_col or 'text'!r} (it has: {have}); name the text column "
                        f"with --columns text=COLUMN (Python: columns={{'text': 'COLUMN'}})")
    b_col = cols.get("text_b", "text_b")
    if "text_b" in cols and b_col not in row:
        raise DataError(f"{where} has no column {b_col!r} (it has: {', '.join(map(str, row))}); fix "
                        f"--columns text_b=COLUMN")
    meta = {k: v for k, v in row.items() if k not in (text_col, b_col)}
    meta.update({f: row[c] for f, c in cols.items() if f not in ("text", "text_b") and c in row})
    b = row.get(b_col)
    return InputExample(text=str(row[text_col]), text_b=None if b is None else str(b), meta=meta,
                        guid=str(row.get("guid", row.get("id", ""))))


def to_examples(inputs: Any, columns: Mapping[str, str] | None = None) -> list[InputExample]:
    """Strings, dicts, InputExamples, a datasets.Dataset or a pandas DataFrame -> InputExamples (unlabelled:
    a dict's or a row's label column is meta, not a label, so any label format is accepted)."""
    columns = dict(columns or {})
    if isinstance(inputs, (str, InputExample, Mapping)):
        inputs = [inputs]
    elif hasattr(inputs, "to_dict") and hasattr(inputs, "columns") and hasattr(inputs, "iloc"):   # pandas
        inputs = inputs.to_dict("records")
    elif hasattr(inputs, "column_names") and hasattr(inputs, "features"):                         # datasets
        inputs = list(inputs)
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, InputExample):
            out.append(item)
        elif isinstance(item, str):
            out.append(InputExample(text=item))
        elif isinstance(item, Mapping):
            out.append(_row_example(item, columns, f"input row {i}"))
        else:
            raise DataError(f"input {i} is a {type(item).__name__}; pass strings, dicts, InputExamples, a "
                            f"datasets.Dataset or a pandas DataFrame")
    return out


def _length(ex: InputExample) -> int:
    return len(ex.text or "") + len(ex.text_b or "")


# ------------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def merged_deltas(model: nn.Module) -> Iterator[list[str]]:
    """Merge every attached delta that can merge (LoRA, BitFit, intrinsic...) for the block; those already
    merged, and those that cannot (adapter, prefix, ladder), stay as they are. Yields the merged names."""
    from promptdelta.deltas.base import deltas_of
    from promptdelta.deltas.sites import DeltaWrapper

    # a delta switched off (handle.disabled()) must stay off: merging it would switch it back on
    off = {m.delta_name for m in model.modules() if isinstance(m, DeltaWrapper) and not m.enabled}
    done = []
    try:
        for name, handle in deltas_of(model).items():
            if handle.merged or name in off:
                continue
            try:
                handle.merge()
            except DeltaError:
                logger.debug("delta %r cannot merge; it runs unmerged", name)
                continue
            done.append(handle)
        yield [h.name for h in done]
    finally:
        for handle in done:
            handle.unmerge()


def _route_rows() -> Any:
    try:
        from promptdelta.deltas.mixed import route_rows
    except ImportError as e:
        raise DeltaError(f"predict(delta=[...]) needs promptdelta.deltas.mixed.route_rows, which this version "
                         f"lacks ({e}); predict each delta's rows separately") from None
    return route_rows


def predict(clf: nn.Module, inputs: Any, batch_size: int = 32, top_k: int | None = None,
            delta: Sequence[str | None] | None = None, progress: bool = False,
            columns: Mapping[str, str] | None = None) -> Predictions:
    """Label and class probabilities of every input (see the module docstring); the model's train/eval mode
    and its deltas' merge state are restored after."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive int, e.g. 32")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k={top_k!r} must be a positive int (or None for every class)")
    examples = to_examples(inputs, columns)
    if delta is not None and len(delta) != len(examples):
        raise DeltaError(f"delta= names {len(delta)} rows but there are {len(examples)} inputs; give one delta "
                         f"name (or None for the base model) per input row")
    logits = torch.zeros(len(examples), clf.verbalizer.num_classes)             # (N, C)
    route = _route_rows() if delta is not None else None
    was_training = clf.training
    clf.eval()
    bar = _bar(len(examples), progress)
    try:
        with (merged_deltas(clf.backbone) if delta is None else contextlib.nullcontext()), torch.inference_mode():
            for idx, batch in sorted_batches(clf, examples, batch_size):
                with route(clf.backbone, [delta[i] for i in idx]) if route else contextlib.nullcontext():
                    logits[idx] = clf(batch).float().cpu()                          # (b, C) back to input rows
                bar.update(len(idx))
    finally:
        bar.close()
        clf.train(was_training)
    return Predictions(clf.verbalizer.classes, logits, top_k)


def sorted_batches(clf: nn.Module, examples: Sequence[InputExample], batch_size: int,
                   chunk: int = CHUNK_ROWS) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(input rows, batch dict) of at most ``batch_size`` rows, longest first by TOKEN count.

    Rows are first ordered by characters (longest first), then each ``chunk`` of that order is tokenised in
    one call, re-sorted by its exact token counts and cut into batches by slicing the padded tensors (each
    trimmed to its own longest row). Why: on SST-2 (batch 32) character order leaves 23% more padded tokens
    than token order; one tokenizer call per chunk beats one per batch; chunks bound the memory for big
    inputs. A template whose batch is not plain right padding is tokenised per batch instead."""
    order = sorted(range(len(examples)), key=lambda i: -_length(examples[i]))    # longest first, stable
    for c in range(0, len(order), chunk):
        rows = order[c:c + chunk]
        full = clf.collate([examples[i] for i in rows])
        # a template may read an example as several rows (a pair's texts, a long text's windows): then rows
        # are not examples, and batches are tokenised per batch in character order
        one_row_each = "row_group" not in full and full["attention_mask"].shape[0] == len(rows)
        lengths = full["attention_mask"].sum(1)                                   # (n,)
        sliceable = one_row_each and _right_padded(full)
        by_tokens = (sorted(range(len(rows)), key=lambda j: -int(lengths[j]))    # stable: ties keep char order
                     if one_row_each else list(range(len(rows))))
        for s in range(0, len(rows), batch_size):
            part = by_tokens[s:s + batch_size]
            idx = [rows[j] for j in part]
            if not sliceable:
                yield idx, clf.collate([examples[i] for i in idx])
                continue
            take, width = torch.tensor(part), int(lengths[part[0]])             # the batch's longest row
            yield idx, {k: (v[take, :width] if k in _PER_TOKEN else v[take]) for k, v in full.items()}


def _right_padded(batch: Mapping[str, torch.Tensor]) -> bool:
    """Whether every row's tokens come first, then padding, and no tensor other than _PER_TOKEN spans T."""
    mask = batch["attention_mask"]                                                # (n, T)
    n, width = mask.shape
    if any(k not in _PER_TOKEN and v.dim() >= 2 and v.shape[:2] == (n, width) for k, v in batch.items()):
        return False
    return bool((mask == (torch.arange(width) < mask.sum(1, keepdim=True))).all())


def _bar(total: int, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="predict", unit="row", disable=not show, file=sys.stderr)


# ------------------------------------------------------------------------------------------- files
def _format(path: str, given: str | None, default: str) -> str:
    if given:
        return given
    suffix = Path(path).suffix.lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "csv"}.get(suffix, default)


def read_rows(path: str, fmt: str | None = None) -> list[Any]:
    """Rows of a JSONL / CSV / plain-text file, or of stdin (``-``: JSONL when it starts with ``{``, else text)."""
    if path == "-":
        text, name = sys.stdin.read(), "stdin"
        fmt = fmt or ("jsonl" if text.lstrip().startswith("{") else "text")
    else:
        if not Path(path).is_file():
            raise MissingFileError(f"--input {path} does not exist; pass a JSONL, CSV or text file, or - for stdin")
        text, name, fmt = Path(path).read_text(encoding="utf-8"), path, _format(path, fmt, "text")
    if fmt == "text":
        return [line for line in text.splitlines() if line.strip()]
    if fmt == "csv":
        dialect = "excel-tab" if name.endswith(".tsv") else "excel"
        return list(csv.DictReader(io.StringIO(text), dialect=dialect))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{n} is not a JSON line ({e.msg}); fix that line or pass --input-format") from None
        if not isinstance(row, dict):
            raise DataError(f"{name}:{n} is a JSON {type(row).__name__}, not an object; write one {{...}} per line")
        rows.append(row)
    return rows


def output_rows(examples: Sequence[InputExample], results: Mapping[str, Predictions], fmt: str) -> list[dict]:
    """One dict per input: its id (when it has one), text(s), then per model the label and the probabilities
    (keys prefixed ``<model>.`` when several models answer). JSONL: ``probs`` is a {class: p} dict (the top_k
    most probable first, when set); CSV: one ``prob_<class>`` column per class, or ``top<i>`` / ``top<i>_prob``
    under top_k."""
    rows = []
    for i, ex in enumerate(examples):
        row: dict[str, Any] = {"id": ex.guid} if ex.guid else {}          # an input's id/guid column, to join on
        row.update({"text": ex.text, **({"text_b": ex.text_b} if ex.text_b is not None else {})})
        for name, preds in results.items():
            p, pre = preds[i], (f"{name}." if len(results) > 1 else "")
            row[pre + "label"] = p.label
            if fmt == "jsonl":
                row[pre + "probs"] = p.probs
            elif preds.top_k is None:
                row.update({f"{pre}prob_{c}": v for c, v in p.probs.items()})
            else:
                for rank, (c, v) in enumerate(p.probs.items(), 1):
                    row[f"{pre}top{rank}"], row[f"{pre}top{rank}_prob"] = c, v
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def model_names(folders: Sequence[str]) -> list[str]:
    """Display names: each folder's own name, or the path as given where two share a name."""
    names = [Path(f).name or str(f) for f in folders]
    return [n if names.count(n) == 1 else str(f) for n, f in zip(names, folders)]


def run_predict(models: Sequence[str], input_path: str, output: str | None = None, columns: str | None = None,
                batch_size: int = 32, top_k: int | None = None, input_format: str | None = None,
                device: str = "cpu", overwrite: bool = False, progress: bool = True) -> int:
    """``promptdelta predict``: read, predict with every model, write; returns the number of rows written."""
    out_fmt = _format(output, None, "jsonl") if output and output != "-" else "jsonl"
    if output and output != "-" and Path(output).exists() and not overwrite:
        raise ConfigError(f"--output {output} already exists; pass --overwrite to replace it, or another path")
    examples = to_examples(read_rows(input_path, input_format), parse_columns(columns))
    if not examples:
        raise DataError(f"--input {input_path} holds no rows; give one input per line")
    if len(models) == 1:
        from promptdelta.recipe_export import load_recipe

        clf = load_recipe(models[0]).to(device)      # a classifier folder, or the auto recipe's ensemble of them
        results = {model_names(models)[0]: clf.predict(examples, batch_size=batch_size, top_k=top_k,
                                                       progress=progress)}
    else:
        try:
            from promptdelta.deltas.mixed import predict_many
        except ImportError:
            raise ConfigError("several --model folders need promptdelta.deltas.mixed.predict_many (not in this "
                              "version); pass one --model") from None
        many = predict_many([str(m) for m in models], examples, batch_size=batch_size, top_k=top_k)
        results = {name: many[str(m)] for name, m in zip(model_names(models), models)}
    text = format_rows(output_rows(examples, results, out_fmt), out_fmt)
    if output and output != "-":
        from promptdelta.utils.io import atomic_write_text

        atomic_write_text(output, text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return len(examples)
