"""Examples and example sets: the unit of data every other layer consumes.

An ``InputExample`` is one text (or text pair) with an optional integer label; an ``ExampleSet`` is a
plain list of them that also knows its class names (``classes[label]`` is the name of ``label``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, SupportsIndex, overload


@dataclass
class InputExample:
    """One example.

    Args:
        text: the first (or only) text.
        text_b: the second text of a pair task (e.g. the hypothesis of RTE), else None.
        label: the class index into ``ExampleSet.classes``, or None when unlabelled.
        meta: extra fields from the source (any JSON key / CSV column not used above).
        guid: a stable id, e.g. ``"train-17"`` (split and line number in the source file).
    """

    text: str
    text_b: str | None = None
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    guid: str = ""

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
