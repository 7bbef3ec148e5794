"""Data in everyday shapes: DataFrames, datasets objects, lists of dicts, single-split pools, any column names
(Python, YAML, CLI), OpenPrompt's InputExample order, and Trainer.fit / evaluate / predict on strings and dicts."""

from collections import Counter

import pytest

from promptdelta.data import ExampleSet, InputExample, as_examples, load
from promptdelta.errors import DataError

pd = pytest.importorskip("pandas")


def _frame(n=10, text="sentence", label="y"):
    return pd.DataFrame({text: [f"text {i}" for i in range(n)], label: ["neg", "pos"] * (n // 2),
                         "source": ["web"] * n})


def test_dataframe_single_split_any_columns():
    train, dev, test = load(_frame(), columns={"text": "sentence", "label": "y"}, shots=2, seed=3)
    assert train.classes == ["neg", "pos"]
    assert Counter(ex.label for ex in train) == {0: 2, 1: 2} and len(test) == 2
    assert train[0].meta == {"source": "web"}
    assert not {ex.text for ex in test} & {ex.text for ex in train + dev}


def test_dataframe_with_split_column_and_dict_of_frames():
    df = _frame(12, text="text", label="label")
    df["split"] = ["train"] * 8 + ["test"] * 4
    train, _, test = load(df, classes=["neg", "pos"])
    assert (len(train) + len(_), len(test)) == (8, 4)
    train2, dev2, test2 = load({"train": df[df.split == "train"].drop(columns="split"),
                                "validation": df[df.split == "test"].drop(columns="split"),
                                "test": df[df.split == "test"].drop(columns="split")})
    assert (len(train2), len(dev2), len(test2)) == (8, 4, 4)


def test_list_of_dicts_and_bad_dict_split_name():
    rows = [{"q": f"question {i}", "a": i % 3} for i in range(30)]
    train, dev, test = load(rows, columns={"text": "q", "label": "a"})
    assert train.classes == ["0", "1", "2"] and len(train) + len(dev) + len(test) == 30
    with pytest.raises(DataError, match=r"split name\(s\) \['holdout'\].*train / dev / test"):
        load({"train": rows, "holdout": rows}, columns={"text": "q", "label": "a"})


def test_single_split_datasets_dataset_and_single_csv(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"sentence": [f"s {i}" for i in range(20)], "label": [i % 2 for i in range(20)]})
    train, dev, test = load(ds, columns={"text": "sentence"}, seed=5)
    assert len(test) == 4 and len(train) + len(dev) == 16
    (tmp_path / "mine.csv").write_text("body,cls\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(10)))
    train, dev, test = load(tmp_path / "mine.csv", columns={"text": "body", "label": "cls"})
    assert train.classes == ["a", "b"] and len(test) == 2


def test_input_example_openprompt_positional_and_keyword_order():
    ex = InputExample("g1", "a film", "a hypothesis", 1, {"k": 1})
    assert (ex.guid, ex.text, ex.text_a, ex.text_b, ex.label, ex.meta) == ("g1", "a film", "a film",
                                                                          "a hypothesis", 1, {"k": 1})
    assert InputExample(guid="g2", text_a="x", label=0).text == "x"
    assert InputExample("just a text", label=1).text == "just a text"  # one positional: the text
    with pytest.raises(DataError, match="has no text .*guid='g3'"):
        InputExample("g3", None)
    with pytest.raises(DataError, match="both text= and text_a="):
        InputExample(text="a", text_a="b")
    with pytest.raises(DataError, match="guid both by position and by name"):
        InputExample("g", "t", guid="h")


def test_as_examples_shapes_and_errors():
    out = as_examples(["good", {"text": "bad", "label": "neg"}, {"text_a": "ok", "label": 1}], ["neg", "pos"])
    assert isinstance(out, ExampleSet) and [(e.text, e.label) for e in out] == [("good", None), ("bad", 0), ("ok", 1)]
    df = as_examples(pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}))
    assert [e.label for e in df] == [0, 1]
    with pytest.raises(DataError, match="example 0 has no 'text'.*columns="):
        as_examples([{"sentence": "x"}])
    with pytest.raises(DataError, match="label 'maybe' is a name, but the classes are"):
        as_examples([{"text": "x", "label": "maybe"}], ["neg", "pos"])
    with pytest.raises(DataError, match="got a str; wrap one example in a list"):
        as_examples("one text")
    with pytest.raises(DataError, match="example 0 is a int"):
        as_examples([3])


def test_trainer_takes_strings_dicts_and_datasets(tiny_clf):
    import promptdelta as pdl

    clf = tiny_clf
    datasets = pytest.importorskip("datasets")
    rows = [{"text": t, "label": y} for t, y in [("great fun", 1), ("awful", 0), ("good", 1), ("bad", 0)]]
    trainer = pdl.Trainer(clf, lr=1e-3, max_steps=2, batch_size=2, progress=False)
    trainer.fit(datasets.Dataset.from_list(rows), [{"text": "fine", "label": "pos"}, {"text": "dull", "label": "neg"}])
    assert trainer.predict(["great fun", "awful"]).shape == (2,)
    assert trainer.evaluate(pd.DataFrame(rows))["n"] == 4


@pytest.fixture
def tiny_clf(tiny_bert_dir):
    import promptdelta as pdl

    model, tok = pdl.load_backbone(str(tiny_bert_dir))
    pdl.attach(model, "bitfit")
    template = pdl.ManualTemplate('{"placeholder":"text_a"} It was {"mask"}.', tokenizer=tok)
    verbalizer = pdl.ManualVerbalizer(tok, classes=["neg", "pos"], label_words=[["bad"], ["good"]])
    return pdl.PromptForClassification(model, template, verbalizer, max_length=32)


def test_columns_from_cli_and_yaml(tmp_path):
    from promptdelta.cli import build_parser, run_config_from_args
    from promptdelta.config import RunConfig

    args = build_parser().parse_args(["run", "--columns", "text=sentence,label=y"])
    assert run_config_from_args(args).columns == {"text": "sentence", "label": "y"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--columns", "sentence"])
    (tmp_path / "c.yaml").write_text("data: builtin:demo\ncolumns: {text: body}\n")
    assert RunConfig.from_yaml(tmp_path / "c.yaml").columns == {"text": "body"}
