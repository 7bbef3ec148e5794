"""``promptdelta bench predict`` runs end to end on a tiny BERT folder, and its three predict paths and its
mixed batch agree with the transformers / per-delta references it times them against."""

from __future__ import annotations

import re

import pytest

from promptdelta.bench.predict import main, run_predict_bench
from promptdelta.errors import ConfigError, DataError


@pytest.mark.parametrize("readout", ["mask", "mean"])
def test_bench_predict_tiny(tiny_bert_dir, tmp_path, monkeypatch, capsys, readout):
    monkeypatch.setenv("PROMPTDELTA_DATA", str(tmp_path))                  # no sst2 there: demo texts
    assert main(["--rows", "12", "--rounds", "1", "--batch-size", "5", "--backbone", str(tiny_bert_dir),
                 "--readout", readout]) == 0
    out = capsys.readouterr().out
    assert f"12 built-in demo texts (no SST-2 data found), batch 5, 1 rounds, readout {readout}" in out
    assert ("last layer pruned to the mask row" if readout == "mask" else "last layer not pruned") in out
    ratios = r" +\d+\.\d+ \(\d+\.\d+-\d+\.\d+\)"                         # ratio (IQR) vs each reference
    for variant in ("transformers BertModel, LoRA merged, input order", "transformers+peft LoRA, unmerged, input "
                    "order", "predict, merged", "predict, unmerged (per-row delta)"):
        assert re.search(rf"^  {re.escape(variant)} +\d+\.\d+{ratios}{ratios}$", out, re.M), variant
    assert re.search(r"^  transformers BertModel, LoRA merged, input order +\d+\.\d+ +1\.000 ", out, re.M)
    for variant in ("4 single-delta passes", "mixed batch, 4 deltas"):
        assert re.search(rf"^  {re.escape(variant)} +\d+\.\d+ +\d+\.\d+", out, re.M), variant
    merged, unmerged = map(float, re.search(r"merged ([\d.e+-]+), unmerged ([\d.e+-]+);", out).groups())
    assert 0 < float(re.search(r"sorted / input order: ([\d.]+)\)", out).group(1)) <= 1
    mixed = float(re.search(r"max \|CLS state difference\|: ([\d.e+-]+)\)", out).group(1))
    assert max(merged, unmerged, mixed) < 1e-4                               # the same predictions, timed


def test_bench_predict_options(tmp_path):
    with pytest.raises(ConfigError, match="rows must be a positive int"):
        run_predict_bench(rows=0)
    with pytest.raises(ConfigError, match="pass --readout mask or --readout mean"):
        run_predict_bench(rows=4, readout="cls")
    with pytest.raises(DataError, match="does not exist"):
        run_predict_bench(rows=4, data=str(tmp_path / "nope.jsonl"))
