"""Native CPU LoRA kernels (csrc/lora_cpu.cpp): the blocked forward and backward passes against float64
torch, the fused layer on them against the reference, the thread reduction, the dropout path, the errors and
the fallback when the build fails."""

import logging
import shutil

import pytest
import torch

from kernel_cases import (ODD_SHAPES, assert_same_under_dropout, check_against_reference,
                          check_trainable_weight_and_bias, operands)
from promptdelta.errors import DeltaError
from promptdelta.kernels import cpu, fused_lora_linear, lora_linear
from promptdelta.kernels import native as native_mod
from promptdelta.kernels.native import RANKS, native_applies, native_ops

# odd shapes, plus one with several 64-row blocks per thread and a ragged last block
SHAPES = ODD_SHAPES + [(333, 70, 90)]


@pytest.fixture(scope="module")
def ops():
    module = native_ops()
    if module is None:
        pytest.skip(f"native kernels unavailable here: {native_mod.native_error()}")
    return module


@pytest.fixture(params=["per-op", "pipeline", "own", "own-pipeline"])
def path(request, monkeypatch):
    """Every native path: with MKL's GEMM, per-op kernels with torch GEMMs and the per-thread pipeline (forced
    on by a small rows-per-thread threshold; the default only takes it from 512 rows per thread); with the
    native GEMM (lora_gemm.h, the default where it is built), the skinny passes at both row grains and then
    one GEMM that carries the low-rank product."""
    monkeypatch.setattr(cpu, "PIPELINE_ROWS", 8 if request.param.endswith("pipeline") else 10 ** 9)
    module = native_ops()
    own = request.param.startswith("own")
    if module is not None and own and not module.own_gemm():
        pytest.skip("this build has no native GEMM (AVX-512 only)")
    before = module.set_own_gemm(own) if module is not None else None
    yield request.param
    if module is not None:
        module.set_own_gemm(before)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_native_kernels_build_where_a_compiler_exists():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine")
    assert native_ops() is not None, native_mod.native_error()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", RANKS)
def test_each_kernel_matches_float64(ops, shape, r, two_threads):
    m, k, n = shape
    gen = torch.Generator().manual_seed(r)
    x, g = torch.randn(m, k, generator=gen), torch.randn(m, n, generator=gen)
    a, bt, bias = torch.randn(r, k, generator=gen), torch.randn(r, n, generator=gen), torch.randn(n, generator=gen)
    w = torch.randn(n, k, generator=gen)                             # only shapes matter: no GEMM asked for
    # the blocked forward pass alone (gemm False): xa = x A^T and b + s xa Bt, 16-row grain
    out, xa = ops.forward(x, x, w, bias, a, bt, 1.3, False, 16)
    out_no_bias, _ = ops.forward(x, x, w, None, a, bt, 1.3, False, 16)
    # the blocked backward pass alone (need_dx False, x_l separate, its s gb A wanted), 16-row grain
    _, s_gb_a, d_a, d_bt = ops.backward(g, x, w, a, bt, xa, 0.7, False, True, True, 16)
    xd, gd, ad, btd, xad = (t.double() for t in (x, g, a, bt, xa))
    gbd = gd @ btd.t()                                                # gb = g B, in float64
    want = {"xa": xd @ ad.t(), "out": bias.double() + 1.3 * xad @ btd, "out (no bias)": 1.3 * xad @ btd,
            "dBt": xad.t() @ gd, "s gb A": 0.7 * gbd @ ad, "dA": gbd.t() @ xd}
    got = {"xa": xa, "out": out, "out (no bias)": out_no_bias,
           "dBt": d_bt, "s gb A": s_gb_a, "dA": d_a}
    for name, ref in want.items():
        # fp32 sums of at most 333 products: ~sqrt(333) * 6e-8 relative; 1e-5 of the largest entry is a 10x margin
        assert got[name].dtype == torch.float32 and got[name].shape == ref.shape, name
        torch.testing.assert_close(got[name].double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()),
                                   msg=lambda msg, name=name: f"{name}: {msg}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_layer_on_native_kernels_matches_reference(ops, path, shape, r, bias, two_threads):
    fn = lambda *args: fused_lora_linear(*args, native=True)            # noqa: E731
    check_against_reference(fn, *operands(*shape, r, bias=bias), scale=1.7)


