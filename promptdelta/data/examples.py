"""Examples and example sets: the unit of data every other layer consumes.

An ``InputExample`` is one text (or text pair) with an optional integer label; an ``ExampleSet`` is a
plain list of them that also knows its class names (``classes[label]`` is the name of ``label``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, SupportsIndex, overload

from promptdelta.errors import DataError


@dataclass(init=False)
class InputExample:
    """One example.

    Args:
        text: the first (or only) text; ``text_a=`` is accepted as its OpenPrompt name.
        text_b: the second text of a pair task (e.g. the hypothesis of RTE), else None.
        label: the class index into ``ExampleSet.classes``, or None when unlabelled.
        meta: extra fields from the source (any JSON key / CSV column not used above).
        guid: a stable id, e.g. ``"train-17"`` (split and line number in the source file).

    Positional arguments: one is the text (``InputExample("great film", label=1)``); two or more follow
    OpenPrompt's order ``InputExample(guid, text_a, text_b, label, meta)``, so OpenPrompt code runs unchanged.
    """

    text: str
    text_b: str | None
    label: int | None
    meta: dict[str, Any]
    guid: str

    def __init__(self, *args: Any, text: str | None = None, text_a: str | None = None, text_b: str | None = None,
                 label: int | None = None, meta: dict[str, Any] | None = None, guid: str = "") -> None:
        if len(args) > 5:
            raise DataError(f"InputExample takes at most 5 positional arguments (guid, text_a, text_b, label, "
                            f"meta), got {len(args)}; pass the fields by name, e.g. InputExample(text=..., label=0)")
        given = {"text": text, "text_a": text_a, "text_b": text_b, "label": label, "meta": meta, "guid": guid or None}
        # one positional = the text (our short form); more = OpenPrompt's (guid, text_a, text_b, label, meta)
        names = ("text",) if len(args) == 1 else ("guid", "text_a", "text_b", "label", "meta")
        for name, value in zip(names, args):
            if given[name] is not None:
                raise DataError(f"InputExample got {name} both by position and by name; pass it once")
            given[name] = value
        if given["text"] is not None and given["text_a"] is not None:
            raise DataError("InputExample got both text= and text_a= (the same field); pass one of them")
        self.text = given["text"] if given["text"] is not None else given["text_a"]
        if self.text is None:
            raise DataError(f"InputExample has no text (got guid={given['guid']!r}); pass text= (or text_a=, or "
                            f"OpenPrompt's positional order InputExample(guid, text_a, ...))")
        self.text_b, self.label = given["text_b"], given["label"]
        self.meta = dict(given["meta"] or {})
        self.guid = str(given["guid"] or "")

    @property
    def text_a(self) -> str:
        """Alias of ``text`` (the name the template placeholder ``{"placeholder":"text_a"}`` uses)."""
        return self.text


class ExampleSet(list):
    """A list of ``InputExample`` that also carries ``classes`` (label names in index order) and ``name``."""

    def __init__(self, examples: Iterable[InputExample] = (), classes: Iterable[str] = (), name: str = ""):
        super().__init__(examples)
        self.classes: list[str] = list(classes)
        self.name = name

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @overload
    def __getitem__(self, i: SupportsIndex) -> InputExample: ...

    @overload
    def __getitem__(self, i: slice) -> "ExampleSet": ...

    def __getitem__(self, i):
        item = super().__getitem__(i)
        if isinstance(i, slice):
            return self.like(item)
        return item

    def like(self, examples: Iterable[InputExample], name: str | None = None) -> "ExampleSet":
        """A new set holding ``examples`` with the same classes (and name unless given)."""
        return ExampleSet(examples, classes=self.classes, name=self.name if name is None else name)

    def label_counts(self) -> dict[str, int]:
        """Examples per class, ``{class name: count}`` in class order (zeros included, unlabelled skipped)."""
        counts = [0] * len(self.classes)
        for ex in self:
            if ex.label is not None and 0 <= ex.label < len(counts):
                counts[ex.label] += 1
        return dict(zip(self.classes, counts))

    def __repr__(self) -> str:
        name = f"{self.name!r}, " if self.name else ""
        return f"ExampleSet({name}{len(self)} examples, classes={self.classes})"


_EXAMPLE_KEYS = ("text", "text_a", "text_b", "label", "guid", "meta")


def _from_mapping(row: Any, i: int, classes: list[str] | None) -> InputExample:
    row = dict(row)
    label = row.get("label")
    if isinstance(label, str) and not label.lstrip("-").isdigit():
        if not classes or label not in classes:
            raise DataError(f"example {i}: label {label!r} is a name, but the classes are {classes}; give the "
                            f"class index, or one of the class names")
        label = classes.index(label)
    elif label is not None and label != label:  # NaN: a pandas cell without a label
        label = None
    elif label is not None:
        label = int(label)
    meta = dict(row.get("meta") or {}, **{k: v for k, v in row.items() if k not in _EXAMPLE_KEYS})
    text = row.get("text", row.get("text_a"))
    if not isinstance(text, str):
        raise DataError(f"example {i} has no 'text' (or 'text_a') string, keys {sorted(row)}; rename the text "
                        f"field to 'text', or load the rows with pd.data.load(rows, columns={{'text': '<key>'}})")
    text_b = row.get("text_b")
    return InputExample(text=text, text_b=None if text_b is None or text_b != text_b else str(text_b),
                        label=label, meta=meta, guid=str(row.get("guid") or f"example-{i}"))


def as_examples(items: Any, classes: Iterable[str] | None = None) -> list[InputExample] | ExampleSet:
    """``items`` as InputExamples: an ExampleSet / list of InputExample (or other example objects) as is;
    strings (unlabelled texts);
    dicts with ``text`` (or ``text_a``), optional ``text_b``, ``label`` (index, or a name in ``classes``),
    ``guid``; a ``datasets.Dataset`` or pandas ``DataFrame`` with those columns. Anything else: DataError."""
    if isinstance(items, ExampleSet):
        return items
    kind = type(items).__name__
    if kind == "DataFrame" and type(items).__module__.split(".")[0] == "pandas":
        items = items.to_dict("records")
    elif kind == "Dataset" and type(items).__module__.split(".")[0] == "datasets":
        items = list(items)
    elif isinstance(items, (str, bytes)) or isinstance(items, Mapping) or not isinstance(items, Iterable):
        raise DataError(f"expected a sequence of examples, got a {kind}; wrap one example in a list, or pass a "
                        f"DatasetDict / dict of splits through pd.data.load(...) first")
    items = list(items)
    if not any(isinstance(x, (str, bytes, int, float, Mapping)) or x is None for x in items):
        return items  # InputExamples, or a custom model's own example objects: its collate reads them
    names = list(classes) if classes is not None else None
    out = []
    for i, x in enumerate(items):
        if isinstance(x, str):
            out.append(InputExample(text=x, guid=f"example-{i}"))
        elif isinstance(x, Mapping):
            out.append(_from_mapping(x, i, names))
        elif isinstance(x, (bytes, int, float)) or x is None:
            raise DataError(f"example {i} is a {type(x).__name__}; pass InputExample objects, strings, or dicts "
                            f"with a 'text' key (and 'label' for training)")
        else:
            out.append(x)
    return ExampleSet(out, classes=names) if names else out
