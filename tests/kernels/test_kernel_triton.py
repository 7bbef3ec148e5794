"""Triton kernels under TRITON_INTERPRET=1 on CPU at small odd shapes; full-size runs marked ``gpu``."""

import pytest
import torch

from kernel_cases import ODD_SHAPES, RANKS, assert_same_under_dropout, check_against_reference, operands
from promptdelta.kernels import lora_linear, lora_linear_multi, lora_reference

pytestmark = pytest.mark.filterwarnings("ignore")


def _triton_fn(mod):
    return lambda x, w, b, a, bb, s: mod.triton_lora_linear(x, w, b, a, bb, s)


@pytest.mark.parametrize("r", RANKS)
def test_triton_fp32_matches_reference_all_ranks(triton_interp, r):
    check_against_reference(_triton_fn(triton_interp[0]), *operands(37, 45, 29, r), scale=1.3)


@pytest.mark.parametrize("r", [3, 17])
def test_triton_fp32_ranks_off_the_padding(triton_interp, r):
    """Ranks below and just past a power of two (R_PAD 16 and 32): padded rank columns masked everywhere."""
    check_against_reference(_triton_fn(triton_interp[0]), *operands(70, 33, 50, r), scale=0.9)


@pytest.mark.parametrize("shape", ODD_SHAPES[1:])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_fp32_odd_shapes(triton_interp, shape, bias):
    check_against_reference(_triton_fn(triton_interp[0]), *operands(*shape, 8, bias=bias), scale=0.6)


def test_triton_3d_input_through_dispatch(triton_interp):
    check_against_reference(lambda *o: lora_linear(*o, impl="triton"), *operands(0, 33, 21, 4, lead=(2, 9)),
                            scale=2.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_types_within_rounding(triton_interp, dtype):
    check_against_reference(_triton_fn(triton_interp[0]), *operands(37, 45, 29, 4, dtype=dtype), scale=1.0,
                            dtype=dtype)


def test_triton_dropout_matches_plain(triton_interp):
    assert_same_under_dropout("triton", "plain", *operands(21, 19, 17, 4), 1.5, p=0.3, seed=3)


def _multi_operands(m, k, n, r, n_adapters, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    a = (torch.randn(n_adapters, r, k, generator=gen) / k ** 0.5).to(dtype)
    bb = torch.randn(n_adapters, n, r, generator=gen).to(dtype)
    ids = torch.randint(-1, n_adapters, (m,), generator=gen)
    return x, w, b, a, bb, torch.linspace(0.5, 2.0, n_adapters), ids


def _per_row_reference(x, w, b, a, bb, scales, ids):
    rows = [lora_reference(x[i:i + 1].double(), w.double(), b.double(), a[j].double(), bb[j].double(),
                           float(scales[j])) if j >= 0 else torch.nn.functional.linear(x[i:i + 1].double(),
                                                                                       w.double(), b.double())
            for i, j in enumerate(ids.tolist())]
    return torch.cat(rows)


@pytest.mark.parametrize("m,r,n_adapters", [(45, 4, 3), (7, 16, 5), (40, 1, 1)])
def test_sgmv_equals_per_row_single_adapter(triton_interp, m, r, n_adapters):
    ops = _multi_operands(m, 37, 29, r, n_adapters)
    got = triton_interp[1].lora_multi_triton(*ops)
    ref = _per_row_reference(*ops)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_sgmv_through_dispatch_with_per_sequence_ids(triton_interp):
    x, w, b, a, bb, s, _ = _multi_operands(24, 20, 18, 4, 3)
    ids = torch.tensor([2, -1, 0])
    got = lora_linear_multi(x.view(3, 8, 20), w, b, a, bb, s, ids, impl="triton")
    ref = _per_row_reference(x, w, b, a, bb, s, ids.repeat_interleave(8)).view(3, 8, 18)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_gemm_autotuner_keys_on_rows_rounded_up_to_a_power_of_two(triton_interp):
    """A training run with dynamic padding sees a new M per batch; keyed on M, each would be re-tuned."""
    mod = triton_interp[0]
    assert "M_KEY" in mod._gemm_lora_kernel.keys and "M" not in mod._gemm_lora_kernel.keys
    assert [mod.autotune_rows(m) for m in (1, 17, 32, 33, 4096, 4097)] == [1, 32, 32, 64, 4096, 8192]


@pytest.mark.parametrize("m,n,r", [(37, 29, 3), (70, 50, 17), (5, 67, 16)])
def test_skinny_reductions_sum_per_tile_partials(triton_interp, m, n, r):
    """gb = g B, dB^T = s xa^T g and dA = s gb^T x from per-tile partials and one summing pass (no atomics),
    at shapes that give several row blocks and column / row splits, against float64."""
    mod = triton_interp[0]
    gen = torch.Generator().manual_seed(r)
    g, x = torch.randn(m, n, generator=gen), torch.randn(m, 45, generator=gen)
    b, xa = torch.randn(n, r, generator=gen), torch.randn(m, r, generator=gen)
    bm, bn = mod._skinny_tiles(g.dtype)
    assert mod.triton.cdiv(m, bm) > 1 or mod.triton.cdiv(n, bn) > 1       # more than one partial somewhere
    gb, dbt = mod.gb_and_db(g, b, xa, 0.7)
    d_a = mod.tn_skinny(gb, x, 1.3)
    gd, bd, xad = g.double(), b.double(), xa.double()
    want = {"gb": gd @ bd, "dBt": 0.7 * xad.t() @ gd, "dA": 1.3 * (gd @ bd).t() @ x.double()}
    for name, got in (("gb", gb), ("dBt", dbt), ("dA", d_a)):
        ref = want[name]
        assert got.dtype == torch.float32 and got.shape == ref.shape, name
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()),
                                   msg=lambda msg, name=name: f"{name}: {msg}")


def test_skinny_kernels_use_no_atomics(triton_interp):
    """The backward's reductions are per-tile partials plus a summing pass: atomics add in completion order,
    so dA and dB changed in their last bits from run to run on a GPU."""
    import inspect

    src = inspect.getsource(triton_interp[0])
    assert "atomic_add" not in src and "_sum_partials(" in src