# The ranks issue 22 names: 1, 8 and 16 run on the native kernels, 3, 17 and 64 on the torch-op function
# (impl="cpu" picks); both native paths each time, at 2 threads so rows split unevenly over them.
ISSUE_RANKS = (1, 3, 8, 16, 17, 64)


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("r", ISSUE_RANKS)
def test_every_rank_on_the_cpu_path_matches_reference(ops, path, shape, r, two_threads):
    x, w, b, a, bb = operands(*shape, r)
    assert native_applies(x, a) == (r in RANKS)
    check_against_reference(lambda *args: lora_linear(*args, impl="cpu"), x, w, b, a, bb, scale=1.3)


def column_major(t):
    """The same values as a leaf with transposed strides (t.t() of a contiguous copy), requiring grad as t does."""
    return t.detach().t().contiguous().t().requires_grad_(t.requires_grad)


# The ranks issue 22 item 3 names (1, 4, 8, 16 native; 12, 32 on the torch-op function), with x, A and B all
# non-contiguous (column-major leaves; 2-D x goes to the layer as it is, with no reshape), on both native paths.
@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("r", (1, 4, 8, 12, 16, 32))
def test_non_contiguous_operands_at_every_rank_match_reference(ops, path, shape, r, two_threads):
    x, w, b, a, bb = (column_major(t) if t is not None else None for t in operands(*shape, r))
    if 1 not in (shape[0], r):                                       # a size-1 dim leaves a tensor contiguous
        assert not (x.is_contiguous() or a.is_contiguous() or bb.is_contiguous())
    check_against_reference(lambda *args: lora_linear(*args, impl="cpu"), x, w, b, a, bb, scale=1.3)


@pytest.mark.parametrize("r", (4, 12, 16))
def test_non_contiguous_3d_input_matches_reference(ops, path, r):
    x, w, b, a, bb = operands(0, 45, 29, r, lead=(13, 3))
    xt = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()   # (13, 3, 45), strided
    assert not xt.is_contiguous()
    check_against_reference(lambda *args: lora_linear(*args, impl="cpu"), xt, w, b, a, bb, scale=0.7)


@pytest.mark.parametrize("r", (1, 4, 8, 12, 16, 32))
def test_bfloat16_at_every_rank_within_bf16_rounding(r):
    """bf16 never takes the native kernels (fp32 only): impl="cpu" runs the torch-op function."""
    x, w, b, a, bb = operands(37, 45, 29, r, dtype=torch.bfloat16)
    assert not native_applies(x, a)
    check_against_reference(lambda *args: lora_linear(*args, impl="cpu"), x, w, b, a, bb, scale=2.0,
                            dtype=torch.bfloat16)


# Rank 16's layouts at layer sizes: several 32-column panels plus a ragged tail in K and N, 16-row blocks with
# short 8-row tiles, per-thread partial sums in (K, 16) and (N, 16) over 2 threads.
@pytest.mark.slow
@pytest.mark.parametrize("shape", [(515, 1030, 999), (64, 1024, 1024), (257, 31, 2050), (1040, 200, 97)])
@pytest.mark.parametrize("bias", [True, False])
def test_rank16_at_layer_sizes_matches_reference(ops, path, shape, bias, two_threads):
    fn = lambda *args: fused_lora_linear(*args, native=True)            # noqa: E731
    check_against_reference(fn, *operands(*shape, 16, bias=bias), scale=2.0)


@pytest.mark.slow
@pytest.mark.parametrize("r", RANKS)
def test_each_kernel_at_layer_sizes_matches_float64(ops, r, two_threads):
    test_each_kernel_matches_float64(ops, (515, 1030, 999), r, two_threads)


def test_fused_layer_on_native_kernels_3d(ops, path):
    fn = lambda *args: lora_linear(*args, impl="native")                # noqa: E731
    check_against_reference(fn, *operands(0, 45, 29, 8, lead=(3, 13)), scale=0.5)


def test_thread_count_does_not_change_the_result_beyond_rounding(ops, path):
    """Per-thread partial sums of dA and dB are reduced at the end: 1 and 2 threads agree to fp32 rounding."""
    x, w, b, a, bb = operands(333, 70, 90, 4)
    grads = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = lora_linear(x, w, b, a, bb, 1.1, impl="native")
            grads.append(torch.autograd.grad(y, [x, a, bb], torch.ones_like(y)))
    finally:
        torch.set_num_threads(before)
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_native_matches_plain_under_dropout(ops, path, bias, two_threads):
    """x_l separate from x, with and without bias: optional inputs present or absent keep the gradient
    slots of the C++ autograd function straight."""
    x, w, b, a, bb = operands(90, 40, 30, 8)
    assert_same_under_dropout("native", "plain", x, w, b if bias else None, a, bb, 0.9, p=0.3, seed=3)


