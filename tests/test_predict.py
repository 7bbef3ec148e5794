"""predict: every input shape, input order kept through length sorting, merged deltas put back, per-row deltas;
`promptdelta predict` on JSONL, CSV, text and stdin; `promptdelta run` seed folders (trained and zero-shot) are
classifiers whose predictions reproduce the run's test accuracy."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch

import promptdelta as pd
from promptdelta import cli
from promptdelta.config import RunConfig
from promptdelta.data.examples import ExampleSet, InputExample
from promptdelta.errors import DataError, DeltaError
from promptdelta.run import run

CLASSES = ["negative", "positive"]
WORDS = {"negative": ["bad", "terrible"], "positive": ["good", "great"]}
TEXTS = ["short", "a much longer text about a film that was good and long", "bad", "the plot was great",
         "terrible acting, a dull script and an awful ending that nobody needed", "fine"]


@pytest.fixture(scope="module")
def clf(tiny_bert_dir):
    model, tok = pd.load_backbone(tiny_bert_dir)
    torch.manual_seed(0)                # LoRA's init draws from the global RNG: the same weights in any test order
    pd.attach(model, "lora", targets=["q_proj", "v_proj"], r=2, alpha=4)
    clf = pd.build_classifier(model, tok, CLASSES, "mixed", "manual", max_length=64,
                              template_options={"text": '{"placeholder":"text_a"} {"soft": "It was"} {"mask"}.'},
                              verbalizer_options={"label_words": WORDS})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():                                  # stand-in for training: LoRA B is no longer zero
        for p in clf.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return clf


@pytest.fixture(scope="module")
def saved(clf, tmp_path_factory):
    return clf.save_pretrained(tmp_path_factory.mktemp("clf") / "sst2-lora")


def test_every_input_shape_gives_the_same_predictions(clf):
    import datasets
    import pandas

    want = clf.predict(TEXTS)
    rows = [{"review": t, "stars": i} for i, t in enumerate(TEXTS)]
    shapes = {"examples": [InputExample(t) for t in TEXTS],
              "example set": ExampleSet([InputExample(t, label=0) for t in TEXTS], classes=CLASSES),
              "dicts": [{"text": t} for t in TEXTS],
              "dataset": datasets.Dataset.from_dict({"sentence": TEXTS}),
              "dataframe": pandas.DataFrame(rows)}
    for name, inputs in shapes.items():
        got = clf.predict(inputs, columns={"text": "review"} if name == "dataframe" else None)
        assert torch.equal(got.probs, want.probs), name
    one = clf.predict(TEXTS[1])      # alone: no padding and other GEMM shapes, so equal up to rounding only
    assert len(one) == 1 and torch.allclose(one.probs[0], want.probs[1], rtol=0, atol=1e-6)


def test_results_keep_input_order_and_match_one_at_a_time(clf):
    preds = clf.predict(TEXTS, batch_size=4)                          # sorted by length inside
    single = torch.cat([clf.predict([t], batch_size=1).probs for t in TEXTS])
    torch.testing.assert_close(preds.probs, single, rtol=0, atol=1e-5)    # padding only: float noise
    assert preds.labels == [CLASSES[i] for i in single.argmax(-1).tolist()]
    assert preds.probs.sum(-1).allclose(torch.ones(len(TEXTS)))
    assert preds.tolist() == preds.label_ids.tolist() and preds.shape == (len(TEXTS),) and preds.dtype == torch.long
    row = preds[0]
    assert row.label == preds.labels[0] and list(row.probs) == CLASSES
    assert preds[-2:] == [preds[len(TEXTS) - 2], preds[len(TEXTS) - 1]]


def test_sorted_batches_slice_one_tokenisation_in_token_order(clf):
    """Each batch equals the template's own collation of its rows, batches go longest first by tokens (not
    characters), every row comes once, across chunk boundaries too; a left-padded batch is not sliced."""
    from promptdelta.predict import _right_padded, sorted_batches

    examples = [InputExample(t) for t in TEXTS + ["a b c d e f g h", "international organizations"]]
    for chunk in (3, 4096):
        seen, widths = [], []
        for idx, batch in sorted_batches(clf, examples, 2, chunk=chunk):
            want = clf.collate([examples[i] for i in idx])
            assert batch.keys() == want.keys() and all(torch.equal(batch[k], want[k]) for k in want), idx
            seen += idx
            widths.append(int(batch["attention_mask"].sum(1).max()))
        assert sorted(seen) == list(range(len(examples)))
        if chunk == 4096:
            assert widths == sorted(widths, reverse=True)
    tokens = [int(clf.collate([e])["attention_mask"].sum()) for e in examples]
    assert tokens[-1] < tokens[-2] and len(examples[-1].text) > len(examples[-2].text)   # chars mislead here
    full = clf.collate(examples)
    assert _right_padded(full)
    assert not _right_padded({**full, "attention_mask": full["attention_mask"].flip(1)})


def test_predict_merges_for_the_call_and_restores_state(clf, monkeypatch):
    handle = pd.deltas_of(clf.backbone)["lora"]
    seen = []
    real_merge = handle.merge
    monkeypatch.setattr(handle, "merge", lambda: (real_merge(), seen.append(handle.merged)))
    clf.train()
    batch = clf.collate([InputExample(t) for t in TEXTS[:3]])
    clf.eval()
    with torch.no_grad():
        unmerged = clf(batch).softmax(-1)
    clf.train()
    got = clf.predict(TEXTS[:3])
    assert seen == [True]                                             # merged for the call ...
    assert clf.training and not handle.merged                         # ... mode and merge state put back
    assert not torch.equal(got.probs, clf.predict(TEXTS[:3]).probs * 0)
    torch.testing.assert_close(got.probs, unmerged, rtol=0, atol=1e-5)   # merged weights: same answer
    with handle.disabled():
        base = clf.predict(TEXTS[:3])
    assert not torch.allclose(base.probs, got.probs)                   # the delta matters
    clf.eval()


def test_top_k_keeps_the_most_probable_classes(clf):
    preds = clf.predict(TEXTS, top_k=1)
    for p, full in zip(preds, clf.predict(TEXTS)):
        assert list(p.probs) == [full.label] and p.probs[full.label] == full.probs[full.label]
    assert preds.to_rows()[0].keys() == {"label", "probs"}


def test_bad_inputs_are_named(clf):
    with pytest.raises(DataError, match=r"no column 'review' \(it has: text\); name the text column with "
                                        r"--columns text=COLUMN"):
        clf.predict([{"text": "x"}], columns={"text": "review"})
    with pytest.raises(DataError, match="has no column 'text'"):
        clf.predict([{"body": "x"}])
    with pytest.raises(DeltaError, match="delta= names 1 rows but there are 2 inputs"):
        clf.predict(["a", "b"], delta=["lora"])


def test_per_row_names_of_an_attached_delta_equal_the_merged_predict(clf):
    """Rows naming the attached (not banked) LoRA, in padded batches: route_rows runs it unmerged, per row."""
    names = ["lora", None, "lora", "lora", None, "lora"]
    got = clf.predict(TEXTS, batch_size=4, delta=names).probs
    with pd.deltas_of(clf.backbone)["lora"].disabled():
        base = clf.predict(TEXTS).probs
    want = torch.stack([(clf.predict(TEXTS).probs if n else base)[i] for i, n in enumerate(names)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_per_row_deltas_equal_each_delta_alone(tiny_bert_dir, tmp_path):
    """predict(delta=[name per row]) (MIXENG's route_rows over banked LoRA deltas) equals each delta alone."""
    from promptdelta.deltas.mixed import add_delta

    def build(model, tok):
        return pd.build_classifier(model, tok, CLASSES, "manual", "manual", verbalizer_options={"label_words": WORDS},
                                   template_options={"text": '{"placeholder":"text_a"} It was {"mask"}.'})

    alone = {}
    for seed, name in enumerate(["a", "b"]):
        model, tok = pd.load_backbone(tiny_bert_dir)
        handle = pd.attach(model, "lora", targets=["q_proj", "v_proj"], r=2, alpha=4, name=name)
        with torch.no_grad():
            for p in handle.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        alone[name] = build(model, tok).predict(TEXTS).probs
        handle.save(tmp_path / name)
    shared, tok = pd.load_backbone(tiny_bert_dir)
    alone[None] = build(shared, tok).predict(TEXTS).probs
    for name in ("a", "b"):
        add_delta(shared, tmp_path / name)
    names = ["a", "b", None, "b", "a", None]
    mixed = build(shared, tok).predict(TEXTS, delta=names, batch_size=4)
    want = torch.stack([alone[n][i] for i, n in enumerate(names)])
    torch.testing.assert_close(mixed.probs, want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ CLI
def _predict(*args: str) -> int:
    return cli.main(["predict", "--no-progress", *args])


def test_cli_jsonl_in_jsonl_out(clf, saved, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t, "label": 1}) + "\n" for t in TEXTS))
    out = tmp_path / "out.jsonl"
    assert _predict("--model", str(saved), "--input", str(src), "--output", str(out), "--batch-size", "2") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = clf.predict(TEXTS, batch_size=2)                          # the same batches: the same numbers
    assert [r["text"] for r in rows] == TEXTS and [r["label"] for r in rows] == want.labels
    assert [list(r["probs"].values()) for r in rows] == want.probs.tolist()
    assert _predict("--model", str(saved), "--input", str(src), "--output", str(out)) == 2      # exists: refused
    assert _predict("--model", str(saved), "--input", str(src), "--output", str(out), "--overwrite") == 0


