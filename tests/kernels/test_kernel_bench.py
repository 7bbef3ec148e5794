"""The kernel benchmark runs end to end (tiny shapes) and prints every variant with a ratio."""

import re

from promptdelta.bench.kernel import main, run_kernel_bench
from promptdelta.kernels.native import native_ops


def test_quick_bench_lists_every_variant_with_ratios():
    table = run_kernel_bench("cpu", repeats=2, quick=True)
    for variant in ("frozen linear  fwd+bwd", "plain LoRA     fwd+bwd", "fused LoRA     fwd+bwd",
                    "fused LoRA     fwd", "merged LoRA    fwd", "multi-adapter  fwd", "MiniLM LoRA training step"):
        assert variant in table
    ratios = [float(v) for v in re.findall(r"^\s+(?:frozen|plain|fused|merged|multi).*?\s(\d+\.\d{3})\s",
                                           table, flags=re.M)]
    native = native_ops() is not None                       # then fused fwd+bwd is timed twice: torch ops, native
    assert ("fused LoRA     fwd+bwd (native)" in table) == native
    assert ("fused LoRA     fwd+bwd (torch ops)" in table) == native
    assert len(ratios) == 8 + native and all(r > 0 for r in ratios)
    assert "malloc: glibc keeps freed memory" in table or "malloc: default settings" in table


def test_main_prints_the_table(capsys):
    assert main(["--device", "cpu", "--quick", "--repeats", "1"]) == 0
    assert "LoRA kernel benchmark on cpu" in capsys.readouterr().out


def test_default_malloc_flag_is_reported(capsys, monkeypatch):
    import promptdelta.utils.malloc as malloc
    monkeypatch.setattr(malloc, "_applied", None)
    assert main(["--device", "cpu", "--quick", "--repeats", "1", "--default-malloc"]) == 0
    assert "malloc: default settings" in capsys.readouterr().out
