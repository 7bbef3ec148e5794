"""Load a classification task as (train, dev, test) ``ExampleSet``s.

Sources ``load`` understands:

- a folder of JSONL splits: ``train.jsonl`` (the pool), optional ``dev.jsonl``, ``test.jsonl``, and
  ``labels.txt`` (``index<TAB>name`` per line, in index order). Each line is
  ``{"text": ..., "text_b": ... (pair tasks), "label": int}``; other keys go to ``InputExample.meta``.
- CSV: a folder of ``train.csv`` / ``dev.csv`` / ``test.csv`` (columns text, optional text_b, label; a
  label is a class index or a class name), or one CSV/JSONL file with a ``split`` column.
- ``"builtin:demo"`` (or ``"demo"``): the bundled demo task (``promptdelta/data/builtin/demo``).
- ``datasets``: a folder written by ``save_to_disk``, a ``Dataset``/``DatasetDict`` object, or a hub name
  (only where a hub is reachable). Class names come from the label's ``ClassLabel`` feature.
- in memory: a pandas ``DataFrame`` or a list of dicts (rows; an optional ``split`` column), or a dict of
  them per split (``{"train": df_train, "test": df_test}``).

Any column names: ``columns={"text": "sentence", "label": "y"}``. Single-split data (one file without a
``split`` column, a lone ``Dataset``, a DataFrame) is the train pool: a fixed, stratified 20% of it
(``TEST_SEED``, the same for every run seed) becomes the test split, and the log says so.

Class names come from, in order: labels.txt / the ClassLabel feature, the ``classes=`` argument, or (CSV
and datasets only) the sorted unique label names (all-integer labels give classes "0".."n-1").
"""

from __future__ import annotations

import csv
import json
import logging
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from promptdelta.data.examples import ExampleSet, InputExample
from promptdelta.data.sampler import few_shot_split, stratified_holdout
from promptdelta.errors import ConfigError, DataError, MissingFileError

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
SPLIT_ALIASES = {"train": ("train",), "dev": ("dev", "validation", "valid", "val"), "test": ("test",)}
FIELDS = ("text", "text_b", "label")
LABELS_FILE = "labels.txt"
LABELS_HINT = ("labels.txt must list one class per line as 'index<TAB>name', in index order from 0, "
               "e.g. '0<TAB>negative' then '1<TAB>positive'")
HOLDOUT_FRACTION = 0.1
TEST_FRACTION = 0.2   # of a single-split pool, held out as test
TEST_SEED = 0         # fixed: every run seed is scored on the same test examples
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"

Record = tuple[str, dict]  # (where, row): where = "file:line" or "name[split] row i", for error messages


@dataclass
class _RawTask:
    """A source read into rows per split, before labels are resolved."""

    name: str
    splits: dict[str, list[Record]]
    classes: list[str] | None = None  # from labels.txt or a ClassLabel feature
    classes_from: str = ""
    looked_for: str = ""  # what was searched for, named in "no test split" errors
    missing_labels: Path | None = None  # a JSONL folder's labels.txt that does not exist


# ----------------------------------------------------------------------------------------------- public


def builtin_path(name: str = "demo") -> Path:
    """Folder of a built-in task (``promptdelta/data/builtin/<name>``)."""
    path = BUILTIN_DIR / name
    if not (path / LABELS_FILE).is_file():
        available = sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / LABELS_FILE).is_file())
        raise DataError(f"no built-in task {name!r}; available: {available}, e.g. load('builtin:demo')")
    return path


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from a labels.txt file (``index<TAB>name`` per line, in index order)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist; {LABELS_HINT}")
    names: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t", 1) if "\t" in line else line.strip().split(None, 1)
        if len(parts) != 2 or not parts[0].strip().isdigit() or not parts[1].strip():
            raise DataError(f"{path}:{lineno}: expected 'index<TAB>name', got {line!r}; {LABELS_HINT}")
        index, name = int(parts[0]), parts[1].strip()
        if index != len(names):
            raise DataError(f"{path}:{lineno}: index {index} is out of order (expected {len(names)}); "
                            f"{LABELS_HINT}")
        if name in names:
            raise DataError(f"{path}:{lineno}: class name {name!r} appears twice; give each class one line")
        names.append(name)
    if not names:
        raise DataError(f"{path} lists no classes; {LABELS_HINT}")
    return names


