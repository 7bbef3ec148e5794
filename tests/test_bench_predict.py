"""``promptdelta bench predict`` runs end to end on a tiny BERT folder, and its three predict paths and its
mixed batch agree with the transformers / per-delta references it times them against."""

from __future__ import annotations

import re

import pytest

from promptdelta.bench.predict import main, run_predict_bench
from promptdelta.errors import ConfigError, DataError


def test_bench_predict_tiny(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROMPTDELTA_DATA", str(tmp_path))                  # no sst2 there: demo texts
    assert main(["--rows", "12", "--rounds", "1", "--batch-size", "5", "--backbone", str(tiny_bert_dir)]) == 0
    out = capsys.readouterr().out
    assert "12 built-in demo texts (no SST-2 data found), batch 5" in out
    for variant in ("transformers+peft LoRA, input order", "predict, merged", "predict, unmerged (per-row delta)",
                    "4 single-delta passes", "mixed batch, 4 deltas"):
        assert re.search(rf"^  {re.escape(variant)} +\d+\.\d+ +\d+\.\d+", out, re.M), variant
    merged, unmerged = map(float, re.search(r"merged ([\d.e+-]+), unmerged ([\d.e+-]+);", out).groups())
    assert 0 < float(re.search(r"sorted / input order: ([\d.]+)\)", out).group(1)) <= 1
    mixed = float(re.search(r"max \|CLS state difference\|: ([\d.e+-]+)\)", out).group(1))
    assert max(merged, unmerged, mixed) < 1e-4                               # the same predictions, timed


def test_bench_predict_options(tmp_path):
    with pytest.raises(ConfigError, match="rows must be a positive int"):
        run_predict_bench(rows=0)
    with pytest.raises(DataError, match="does not exist"):
        run_predict_bench(rows=4, data=str(tmp_path / "nope.jsonl"))
