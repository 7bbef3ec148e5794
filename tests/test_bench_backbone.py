"""Smoke test of ``promptdelta bench backbone`` at tiny sizes: every family has a row with sane numbers."""

import re

import pytest
from torch import nn

from promptdelta.bench.backbone import DELTAS, FAMILIES, main, run_backbone_bench
from promptdelta.errors import ConfigError


@pytest.fixture(scope="module")
def table() -> str:
    return run_backbone_bench(quick=True)


_NUM = r"(\d+\.\d+)"
_ROW = re.compile(rf"^(\w+) +(\w+) +(.+?)  +(\w+) +{_NUM} +{_NUM} +{_NUM} \({_NUM}-{_NUM}\) +{_NUM} +{_NUM} +{_NUM} "
                  rf"\({_NUM}-{_NUM}\) +(\S+)$")


def _rows(table: str, deltas: str = "none") -> dict[str, tuple[str, ...]]:
    """family -> (size, attn, fwd HF, fwd ours, ratio, q1, q3, f+b HF, f+b ours, ratio, q1, q3, diff)."""
    found = [_ROW.match(line) for line in table.splitlines()]
    return {m.group(1): m.groups()[2:] for m in found if m and m.group(2) == deltas}


def test_every_family_has_a_row(table: str) -> None:
    rows = _rows(table)
    assert set(rows) == set(FAMILIES)
    assert "sdpa" in table and "batch 2 x seq 16" in table and "right-padded" in table


def test_lora_rows_unpadded() -> None:
    """--deltas adds one row per delta (the same LoRA on both sides); --no-padding runs full rows."""
    table = run_backbone_bench(families=["bert"], deltas=list(DELTAS), quick=True, padded=False)
    assert "no padding" in table
    for deltas in DELTAS:
        cells = _rows(table, deltas)["bert"]
        assert float(cells[-1]) < 1e-4 and min(map(float, cells[2:4] + cells[7:9])) > 0, (deltas, cells)


def test_rows_hold_positive_times_and_parity(table: str) -> None:
    for family, cells in _rows(table).items():
        fwd_hf, fwd_ours, fwd_ratio, _, _, fb_hf, fb_ours, fb_ratio = map(float, cells[2:10])
        assert min(fwd_hf, fwd_ours, fb_hf, fb_ours) > 0, (family, cells)
        assert fwd_ratio > 0 and fb_ratio > 0
        assert float(cells[-1]) < 1e-4, f"{family}: native and transformers outputs differ ({cells[-1]})"


@pytest.mark.parametrize("kwargs, fix", [
    ({"families": ["bert", "falcon"]}, "choose one or more of"),
    ({"families": []}, "choose one or more of"),
    ({"batch": 0}, "must be an integer >= 1"),
    ({"dtype": "int8"}, "use one of"),
    ({"deltas": ["lora_qv", "ia3"]}, "choose one or more of"),
    ({"clock": "gpu"}, "does not fit device"),
    ({"clock": "cpu", "device": "cuda"}, "does not fit device"),
])
def test_bad_options_raise_config_error(kwargs: dict, fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        run_backbone_bench(**kwargs)


def test_cpu_clock_rows(capsys) -> None:
    """--clock cpu times the process's CPU time: the same table, its clock named in the header."""
    assert main(["--quick", "--families", "bert", "--deltas", "lora_qv", "--clock", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "clock cpu" in out and set(_rows(out, "lora_qv")) == {"bert"}
    cells = _rows(out, "lora_qv")["bert"]
    assert min(map(float, cells[2:4] + cells[7:9])) > 0


def test_cli_quick_one_family(capsys) -> None:
    assert main(["--quick", "--families", "gpt2", "--deltas", "lora_qv"]) == 0
    out = capsys.readouterr().out
    assert set(_rows(out, "lora_qv")) == {"gpt2"} and not _rows(out)


def test_train_mode_rows(capsys) -> None:
    """--train: both sides in train mode (dropout on); the header and footer say so, parity is checked in eval
    mode, and --torch-dropout names torch's dropout for the native side."""
    assert main(["--quick", "--families", "bert,roberta", "--deltas", "lora_qv", "--train"]) == 0
    out = capsys.readouterr().out
    assert "train mode, native dropout: promptdelta fused" in out and "dropout on" in out
    rows = _rows(out, "lora_qv")
    assert set(rows) == {"bert", "roberta"}
    for cells in rows.values():
        assert float(cells[-1]) < 1e-4 and min(map(float, cells[2:4] + cells[7:9])) > 0
    assert main(["--quick", "--families", "bert", "--train", "--torch-dropout"]) == 0
    assert "native dropout: torch" in capsys.readouterr().out


def test_set_mode_switches_dropout() -> None:
    from promptdelta.bench.backbone import build_pair, set_mode
    from promptdelta.kernels.dropout import FastDropout

    hf, ours, _ = build_pair("bert", quick=True)
    set_mode(ours, hf, train=True)
    assert hf.training and ours.training
    assert {type(m) for m in ours.modules() if isinstance(m, nn.Dropout)} == {FastDropout}
    set_mode(ours, hf, train=True, torch_dropout=True)
    assert {type(m) for m in ours.modules() if isinstance(m, nn.Dropout)} == {nn.Dropout}
