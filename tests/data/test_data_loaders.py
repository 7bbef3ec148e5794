"""Loaders: JSONL folders, CSV (names and indices), saved `datasets` folders, the hub path, bad input."""

import json
import logging
from collections import Counter

import pytest

from promptdelta.data import ExampleSet, InputExample, load, load_split_file, read_labels
from promptdelta.errors import ConfigError, DataError, MissingFileError


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(n_per_class, prefix, classes=2, pair=False):
    rows = []
    for i in range(n_per_class):
        for c in range(classes):
            row = {"text": f"{prefix} {c} {i}", "label": c}
            if pair:
                row["text_b"] = f"hypothesis {prefix} {c} {i}"
            rows.append(row)
    return rows


@pytest.fixture
def jsonl_task(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    train = _rows(10, "train", pair=True)
    train[0]["source"] = "forum"  # an extra key goes to meta
    _write_jsonl(folder / "train.jsonl", train)
    _write_jsonl(folder / "dev.jsonl", _rows(3, "dev", pair=True))
    _write_jsonl(folder / "test.jsonl", _rows(4, "test", pair=True))
    (folder / "labels.txt").write_text("0\tentailment\n1\tnot_entailment\n")
    return folder


def test_jsonl_folder_full_splits(jsonl_task):
    train, dev, test = load(jsonl_task)
    assert (len(train), len(dev), len(test)) == (20, 6, 8)
    assert all(isinstance(s, ExampleSet) and s.classes == ["entailment", "not_entailment"] for s in (train, dev, test))
    first = train[0]
    assert first == InputExample(text="train 0 0", text_b="hypothesis train 0 0", label=0,
                                 meta={"source": "forum"}, guid="train-0")
    assert first.text_a == first.text
    assert test.label_counts() == {"entailment": 4, "not_entailment": 4}
    assert train.name == "tiny/train" and isinstance(train[2:5], ExampleSet) and train[2:5].classes == train.classes


def test_jsonl_folder_few_shot_ignores_dev_split_and_keeps_full_test(jsonl_task):
    train, dev, test = load(jsonl_task, shots=3, seed=13, dev_shots=2)
    assert Counter(ex.label for ex in train) == {0: 3, 1: 3}
    assert Counter(ex.label for ex in dev) == {0: 2, 1: 2}
    assert all(ex.text.startswith("train") for ex in train + dev)
    assert not {ex.guid for ex in train} & {ex.guid for ex in dev}
    assert len(test) == 8
    again = load(str(jsonl_task), shots=3, seed=13, dev_shots=2)
    assert [ex.guid for ex in again[0]] == [ex.guid for ex in train]
    assert [ex.guid for ex in load(jsonl_task, shots=3, seed=14)[0]] != [ex.guid for ex in train]


def test_no_dev_split_holds_out_ten_percent_stratified(jsonl_task, caplog):
    (jsonl_task / "dev.jsonl").unlink()
    with caplog.at_level(logging.INFO, logger="promptdelta.data.loaders"):
        train, dev, _ = load(jsonl_task, seed=3)
    assert Counter(ex.label for ex in dev) == {0: 1, 1: 1} and len(train) == 18
    assert not {ex.guid for ex in train} & {ex.guid for ex in dev}
    assert "holding out" in caplog.text


def test_split_names_and_validation_alias(jsonl_task):
    (jsonl_task / "dev.jsonl").rename(jsonl_task / "validation.jsonl")
    assert len(load(jsonl_task)[1]) == 6
    (jsonl_task / "test.jsonl").rename(jsonl_task / "heldout.jsonl")
    _, _, test = load(jsonl_task, split_names={"test": "heldout"})
    assert len(test) == 8


def test_label_given_as_class_name_in_jsonl(jsonl_task):
    _write_jsonl(jsonl_task / "test.jsonl", [{"text": "a", "label": "not_entailment"}, {"text": "b"}])
    test = load(jsonl_task)[2]
    assert [ex.label for ex in test] == [1, None]


# ----------------------------------------------------------------------------------------------- CSV


def _write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))


def test_csv_folder_with_class_names_infers_sorted_classes(tmp_path, caplog):
    _write_csv(tmp_path / "train.csv", ["text", "label", "topic"],
               [(f"t{i}", "pos" if i % 2 else "neg", "x") for i in range(10)])
    _write_csv(tmp_path / "test.csv", ["text", "label", "topic"], [("good", "pos", "y"), ("bad", "neg", "y")])
    with caplog.at_level(logging.INFO, logger="promptdelta.data.loaders"):
        train, dev, test = load(tmp_path)
    assert train.classes == ["neg", "pos"] and "inferred classes" in caplog.text
    assert [(ex.text, ex.label, ex.meta) for ex in test] == [("good", 1, {"topic": "y"}), ("bad", 0, {"topic": "y"})]
    assert len(train) + len(dev) == 10