def test_only_the_wanted_gradients_are_returned(ops, path):
    x, w, b, a, bb = operands(40, 20, 10, 2)
    x = x.detach()                                                    # the first layer: no dx
    y = lora_linear(x, w, b, a, bb, 1.0, impl="native")
    da, db = torch.autograd.grad(y, [a, bb], torch.ones_like(y))
    ref = torch.nn.functional.linear(x, w, b) + (x @ a.t()) @ bb.t()
    want = torch.autograd.grad(ref, [a, bb], torch.ones_like(ref))
    torch.testing.assert_close(da, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, want[1], rtol=1e-5, atol=1e-5)


def test_auto_uses_native_only_where_it_applies():
    x = torch.zeros(3, 4)
    assert native_applies(x, torch.zeros(8, 4))
    assert not native_applies(x, torch.zeros(32, 4))                  # rank 32: not compiled
    assert not native_applies(x, torch.zeros(12, 4))                  # ranks are template arguments
    assert not native_applies(x.double(), torch.zeros(8, 4).double())
    assert not native_applies(x.bfloat16(), torch.zeros(8, 4).bfloat16())


@pytest.mark.parametrize("dtype,r", [(torch.bfloat16, 8), (torch.float32, 32)])
def test_impl_native_refuses_what_it_cannot_run(dtype, r):
    x, w, b, a, bb = operands(5, 6, 7, r, dtype=dtype)
    with pytest.raises(DeltaError, match="native LoRA kernels take fp32 CPU tensors"):
        lora_linear(x, w, b, a, bb, 1.0, impl="native")


@pytest.fixture
def failed_build(monkeypatch, caplog):
    """The build raising as it does without a compiler; the module state is restored afterwards."""
    import torch.utils.cpp_extension as cpp

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nerror: no C++ compiler")

    monkeypatch.setattr(native_mod, "_module", None)
    monkeypatch.setattr(native_mod, "_error", None)
    monkeypatch.setattr(cpp, "load", no_compiler)
    caplog.set_level(logging.WARNING, logger="promptdelta.kernels.native")
    return caplog


def test_a_failed_build_falls_back_to_torch_ops_with_a_warning(failed_build):
    x, w, b, a, bb = operands(37, 45, 29, 8)
    check_against_reference(lora_linear, x, w, b, a, bb, scale=1.2)   # impl="auto": still correct
    assert native_ops() is None and "no C++ compiler" in native_mod.native_error()
    assert "use torch ops instead" in failed_build.text or "uses torch ops instead" in failed_build.text
    with pytest.raises(DeltaError, match="could not be built"):
        lora_linear(x, w, b, a, bb, 1.0, impl="native")


def test_env_switch_disables_the_build(monkeypatch):
    monkeypatch.setattr(native_mod, "_module", None)
    monkeypatch.setattr(native_mod, "_error", None)
    monkeypatch.setenv("PROMPTDELTA_NATIVE", "0")
    assert native_ops() is None and "PROMPTDELTA_NATIVE=0" in native_mod.native_error()


def test_default_threshold_takes_the_pipeline_for_many_rows(ops, monkeypatch, two_threads):
    """At the default threshold, 2 threads x PIPELINE_ROWS rows take the per-thread pipeline, one row fewer
    the per-op kernels; both match the reference."""
    rows_seen = []

    class Spy:
        def lora_linear(self, *args):
            rows_seen.append(args[-1])
            return ops.lora_linear(*args)

    monkeypatch.setattr(cpu, "native_ops", lambda: Spy())
    fn = lambda *args: fused_lora_linear(*args, native=True)           # noqa: E731
    check_against_reference(fn, *operands(2 * cpu.PIPELINE_ROWS, 40, 30, 4), scale=0.8)
    check_against_reference(fn, *operands(2 * cpu.PIPELINE_ROWS - 1, 40, 30, 4), scale=0.8)
    assert rows_seen == [cpu.PIPELINE_ROWS, 0]


def test_trainable_weight_and_bias_get_their_gradients_on_native(ops, path):
    check_trainable_weight_and_bias(lambda *args: fused_lora_linear(*args, native=True))