def read_records(path: str | os.PathLike) -> list[Record]:
    """Rows of a .jsonl or .csv file as ``(where, row)`` pairs, ``where`` = ``"file:line"``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist; pass an existing .jsonl or .csv file")
    try:
        if path.suffix.lower() == ".csv":
            return _read_csv(path)
        if path.suffix.lower() == ".jsonl":
            return _read_jsonl(path)
    except UnicodeDecodeError as err:        # name the file and the first line that is not UTF-8
        for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                raise DataError(f"{path}:{lineno} is not UTF-8 text (byte {raw[bad.start]:#04x} at column "
                                f"{bad.start + 1}); save the file as UTF-8") from None
        raise DataError(f"{path} is not UTF-8 text ({err.reason}); save the file as UTF-8") from None
    raise DataError(f"{path}: unknown file type {path.suffix!r}; use a .jsonl or a .csv file")


def load_split_file(path: str | os.PathLike, classes: Sequence[str], split: str = "",
                    columns: Mapping[str, str] | None = None) -> ExampleSet:
    """One .jsonl / .csv split file as an ``ExampleSet`` with the given class names."""
    path = Path(path)
    split = split or path.stem
    records = read_records(path)
    return _to_set(records, split, list(classes), "the classes passed to load_split_file", _columns(columns),
                   name=f"{path.parent.name}/{split}")


def load(source: Any, shots: int | None = None, seed: int = 13, dev_shots: int | None = None,
         columns: Mapping[str, str] | None = None, split_names: Mapping[str, str] | None = None,
         classes: Sequence[str] | None = None) -> tuple[ExampleSet, ExampleSet, ExampleSet]:
    """Load ``source`` as ``(train, dev, test)``.

    With ``shots=k``: train and dev are k per class each (dev: ``dev_shots`` per class when given), drawn
    without overlap from the train pool with ``seed`` (LM-BFF); test is the full test split. Without
    shots: train is the full train split; dev is the dev split, else a seeded 10% stratified hold-out.
    ``columns`` maps our fields to source columns (``{"text": "sentence"}``); ``split_names`` maps our
    splits to source split names (``{"dev": "validation"}``).
    """
    cols, names = _columns(columns), _split_names(split_names)
    if dev_shots is not None and shots is None:
        raise ConfigError("dev_shots is set but shots is None; pass shots=k as well, or drop dev_shots")
    task = _read_source(source, names, cols)
    class_list, classes_from = _decide_classes(task, classes, cols)
    if "train" in task.splits and "test" not in task.splits:
        task.splits["train"], task.splits["test"] = _split_pool(task, class_list, classes_from, cols)
    for needed in ("train", "test"):
        if needed not in task.splits:
            raise DataError(f"{task.name} has no {needed} split (looked for {task.looked_for}); add a "
                            f"{needed} file/split next to the others, or name it with "
                            f"split_names={{'{needed}': '<its name>'}}")
    sets = {split: _to_set(rows, split, class_list, classes_from, cols, name=f"{task.name}/{split}")
            for split, rows in task.splits.items()}
    train, dev = _train_dev(sets, shots, seed, dev_shots)
    return train, dev, sets["test"]


# ------------------------------------------------------------------------------------ split policy


def _train_dev(sets: dict[str, ExampleSet], shots: int | None, seed: int,
               dev_shots: int | None) -> tuple[ExampleSet, ExampleSet]:
    pool = sets["train"]
    if not pool:
        raise DataError(f"the train split of {pool.name} is empty; add labelled examples to it")
    if shots is not None:
        if "dev" in sets:
            logger.info("%s: shots=%s draws dev from the train pool; the dev split is not used", pool.name, shots)
        return few_shot_split(pool, shots, seed=seed, dev_k=dev_shots)
    if "dev" in sets:
        return pool, sets["dev"]
    train, dev = stratified_holdout(pool, HOLDOUT_FRACTION, seed=seed)
    logger.info("%s has no dev split: holding out %d of %d train examples (stratified, seed %d) as dev",
                pool.name, len(dev), len(pool), seed)
    return train, dev


def _split_pool(task: _RawTask, classes: list[str], classes_from: str,
                cols: dict[str, str]) -> tuple[list[Record], list[Record]]:
    """A single-split task's pool as (train rows, test rows): a stratified TEST_FRACTION with TEST_SEED."""
    rows = task.splits["train"]
    pool = _to_set(rows, "train", classes, classes_from, cols, name=task.name)
    keep = {id(ex): i for i, ex in enumerate(pool)}
    rest, test = stratified_holdout(pool, TEST_FRACTION, seed=TEST_SEED)
    if not test:
        raise DataError(f"{task.name} has no test split and too few examples to hold one out ({len(pool)}); "
                        f"add a test file/split, or at least 2 labelled examples per class")
    logger.info("%s has no test split: holding out %d of %d examples (stratified, seed %d) as test",
                task.name, len(test), len(pool), TEST_SEED)
    return [rows[keep[id(ex)]] for ex in rest], [rows[keep[id(ex)]] for ex in test]


