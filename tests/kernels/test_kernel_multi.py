"""Multi-adapter forward (torch fallback): equals per-row single-adapter forwards; bad inputs raise."""

import pytest
import torch

from promptdelta.errors import ConfigError, DeltaError
from promptdelta.kernels import lora_linear, lora_linear_multi
from test_kernel_triton import _multi_operands, _per_row_reference


@pytest.mark.parametrize("m,r,n_adapters", [(45, 4, 3), (7, 64, 5), (1, 1, 1)])
def test_multi_equals_per_row_single_adapter(m, r, n_adapters):
    ops = _multi_operands(m, 37, 29, r, n_adapters)
    got = lora_linear_multi(*ops)
    ref = _per_row_reference(*ops)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_per_sequence_ids_and_single_adapter_path_agree():
    x, w, b, a, bb, s, _ = _multi_operands(24, 20, 18, 4, 3)
    x3 = x.view(3, 8, 20)
    got = lora_linear_multi(x3, w, b, a, bb, s, [2, -1, 0])
    torch.testing.assert_close(got[0], lora_linear(x3[0], w, b, a[2], bb[2], float(s[2])), rtol=1e-5, atol=1e-5)
    # base-only rows: F.linear's values, up to the summation order of the native GEMM where it serves the call
    torch.testing.assert_close(got[1], torch.nn.functional.linear(x3[1], w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], lora_linear(x3[2], w, b, a[0], bb[0], float(s[0])), rtol=1e-5, atol=1e-5)


def test_fallback_is_differentiable():
    x, w, b, a, bb, s, ids = _multi_operands(12, 10, 9, 2, 2)
    a.requires_grad_()
    lora_linear_multi(x, w, b, a, bb, 1.0, ids).sum().backward()
    used = set(ids.tolist()) - {-1}
    for j in range(2):
        assert (a.grad[j].abs().sum() > 0) == (j in used)


@pytest.mark.parametrize("kwargs,match", [
    ({"adapter_ids": [0, 3]}, "adapter_ids must lie in"),
    ({"adapter_ids": [0, -2]}, "adapter_ids must lie in"),
    ({"adapter_ids": [[0, 1, 1]]}, "pass integer ids of shape"),
    ({"adapter_ids": [0.0, 1.0]}, "pass integer ids of shape"),
    ({"scales": [1.0, 2.0, 3.0]}, "pass one float or 2 of them"),
    ({"lora_b_stack": torch.zeros(3, 5, 2)}, r"stack adapters as \(L, r, K\) and \(L, N, r\)"),
    ({"impl": "cuda"}, "use one of auto, torch, triton"),
])
def test_multi_bad_inputs_name_the_fix(kwargs, match):
    args = {"x": torch.zeros(2, 4), "weight": torch.zeros(5, 4), "bias": None, "lora_a_stack": torch.zeros(2, 2, 4),
            "lora_b_stack": torch.zeros(2, 5, 2), "scales": 1.0, "adapter_ids": [0, 1]}
    args.update(kwargs)
    impl = args.pop("impl", "auto")
    with pytest.raises((DeltaError, ConfigError), match=match):
        lora_linear_multi(*args.values(), impl=impl)


def test_masked_stack_and_loop_fallbacks_agree():
    """The masked stacked-factor path (few adapter columns) and the per-adapter loop give the same rows,
    base-only rows (-1) included."""
    from promptdelta.kernels import multi

    x, w, b, a, bb, s, ids = _multi_operands(40, 24, 20, 4, 3)
    ids = ids.reshape(-1).long()
    ids[:3] = -1
    s = torch.as_tensor(s, dtype=torch.float32).expand(3).contiguous()
    dense = multi.lora_multi_torch(x, w, b, a, bb, s, ids)
    loop = multi._lora_multi_loop(x, w, b, a, bb, s, ids)
    torch.testing.assert_close(dense, loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense[:3], torch.nn.functional.linear(x[:3], w, b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("own", [True, False])
def test_masked_stack_on_the_native_gemm_matches_the_reference(own, monkeypatch):
    """With no gradient wanted, fp32 CPU rows go through the native GEMM (the expand as L r more inner steps)
    where it is built and on, else through torch's GEMMs: the same rows as the per-row reference either way."""
    from promptdelta.kernels import multi
    from promptdelta.kernels.native import native_ops

    ops = native_ops()
    if own and (ops is None or not ops.own_gemm()):
        pytest.skip("this build has no native GEMM (AVX-512 only)")
    calls = []
    real = multi._native_gemm
    monkeypatch.setattr(multi, "_native_gemm", lambda *args: calls.append(real(*args)) or calls[-1])
    before = ops.set_own_gemm(own) if ops is not None else None
    try:
        x, w, b, a, bb, s, ids = _multi_operands(300, 270, 130, 4, 3)
        got = lora_linear_multi(x, w, b, a, bb, s, ids)
    finally:
        if ops is not None:
            ops.set_own_gemm(before)
    assert len(calls) == 1 and (calls[0] is not None) == own            # the native GEMM served the call, or not
    ref = _per_row_reference(x, w, b, a, bb, s, ids)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
