"""``promptdelta bench train --quick``: both parts run end to end on a tiny random BERT (2 gloo ranks)."""

import pytest

from promptdelta.bench import train as bench
from promptdelta.errors import ConfigError


def test_quick_run_reports_both_parts(capsys):
    assert bench.main(["--quick", "--bf16", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    a, b = out.split("(b) LoRA training throughput")
    rows = {line.split()[0] + (" ckpt" if "ckpt" in line else " bf16" if "bf16" in line else ""): line.split()
            for line in a.splitlines() if line.startswith("full")}
    assert set(rows) == {"full", "full ckpt", "full bf16"}
    full, ckpt = float(rows["full"][3]), float(rows["full ckpt"][5])
    assert ckpt < full                                            # checkpointing saves memory, recompute included
    procs = [line.split() for line in b.splitlines() if line.strip()[:1].isdigit()]
    assert [p[0] for p in procs] == ["1", "2"] and [p[1] for p in procs] == ["2", "1"]
    assert all(float(p[4]) > 0 for p in procs)                    # examples/s


def test_recompute_is_counted_and_checkpointing_saves_activations():
    body, _ = bench.load_body("minilm", quick=True)
    rows = bench.memory_rows(body, batch=4, seq=16, repeats=1, device="cpu", bf16=False)
    plain, ckpt = rows
    assert plain.recompute == 0 and ckpt.recompute > 0
    assert ckpt.memory.activations < plain.memory.activations
    assert ckpt.total < plain.total
    assert ckpt.model.backbone.is_gradient_checkpointing


@pytest.mark.parametrize("kw, match", [({"nproc": 1}, "nproc >= 2"), ({"batch": 0}, "batch=0")])
def test_bad_options_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        bench.run_train_bench(quick=True, **kw)


def test_sequence_longer_than_the_positions_is_a_config_error():
    body, _ = bench.load_body("minilm", quick=True)             # 64 positions
    with pytest.raises(ConfigError, match="seq=65 exceeds the backbone's 64 positions"):
        bench._check_sizes(body, seq=65)