# ------------------------------------------------------------------------------------ source reading


def _read_source(source: Any, names: dict[str, tuple[str, ...]], cols: dict[str, str]) -> _RawTask:
    if type(source).__module__.split(".")[0] == "datasets":
        return _from_datasets(source, type(source).__name__, names, cols)
    if _is_rows(source):
        return _from_rows(source, type(source).__name__, names)
    if isinstance(source, Mapping) and source and all(_is_rows(v) for v in source.values()):
        return _from_row_splits(source, names)
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"cannot load data from a {type(source).__name__}; pass a folder, a .csv/.jsonl file, "
                        f"'builtin:demo', a datasets name or Dataset/DatasetDict, a pandas DataFrame, a list of "
                        f"dicts, or a dict of those per split")
    text = os.fspath(source)
    if text == "demo" or text.startswith("builtin:"):
        return _from_folder(builtin_path(text.split(":", 1)[-1]), names)
    path = Path(text).expanduser()
    if path.is_dir():
        if any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            import datasets

            return _from_datasets(datasets.load_from_disk(str(path)), path.name, names, cols)
        return _from_folder(path, names)
    if path.is_file():
        return _from_single_file(path, names)
    if isinstance(source, os.PathLike) or _looks_like_path(text):
        raise MissingFileError(f"data folder or file {text!r} does not exist; pass an existing folder "
                               f"(train.jsonl + test.jsonl + labels.txt, or train.csv + test.csv), a .csv "
                               f"file, or 'builtin:demo'")
    return _from_hub(text, names, cols)


def _looks_like_path(text: str) -> bool:
    path = Path(text).expanduser()
    return (path.is_absolute() or text.startswith((".", "~")) or path.suffix.lower() in (".csv", ".jsonl")
            or (len(path.parts) > 1 and path.parent.exists()))


def _find_split_file(folder: Path, aliases: tuple[str, ...], suffix: str) -> Path | None:
    for alias in aliases:
        if (folder / f"{alias}{suffix}").is_file():
            return folder / f"{alias}{suffix}"
    return None


def _from_folder(folder: Path, names: dict[str, tuple[str, ...]]) -> _RawTask:
    suffix = next((s for s in (".jsonl", ".csv") if _find_split_file(folder, names["train"] + names["test"], s)),
                  None)
    if suffix is None:
        raise DataError(f"{folder} holds no train/test data files; put train.jsonl and test.jsonl (with "
                        f"labels.txt), or train.csv and test.csv, in it")
    files = {s: _find_split_file(folder, names[s], suffix) for s in SPLITS}
    labels = folder / LABELS_FILE
    task = _RawTask(name=folder.name, splits={s: read_records(f) for s, f in files.items() if f},
                    looked_for=", ".join(f"{a}{suffix}" for s in SPLITS for a in names[s]) + f" in {folder}")
    if labels.is_file():
        task.classes, task.classes_from = read_labels(labels), str(labels)
    elif suffix == ".jsonl":
        task.missing_labels = labels
    return task


def _from_single_file(path: Path, names: dict[str, tuple[str, ...]]) -> _RawTask:
    return _split_by_column(read_records(path), path.stem, names, f" in {path}")


def _split_by_column(records: list[Record], name: str, names: dict[str, tuple[str, ...]],
                     where_from: str) -> _RawTask:
    """Rows with a ``split`` column go to their split; rows without one are all the train pool."""
    if not records or "split" not in records[0][1]:
        return _RawTask(name=name, splits={"train": records}, looked_for=f"a 'split' column{where_from}")
    splits: dict[str, list[Record]] = {}
    by_alias = {alias: split for split in SPLITS for alias in names[split]}
    for where, row in records:
        value = str(row.pop("split", "")).strip()
        if value not in by_alias:
            raise DataError(f"{where}: split {value!r} is not one of {sorted(by_alias)}; fix the split column")
        splits.setdefault(by_alias[value], []).append((where, row))
    return _RawTask(name=name, splits=splits, looked_for=f"rows with split in {sorted(by_alias)}{where_from}")


# ------------------------------------------------------------------------- in-memory rows (pandas, dicts)


def _is_rows(obj: Any) -> bool:
    """A pandas DataFrame, or a non-empty list/tuple of dicts."""
    if type(obj).__name__ == "DataFrame" and type(obj).__module__.split(".")[0] == "pandas":
        return True
    return isinstance(obj, (list, tuple)) and bool(obj) and all(isinstance(r, Mapping) for r in obj)