def test_cli_csv_with_columns_and_top_k(clf, saved, tmp_path):
    src = tmp_path / "in.csv"
    with src.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "review"])
        w.writerows([i, t] for i, t in enumerate(TEXTS))
    out = tmp_path / "out.csv"
    assert _predict("--model", str(saved), "--input", str(src), "--output", str(out), "--columns", "text=review",
                    "--top-k", "1") == 0
    rows = list(csv.DictReader(out.open()))
    want = clf.predict(TEXTS)
    assert list(rows[0]) == ["id", "text", "label", "top1", "top1_prob"] and rows[2]["id"] == "2"
    assert [r["label"] for r in rows] == want.labels == [r["top1"] for r in rows]
    assert _predict("--model", str(saved), "--input", str(src), "--output", str(tmp_path / "o2.csv")) == 2


def test_cli_missing_column_is_one_line(saved, tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text("id,review\n1,good\n")
    assert _predict("--model", str(saved), "--input", str(src)) == 2
    err = capsys.readouterr().err.strip()
    assert "no column 'text'" in err and "--columns text=COLUMN" in err and "\n" not in err


def test_cli_stdin_text_and_jsonl_to_stdout(clf, saved, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(TEXTS) + "\n"))
    assert _predict("--model", str(saved), "--input", "-") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == clf.predict(TEXTS).labels
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"text": TEXTS[0]}) + "\n"))
    assert _predict("--model", str(saved), "--input", "-", "--top-k", "1") == 0
    assert len(json.loads(capsys.readouterr().out)["probs"]) == 1


