"""The kernel benchmark runs end to end (tiny shapes) and prints every variant with a ratio."""

import re

from promptdelta.bench.kernel import main, run_kernel_bench


def test_quick_bench_lists_every_variant_with_ratios():
    table = run_kernel_bench("cpu", repeats=2, quick=True)
    for variant in ("frozen linear  fwd+bwd", "plain LoRA     fwd+bwd", "fused LoRA     fwd+bwd",
                    "fused LoRA     fwd", "merged LoRA    fwd", "multi-adapter  fwd", "MiniLM LoRA training step"):
        assert variant in table
    ratios = [float(v) for v in re.findall(r"^\s+(?:frozen|plain|fused|merged|multi).*?\s(\d+\.\d{3})\s",
                                           table, flags=re.M)]
    assert len(ratios) == 8 and all(r > 0 for r in ratios)


def test_main_prints_the_table(capsys):
    assert main(["--device", "cpu", "--quick", "--repeats", "1"]) == 0
    assert "LoRA kernel benchmark on cpu" in capsys.readouterr().out