def _row_records(obj: Any, where: str) -> list[Record]:
    if isinstance(obj, (list, tuple)):
        return [(f"{where} row {i}", dict(r)) for i, r in enumerate(obj)]
    rows = obj.to_dict("records")  # DataFrame: NaN (an empty cell) becomes None, as an empty CSV field would
    return [(f"{where} row {i}", {k: (None if v != v else v) for k, v in r.items()}) for i, r in enumerate(rows)]


def _from_rows(obj: Any, name: str, names: dict[str, tuple[str, ...]]) -> _RawTask:
    return _split_by_column(_row_records(obj, name), name, names, f" of the {name}")


def _from_row_splits(parts: Mapping[str, Any], names: dict[str, tuple[str, ...]]) -> _RawTask:
    by_alias = {alias: split for split in SPLITS for alias in names[split]}
    unknown = sorted(k for k in parts if k not in by_alias)
    if unknown:
        raise DataError(f"split name(s) {unknown} of the dict are not one of {sorted(by_alias)}; name the keys "
                        f"train / dev / test, or pass split_names={{'dev': '<your key>'}}")
    splits = {by_alias[k]: _row_records(v, f"data[{k!r}]") for k, v in parts.items()}
    return _RawTask(name="data", splits=splits, looked_for=f"keys {sorted(by_alias)} of the dict")


def _read_jsonl(path: Path) -> list[Record]:
    records: list[Record] = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno}); make every "
                                f'line one JSON object, e.g. {{"text": "great film", "label": 1}}') from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: a line must be a JSON object, got {type(row).__name__}; "
                                f'write it as {{"text": "...", "label": 0}}')
            records.append((f"{path}:{lineno}", row))
    return records


def _read_csv(path: Path) -> list[Record]:
    records: list[Record] = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path} is empty; its first line must be a header such as 'text,label'")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise DataError(f"{where}: more fields than the header has; quote fields that contain commas")
            records.append((where, row))
    return records


# -------------------------------------------------------------------------------- datasets library


def _from_hub(name: str, names: dict[str, tuple[str, ...]], cols: dict[str, str]) -> _RawTask:
    import datasets

    try:
        obj = datasets.load_dataset(name)
    except Exception as e:  # any failure (offline, unknown name, auth) has the same fix
        detail = f"{type(e).__name__}: {str(e)[:200]}"
        raise DataError(f"{name!r} is not a local folder or file, and loading it from the Hugging Face hub "
                        f"failed ({detail}); pass a local folder (train.jsonl + test.jsonl + labels.txt, or "
                        f"train.csv + test.csv), a folder saved with Dataset.save_to_disk, or 'builtin:demo'"
                        ) from e
    return _from_datasets(obj, name, names, cols)


def _from_datasets(obj: Any, name: str, names: dict[str, tuple[str, ...]], cols: dict[str, str]) -> _RawTask:
    import datasets

    parts = {"train": obj} if isinstance(obj, datasets.Dataset) else dict(obj)
    looked_for = f"splits {sorted({a for s in SPLITS for a in names[s]})} among {sorted(parts)} of {name}"
    task = _RawTask(name=name, splits={}, looked_for=looked_for)
    for split in SPLITS:
        key = next((a for a in names[split] if a in parts), None)
        if key is not None:
            task.splits[split] = _dataset_records(parts[key], f"{name}[{key}]", cols["label"])
    train_key = next((a for a in names["train"] if a in parts), None)
    first = parts[train_key] if train_key else next(iter(parts.values()), None)
    feature = first.features.get(cols["label"]) if first is not None else None
    if isinstance(feature, datasets.ClassLabel):
        task.classes, task.classes_from = list(feature.names), f"the ClassLabel feature {cols['label']!r} of {name}"
    return task


def _dataset_records(ds: Any, where: str, label_col: str) -> list[Record]:
    records: list[Record] = []
    hidden = 0
    for i, row in enumerate(ds):
        if row.get(label_col) == -1:  # the hub's marker for a hidden (unlabelled) test label
            row[label_col], hidden = None, hidden + 1
        records.append((f"{where} row {i}", row))
    if hidden:
        logger.info("%s: %d rows have label -1 (hidden); they are loaded unlabelled", where, hidden)
    return records


# ------------------------------------------------------------------------- classes and conversion