def test_cli_several_models_share_one_backbone(clf, saved, tmp_path, capsys):
    other = tmp_path / "copy" / "sst2-lora"
    clf.save_pretrained(other)
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    assert _predict("--model", str(saved), "--model", str(other), "--input", str(src)) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = clf.predict(TEXTS).labels
    assert [r[f"{saved}.label"] for r in rows] == want == [r[f"{other}.label"] for r in rows]


# ------------------------------------------------------------------------------------- run -> predict
def _accuracy_of_folder(seed_dir, tmp_path) -> float:
    from promptdelta.data import builtin_path

    out = tmp_path / f"{seed_dir.name}.jsonl"
    test = builtin_path("demo") / "test.jsonl"
    assert _predict("--model", str(seed_dir), "--input", str(test), "--output", str(out)) == 0
    gold = [json.loads(line)["label"] for line in test.read_text().splitlines() if line.strip()]
    pred = [CLASSES.index(json.loads(line)["label"]) for line in out.read_text().splitlines()]
    return sum(g == p for g, p in zip(gold, pred)) / len(gold)


@pytest.mark.parametrize("delta", [{"method": "frozen"}, {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 2}],
                         ids=["zero-shot", "lora"])
def test_run_seed_folders_are_classifiers(tiny_bert_dir, tmp_path, delta):
    config = RunConfig(backbone=str(tiny_bert_dir), data="builtin:demo", verbalizer="manual", label_words=WORDS,
                       delta=delta, shots=4, seeds=[13, 21], max_length=64, output_dir=str(tmp_path / "runs"),
                       name="r", train={"max_steps": 2, "batch_size": 4, "lr": 1e-2, "progress": False})
    result = run(config)
    metrics = json.loads((tmp_path / "runs" / "r" / "metrics.json").read_text())
    rows = {r["seed"]: r for r in metrics["rows"]}
    best = max(rows.values(), key=lambda r: r["dev_accuracy"])["seed"]
    assert metrics["summary"]["best_seed"] == best and metrics["summary"]["best_seed_dir"] == f"seed{best}"
    for seed, row in rows.items():
        folder = tmp_path / "runs" / "r" / f"seed{seed}"
        assert (folder / "classifier.json").is_file() and (folder / "history.json").is_file()
        assert _accuracy_of_folder(folder, tmp_path) == row["accuracy"]
    assert result["summary"]["best_seed"] == best
