"""The issue-21 method examples run end to end on a tiny random BERT (MiniLM's tokenizer) in a few steps."""

import json
import runpy
from pathlib import Path

import pytest

from promptdelta.prompts import ManualTemplate, ManualVerbalizer

ROOT = Path(__file__).resolve().parents[1]


def _run(name: str, argv: list[str]) -> dict:
    return runpy.run_path(str(ROOT / "examples" / name))["main"](argv)


def test_autoprompt_example(tiny_bert_dir, tmp_path):
    r = _run("autoprompt.py", ["--backbone", str(tiny_bert_dir), "--iters", "2", "--candidates", "3",
                               "--shots", "4", "--out", str(tmp_path)])
    assert r["final_loss"] <= r["initial_loss"]
    text = Path(r["path"]).read_text().strip()
    assert "[T]" not in text and '{"mask"}' in text


def test_lmbff_example(tiny_bert_dir, tmp_path):
    r = _run("lmbff.py", ["--backbone", str(tiny_bert_dir), "--k", "3", "--beam", "2", "--shots", "4",
                          "--out", str(tmp_path)])
    assert len(r["label_words"]) == 2 and len(r["templates"]) == 2
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    ManualVerbalizer.from_file(r["words_path"], tokenizer=tok)
    ManualTemplate.from_file(r["templates_path"], choice=1, tokenizer=tok)


def test_ipt_example(tiny_bert_nohead_dir, tmp_path):
    r = _run("ipt.py", ["--backbone", str(tiny_bert_nohead_dir), "--steps", "2", "--out", str(tmp_path)])
    assert r["trainable"] == 2
    assert json.loads((Path(r["path"]) / "delta.json").read_text())["method"] == "ipt"


def test_s3delta_example(tiny_bert_nohead_dir, tmp_path):
    r = _run("s3delta.py", ["--backbone", str(tiny_bert_nohead_dir), "--steps", "2", "--out", str(tmp_path)])
    assert 0 < r["cost"] <= r["budget"]
    assert json.loads(Path(r["plan"]).read_text())["cost"] == r["cost"]


def test_unipelt_example(tiny_bert_nohead_dir, tmp_path):
    r = _run("unipelt.py", ["--backbone", str(tiny_bert_nohead_dir), "--steps", "2", "--out", str(tmp_path)])
    assert r["reloaded"] is True and r["trainable"] > 0


def test_multitask_example(tiny_bert_nohead_dir):
    r = _run("multitask.py", ["--backbone", str(tiny_bert_nohead_dir), "--steps", "2"])
    assert set(r["after"]) == {"sentiment", "topic"}
    assert 0.0 <= r["transfer"]["tuned"] <= 1.0