def _decide_classes(task: _RawTask, classes: Sequence[str] | None, cols: dict[str, str]) -> tuple[list[str], str]:
    given = list(classes) if classes is not None else None
    if task.classes is not None:
        if given is not None and given != task.classes:
            raise DataError(f"classes={given} differ from {task.classes} given by {task.classes_from}; "
                            f"drop the classes= argument or fix {task.classes_from}")
        return task.classes, task.classes_from
    if given is not None:
        if not given or len(set(given)) != len(given):
            raise ConfigError(f"classes={given} must be a non-empty list of distinct names")
        return given, "the classes= argument"
    if task.missing_labels is not None:
        raise DataError(f"{task.missing_labels} is missing; {LABELS_HINT} (or pass classes=[...] to load)")
    return _infer_classes(task, cols["label"])


def _infer_classes(task: _RawTask, label_col: str) -> tuple[list[str], str]:
    raw = [row.get(label_col) for rows in task.splits.values() for _, row in rows]
    raw = [str(v).strip() for v in raw if v is not None and str(v).strip() != ""]
    if not raw:
        raise DataError(f"{task.name} has no labels in column {label_col!r}; add a label column or map "
                        f"yours with columns={{'label': '<your column>'}}")
    numeric = [v.lstrip("-").isdigit() for v in raw]
    if all(numeric):
        classes = [str(i) for i in range(max(int(v) for v in raw) + 1)]
    elif not any(numeric):
        classes = sorted(set(raw))
    else:
        raise DataError(f"{task.name} mixes label indices and label names in {label_col!r}; use one kind, or "
                        f"pass classes=[...] (or a labels.txt) so names and indices can be matched")
    logger.info("%s: no labels.txt or classes=; inferred classes %s from the labels", task.name, classes)
    return classes, f"the classes inferred from the labels of {task.name} ({classes})"


def _label_index(raw: Any, classes: list[str], where: str, classes_from: str) -> int | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, str):
        if raw.strip() in classes:
            return classes.index(raw.strip())
        if not raw.strip().lstrip("-").isdigit():
            raise DataError(f"{where}: label {raw!r} is not a class name {classes} (from {classes_from}) nor "
                            f"an index; fix the label, or list the class in labels.txt / classes=")
        raw = int(raw)
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, numbers.Integral) and not isinstance(raw, bool):
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise DataError(f"{where}: label {raw!r} must be a class index (int) or a class name; fix the label")
    if not 0 <= raw < len(classes):
        raise DataError(f"{where}: label {raw} is out of range: {classes_from} defines {len(classes)} classes "
                        f"(indices 0..{len(classes) - 1}); fix the label or add the class to {classes_from}")
    return raw


def _to_example(where: str, row: dict, guid: str, classes: list[str], classes_from: str,
                cols: dict[str, str]) -> InputExample:
    text = row.get(cols["text"])
    if not isinstance(text, str):
        problem = f"no {cols['text']!r} field (found {sorted(row)})" if text is None else \
            f"{cols['text']!r} is a {type(text).__name__}, not a string"
        raise DataError(f"{where}: {problem}; every example needs a text: name the column 'text' or pass "
                        f"columns={{'text': '<your column>'}}")
    text_b = row.get(cols["text_b"])
    label = _label_index(row.get(cols["label"]), classes, where, classes_from)
    used = {cols["text"], cols["text_b"], cols["label"], "guid"}
    meta = {k: v for k, v in row.items() if k not in used}
    return InputExample(text=text, text_b=str(text_b) if text_b not in (None, "") else None,
                        label=label, meta=meta, guid=str(row.get("guid") or guid))


def _to_set(records: Iterable[Record], split: str, classes: list[str], classes_from: str,
            cols: dict[str, str], name: str) -> ExampleSet:
    examples = [_to_example(where, row, f"{split}-{i}", classes, classes_from, cols)
                for i, (where, row) in enumerate(records)]
    return ExampleSet(examples, classes=classes, name=name)


def _columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    cols = {f: f for f in FIELDS}
    unknown = sorted(set(columns or {}) - set(FIELDS))
    if unknown:
        raise ConfigError(f"columns= has unknown key(s) {unknown}; the keys are {list(FIELDS)}, mapping each "
                          f"to your column name, e.g. columns={{'text': 'sentence'}}")
    cols.update(columns or {})
    return cols


def _split_names(split_names: Mapping[str, str] | None) -> dict[str, tuple[str, ...]]:
    unknown = sorted(set(split_names or {}) - set(SPLITS))
    if unknown:
        raise ConfigError(f"split_names= has unknown key(s) {unknown}; the keys are {list(SPLITS)}, e.g. "
                          f"split_names={{'dev': 'validation'}}")
    return {s: ((split_names[s],) if split_names and s in split_names else SPLIT_ALIASES[s]) for s in SPLITS}