def test_native_layer_runs_under_inference_mode(ops, path, two_threads):
    """torch.inference_mode: the OpenMP worker threads write rows of an inference tensor, so they must run
    in inference mode too (they do not inherit the caller's thread-local state); then training still works."""
    x, w, b, a, bb = operands(64, 24, 40, 8, bias=True)
    want = lora_linear(x, w, b, a, bb, 2.0, impl="plain")
    with torch.inference_mode():
        got = lora_linear(x, w, b, a, bb, 2.0, impl="native")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    lora_linear(x, w, b, a, bb, 2.0, impl="native").sum().backward()
    assert a.grad is not None


@pytest.mark.parametrize("shape", [(37, 45, 29), (70, 33, 99), (333, 70, 90)])
def test_rank16_reads_bt_through_its_strides(ops, shape, two_threads):
    """Rank 16 takes Bt as a view of B (N, 16), no transposed copy: the forward pass on the strided view, and
    the layer on a B that is itself a transposed view, equal the contiguous results (panels plus ragged tail)."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(16)
    x, w, bias = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    a, b = torch.randn(16, k, generator=gen), torch.randn(n, 16, generator=gen)
    strided = b.t()
    assert not strided.is_contiguous()
    out_c, xa_c = ops.forward(x, x, w, bias, a, strided.contiguous(), 1.3, False, 16)
    out_s, xa_s = ops.forward(x, x, w, bias, a, strided, 1.3, False, 16)
    assert torch.equal(xa_s, xa_c) and torch.equal(out_s, out_c)
    with pytest.raises(RuntimeError, match="Bt must be a contiguous"):        # other ranks keep the check
        ops.forward(x, x, w, bias, a[:8].contiguous(), torch.randn(n, 8).t(), 1.3, False, 16)
    x_, w_, bias_, a_, bb_ = operands(m, k, n, 16)
    b_view = bb_.detach().t().contiguous().t().requires_grad_()             # (N, 16) with strides (1, N)
    assert not b_view.is_contiguous()
    check_against_reference(lambda *o: fused_lora_linear(*o, native=True), x_, w_, bias_, a_, b_view, scale=0.8)


# The native GEMM (lora_gemm.h) alone, against float64: shapes across its blocks (256 inner steps, 96 rows,
# 512 columns, 8 x 32 tiles) with ragged edges, operands row- and column-major, the low-rank steps riding on the
# last inner block (K2 0, 1, 8, 16), with and without a bias, at 1 and 2 threads.
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 5, 3), (97, 257, 33), (200, 600, 1100), (8, 256, 32)])
@pytest.mark.parametrize("k2", [0, 1, 8, 16])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_gemm_matches_float64(ops, m, k, n, k2, threads):
    if not ops.own_gemm():
        pytest.skip("this build has no native GEMM (AVX-512 only)")
    gen = torch.Generator().manual_seed(m + k + n + k2)
    a1 = torch.randn(m, k, generator=gen)
    b1 = torch.randn(n, k, generator=gen).t()                         # W^T: column-major, as the forward reads it
    a2 = torch.randn(m, k2, generator=gen) if k2 else None
    b2 = torch.randn(n, k2, generator=gen).t() if k2 else None        # rank 16's Bt: a view of B (N, R)
    bias = torch.randn(n, generator=gen) if k2 % 2 == 0 else None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = ops.gemm(a1, b1, a2, b2, 0.3, bias)
        got_rm = ops.gemm(a1, b1.contiguous(), a2, None if b2 is None else b2.contiguous(), 0.3, bias)
    finally:
        torch.set_num_threads(before)
    want = a1.double() @ b1.double()
    if k2:
        want += 0.3 * a2.double() @ b2.double()
    if bias is not None:
        want += bias.double()
    for out in (got, got_rm):
        assert out.shape == (m, n) and out.dtype == torch.float32
        # fp32 sums of <= 616 products: ~sqrt(616) * 6e-8 relative; 1e-5 of the largest entry is a 5x margin
        torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_native_gemm_switch_keeps_the_layer_equal(ops, two_threads):
    """The layer on the native GEMM and on MKL's agree to fp32 rounding, values and every gradient."""
    if not ops.own_gemm():
        pytest.skip("this build has no native GEMM (AVX-512 only)")
    results = []
    for own in (True, False):
        x, w, b, a, bb = operands(300, 520, 270, 16)
        before = ops.set_own_gemm(own)
        try:
            y = fused_lora_linear(x, w, b, a, bb, 0.9, native=True)
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
        finally:
            ops.set_own_gemm(before)
        results.append([y.detach(), x.grad, a.grad, bb.grad])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