def test_csv_with_indices_and_classes_argument(tmp_path):
    _write_csv(tmp_path / "train.csv", ["sentence", "premise", "y"], [(f"s{i}", f"p{i}", i % 3) for i in range(12)])
    _write_csv(tmp_path / "dev.csv", ["sentence", "premise", "y"], [("d", "p", 2)])
    _write_csv(tmp_path / "test.csv", ["sentence", "premise", "y"], [("t", "p", 1)])
    cols = {"text": "sentence", "text_b": "premise", "label": "y"}
    train, dev, test = load(tmp_path, columns=cols, classes=["a", "b", "c"])
    assert train.classes == ["a", "b", "c"]
    assert [ex.label for ex in train][:4] == [0, 1, 2, 0]
    assert (test[0].text, test[0].text_b, test[0].label, test[0].meta) == ("t", "p", 1, {})
    assert load(tmp_path, columns=cols)[0].classes == ["0", "1", "2"]  # integer labels, no names


def test_csv_folder_uses_labels_txt_and_quoted_fields(tmp_path):
    (tmp_path / "labels.txt").write_text("0\tnegative\n1\tpositive\n")
    (tmp_path / "train.csv").write_text('text,label\n"good, really",positive\nbad,0\n"fine, fine",1\nugh,negative\n')
    (tmp_path / "test.csv").write_text("text,label\nok,1\n")
    train, _, test = load(tmp_path, shots=1)
    pool_texts = {"good, really", "bad", "fine, fine", "ugh"}
    assert {ex.text for ex in train} <= pool_texts and train.classes == ["negative", "positive"]


def test_single_csv_file_with_split_column(tmp_path):
    path = tmp_path / "all.csv"
    rows = [(f"x{i}", i % 2, "train") for i in range(8)] + [("y", 1, "validation"), ("z", 0, "test")]
    _write_csv(path, ["text", "label", "split"], rows)
    train, dev, test = load(path, classes=["no", "yes"])
    assert (len(train), len(dev), len(test)) == (8, 1, 1) and "split" not in train[0].meta


def test_load_split_file_and_read_labels(jsonl_task):
    classes = read_labels(jsonl_task / "labels.txt")
    test = load_split_file(jsonl_task / "test.jsonl", classes)
    assert len(test) == 8 and test.classes == classes and test[0].guid == "test-0"


# ------------------------------------------------------------------------------------------ datasets


def test_saved_datasets_folder_with_column_mapping(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence": datasets.Value("string"), "idx": datasets.Value("int32"),
                                  "y": datasets.ClassLabel(names=["bad", "good"])})

    def part(n, tag, hidden=False):
        return datasets.Dataset.from_dict({"sentence": [f"{tag} {i}" for i in range(n)], "idx": list(range(n)),
                                           "y": [-1 if hidden else i % 2 for i in range(n)]}, features=features)

    dd = datasets.DatasetDict({"train": part(12, "tr"), "validation": part(4, "va"),
                               "test": part(3, "te", hidden=True)})
    dd.save_to_disk(str(tmp_path / "saved"))
    train, dev, test = load(tmp_path / "saved", columns={"text": "sentence", "label": "y"})
    assert train.classes == ["bad", "good"]
    assert (len(train), len(dev), len(test)) == (12, 4, 3)
    assert (train[3].text, train[3].label, train[3].meta) == ("tr 3", 1, {"idx": 3})
    assert all(ex.label is None for ex in test)  # -1 = hidden test label
    few = load(dd, shots=2, seed=1, columns={"text": "sentence", "label": "y"})  # a live DatasetDict works too
    assert Counter(ex.label for ex in few[0]) == {0: 2, 1: 2}


