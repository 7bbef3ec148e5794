"""The built-in demo task: sizes, balance, sentence lengths, and no sentence in two splits."""

import json
import re
from collections import Counter

import pytest

from promptdelta.data import builtin_path, load, read_labels


def test_demo_sizes_balance_and_classes():
    train, dev, test = load("builtin:demo")
    assert train.classes == dev.classes == test.classes == ["negative", "positive"]
    assert (len(train), len(dev), len(test)) == (252, 64, 104)
    for split in (train, dev, test):
        counts = split.label_counts()
        assert counts["negative"] == counts["positive"] == len(split) // 2
    assert len(train) + len(dev) + len(test) >= 400


def test_demo_alias_and_folder_layout():
    folder = builtin_path("demo")
    assert {p.name for p in folder.iterdir()} >= {"train.jsonl", "dev.jsonl", "test.jsonl", "labels.txt"}
    assert read_labels(folder / "labels.txt") == ["negative", "positive"]
    assert [ex.text for ex in load("demo")[2]] == [ex.text for ex in load("builtin:demo")[2]]


def _normalised(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def test_no_duplicates_within_or_across_splits():
    texts = {}
    for split in ("train", "dev", "test"):
        lines = (builtin_path() / f"{split}.jsonl").read_text().splitlines()
        texts[split] = [_normalised(json.loads(line)["text"]) for line in lines]
    everything = [t for split in texts.values() for t in split]
    dupes = [t for t, n in Counter(everything).items() if n > 1]
    assert not dupes, f"duplicated demo sentences: {dupes[:3]}"


def test_sentence_lengths_and_rows_are_plain():
    for split in ("train", "dev", "test"):
        for line in (builtin_path() / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            assert set(row) == {"text", "label"} and row["label"] in (0, 1)
            assert 5 <= len(row["text"].split()) <= 25, row["text"]


@pytest.mark.parametrize("seed", [13, 21])
def test_demo_few_shot(seed):
    train, dev, test = load("builtin:demo", shots=8, seed=seed)
    assert train.label_counts() == dev.label_counts() == {"negative": 8, "positive": 8}
    assert not {ex.text for ex in train} & {ex.text for ex in dev}
    assert len(test) == 104
