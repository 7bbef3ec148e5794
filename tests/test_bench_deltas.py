"""``promptdelta bench deltas``: the quick table, its baseline, the per-method models and bad options."""

from __future__ import annotations

import re

import pytest
import torch

from promptdelta.bench import deltas as bd
from promptdelta.errors import ConfigError

ROW = re.compile(r"^(\w+)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s")


def _rows(table: str) -> dict[str, list[float]]:
    out = {}
    for line in table.splitlines():
        m = ROW.match(line)
        if m:
            out[m.group(1)] = [float(g.replace(",", "")) for g in m.groups()[1:]]
    return out


@pytest.fixture(scope="module")
def quick_table() -> str:
    return bd.run_deltas_bench(quick=True)


def test_quick_table_has_every_method_and_full_is_the_baseline(quick_table: str) -> None:
    rows = _rows(quick_table)
    assert list(rows) == list(bd.METHODS)
    trainable, share, ms, ms_ratio, mb, mb_ratio = rows["full"]
    assert share == pytest.approx(100.0) and ms_ratio == 1.0 and mb_ratio == 1.0
    for method, (n, sh, t, tr, m, mr) in rows.items():
        assert t > 0 and m > 0
        assert tr == pytest.approx(t / ms, rel=0.05, abs=0.006) and mr == pytest.approx(m / mb, rel=0.05, abs=0.006)
        if method not in ("full", "prefix"):   # prefix's reparameterisation MLP is big next to a tiny model
            assert n < trainable and sh < 100.0


def test_quick_table_ladder_saves_memory(quick_table: str) -> None:
    rows = _rows(quick_table)
    assert rows["ladder"][5] < 1.0 and rows["lora"][5] < 1.0


def test_methods_subset_keeps_full_first() -> None:
    rows = _rows(bd.run_deltas_bench(quick=True, methods="bitfit,lora"))
    assert list(rows) == ["full", "bitfit", "lora"]


def test_main_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert bd.main(["--quick", "--methods", "bitfit"]) == 0
    assert list(_rows(capsys.readouterr().out)) == ["full", "bitfit"]


def test_threads_are_restored() -> None:
    before = torch.get_num_threads()
    bd.run_deltas_bench(quick=True, methods=["bitfit"], threads=1)
    assert torch.get_num_threads() == before


def test_build_model_trains_only_the_delta_and_head() -> None:
    body = bd._tiny_backbone()
    full, lora = bd.build_model(body, "full"), bd.build_model(body, "lora")
    assert full.training and lora.training   # the benchmark trains in train mode (dropout on)
    assert all(p.requires_grad for p in full.parameters())
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or n.startswith("head.") for n in names)
    assert all(p.requires_grad for p in body.parameters())   # the shared backbone itself was copied, not touched
    data = bd.make_batch(body.config.vocab_size, 2, 8, "cpu")
    full.eval(), lora.eval()
    with torch.no_grad():   # a fresh LoRA (B = 0) leaves the backbone's output unchanged
        a = full.backbone(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).last_hidden_state
        b = lora.backbone(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).last_hidden_state
    torch.testing.assert_close(a, b)


def test_train_step_changes_only_trainable_parameters() -> None:
    body = bd._tiny_backbone()
    data = bd.make_batch(body.config.vocab_size, 2, 8, "cpu")
    row = bd._setup(body, "bitfit", data, "cpu")
    before = {n: p.detach().clone() for n, p in row.model.named_parameters()}
    bd.train_step(row)
    changed = {n for n, p in row.model.named_parameters() if not torch.equal(before[n], p.detach())}
    trainable = {n for n, p in row.model.named_parameters() if p.requires_grad}
    assert changed <= trainable and "head.weight" in changed
    assert any(n.startswith("backbone.") for n in changed)   # the BitFit biases moved too


@pytest.mark.parametrize("kwargs, fix", [
    ({"methods": "lora,dora"}, "comma-separated subset"),
    ({"methods": ""}, "comma-separated subset"),
    ({"batch": 0}, "batch=16"),
    ({"repeats": 0}, "repeats=5"),
    ({"threads": 0}, "integer >= 1"),
])
def test_bad_options_raise_config_error(kwargs: dict, fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        bd.run_deltas_bench(quick=True, **kwargs)


def test_seq_longer_than_positions_names_the_fix() -> None:
    with pytest.raises(ConfigError, match="--seq 64 or less"):
        bd.run_deltas_bench(backbone=bd._tiny_backbone(), seq=65, methods="bitfit", repeats=1)