def test_hub_name_failure_says_to_pass_a_local_folder(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(name, *a, **k):
        raise ConnectionError(f"Couldn't reach {name!r} on the Hub (offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        load("someone/some-dataset")
    assert "pass a local folder" in str(err.value) and "offline" in str(err.value)


# ------------------------------------------------------------------------------------------ bad input


def test_missing_folder(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist; pass an existing folder"):
        load(tmp_path / "nope")


def test_folder_without_labels_txt(jsonl_task):
    (jsonl_task / "labels.txt").unlink()
    with pytest.raises(DataError) as err:
        load(jsonl_task)
    assert "labels.txt is missing" in str(err.value) and "index<TAB>name" in str(err.value)
    assert load(jsonl_task, classes=["e", "n"])[0].classes == ["e", "n"]  # the other documented fix


@pytest.mark.parametrize("content,expected", [
    ("negative\npositive\n", "expected 'index<TAB>name'"),
    ("1\tnegative\n0\tpositive\n", "out of order"),
    ("0\ta\n1\ta\n", "appears twice"),
    ("\n\n", "lists no classes"),
])
def test_malformed_labels_txt(jsonl_task, content, expected):
    (jsonl_task / "labels.txt").write_text(content)
    with pytest.raises(DataError, match=expected) as err:
        load(jsonl_task)
    assert "labels.txt" in str(err.value)


def test_label_out_of_range_names_file_and_line(jsonl_task):
    rows = _rows(2, "test")
    rows[2]["label"] = 5
    _write_jsonl(jsonl_task / "test.jsonl", rows)
    with pytest.raises(DataError) as err:
        load(jsonl_task)
    msg = str(err.value)
    assert f"{jsonl_task / 'test.jsonl'}:3" in msg and "label 5 is out of range" in msg and "fix the label" in msg


def test_unknown_label_name_in_csv(tmp_path):
    (tmp_path / "labels.txt").write_text("0\tneg\n1\tpos\n")
    _write_csv(tmp_path / "train.csv", ["text", "label"], [("a", "neg"), ("b", "meh")])
    _write_csv(tmp_path / "test.csv", ["text", "label"], [("c", "pos")])
    with pytest.raises(DataError, match=r"train.csv:3: label 'meh' is not a class name.*list the class"):
        load(tmp_path)


def test_malformed_json_line_names_file_and_line(jsonl_task):
    path = jsonl_task / "train.jsonl"
    path.write_text(path.read_text() + '{"text": "broken", "label": 1\n')
    with pytest.raises(DataError, match=r"train.jsonl:21: malformed JSON .*one JSON object"):
        load(jsonl_task)
    path.write_text('["a list", 1]\n')
    with pytest.raises(DataError, match="train.jsonl:1: a line must be a JSON object"):
        load(jsonl_task)


def test_missing_text_column(tmp_path, jsonl_task):
    _write_csv(tmp_path / "train.csv", ["sentence", "label"], [("a", 0)])
    _write_csv(tmp_path / "test.csv", ["sentence", "label"], [("b", 1)])
    with pytest.raises(DataError) as err:
        load(tmp_path, classes=["n", "p"])
    assert "train.csv:2: no 'text' field" in str(err.value) and "columns={'text': '<your column>'}" in str(err.value)
    _write_jsonl(jsonl_task / "test.jsonl", [{"txt": "typo", "label": 0}])
    with pytest.raises(DataError, match="test.jsonl:1: no 'text' field"):
        load(jsonl_task)


def test_no_test_split_holds_out_a_fixed_stratified_test(jsonl_task, tmp_path, caplog):
    (jsonl_task / "test.jsonl").unlink()
    with caplog.at_level(logging.INFO, logger="promptdelta.data.loaders"):
        train, dev, test = load(jsonl_task, shots=2, seed=1)
    assert "has no test split: holding out 4 of 20" in caplog.text
    assert Counter(ex.label for ex in test) == {0: 2, 1: 2}
    assert not {ex.text for ex in test} & {ex.text for ex in train + dev}
    assert [ex.text for ex in load(jsonl_task, shots=2, seed=2)[2]] == [ex.text for ex in test]  # same every seed
    _write_csv(tmp_path / "one.csv", ["text", "label"], [("a", 0)])
    with pytest.raises(DataError, match="no test split and too few examples to hold one out"):
        load(tmp_path / "one.csv")


def test_folder_without_data_files_and_other_bad_arguments(tmp_path, jsonl_task):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no train/test data files; put train.jsonl"):
        load(tmp_path / "empty")
    with pytest.raises(DataError, match="no built-in task 'nope'.*builtin:demo"):
        load("builtin:nope")
    with pytest.raises(ConfigError, match="unknown key.*columns="):
        load(jsonl_task, columns={"sentence": "text"})
    with pytest.raises(ConfigError, match="unknown key.*split_names="):
        load(jsonl_task, split_names={"validation": "dev"})
    with pytest.raises(ConfigError, match="pass shots=k"):
        load(jsonl_task, dev_shots=4)
    with pytest.raises(DataError, match="differ from .*labels.txt"):
        load(jsonl_task, classes=["x", "y"])
    with pytest.raises(DataError, match="cannot load data from a int"):
        load(42)


def test_too_few_examples_for_shots_names_class(jsonl_task):
    with pytest.raises(DataError, match=r"'entailment' has 10.*lower shots"):
        load(jsonl_task, shots=6)
