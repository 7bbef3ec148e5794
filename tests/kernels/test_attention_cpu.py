"""kernels/attention_cpu.attention: values and q/k/v/bias gradients against plain-ops attention that uses the
same dropout mask (the op run on ones under the same torch RNG state), odd shapes, with and without bias."""

import pytest
import torch
import torch.nn.functional as F

from promptdelta.kernels import attention_cpu
from promptdelta.kernels.attention_cpu import AttentionDropoutFunction, attention
from promptdelta.kernels.dropout import dropout, dropout_ops


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert dropout_ops() is not None


def reference(q, k, v, bias, scale, mask):
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias
    return torch.matmul(torch.softmax(s, -1) * mask, v)


SHAPES = [(1, 1, 1, 1, 1), (2, 3, 5, 7, 4), (3, 2, 17, 9, 8), (2, 4, 33, 33, 16)]   # B, nh, Tq, Tk, hd


@pytest.mark.parametrize("B,nh,Tq,Tk,hd", SHAPES)
@pytest.mark.parametrize("bias_kind", [None, "padding", "full_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_grads_match_same_mask_reference(B, nh, Tq, Tk, hd, bias_kind, dtype):
    p = 0.3
    gen = torch.Generator().manual_seed(B * 100 + Tq)
    q, k = (torch.randn(B, nh, n, hd, generator=gen, dtype=dtype, requires_grad=True) for n in (Tq, Tk))
    v = torch.randn(B, nh, Tk, hd + 1, generator=gen, dtype=dtype, requires_grad=True)   # hd_v != hd
    bias = None
    if bias_kind == "padding":        # (B, 1, 1, Tk) additive, last key of batch 0 masked
        bias = torch.zeros(B, 1, 1, Tk, dtype=dtype)
        if Tk > 1:
            bias[0, ..., -1] = torch.finfo(dtype).min
    elif bias_kind == "full_grad":    # (1, nh, Tq, Tk), learned: its gradient is checked too
        bias = torch.randn(1, nh, Tq, Tk, generator=gen, dtype=dtype, requires_grad=True)
    scale = 0.7
    torch.manual_seed(5)
    mask = dropout(torch.ones(B, nh, Tq, Tk, dtype=dtype), p)
    torch.manual_seed(5)
    out = attention(q, k, v, bias, scale, p, True)
    ref = reference(q, k, v, bias, scale, mask)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert out.shape == (B, nh, Tq, hd + 1)
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn(out.shape, generator=gen, dtype=dtype)
    leaves = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(ref, leaves, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


def test_gradcheck_float64():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, b: AttentionDropoutFunction.apply(q, k, v, b, 0.5, 0.2, 1234)   # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_boolean_mask_and_non_contiguous_inputs():
    torch.manual_seed(1)
    qkv = torch.randn(2, 9, 3, 4, 8)                   # (B, T, 3, nh, hd): q, k, v as transposed views
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    keep = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    keep[1, ..., 6:] = False
    additive = torch.zeros(2, 1, 1, 9).masked_fill_(~keep, torch.finfo(torch.float32).min)
    torch.manual_seed(2)
    a = attention(q, k, v, keep, None, 0.25, True)
    torch.manual_seed(2)
    b = attention(q.contiguous(), k.contiguous(), v.contiguous(), additive, None, 0.25, True)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_eval_and_p0_are_sdpa_and_draw_no_seed():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 6, 4) for _ in range(3))
    bias = torch.randn(2, 1, 6, 6)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    state = torch.get_rng_state()
    for out in (attention(q, k, v, bias, None, 0.1, False), attention(q, k, v, bias, None, 0.0, True)):
        torch.testing.assert_close(out, want)
    assert torch.equal(torch.get_rng_state(), state)


def test_unsupported_dtype_falls_back_to_sdpa_dropout(monkeypatch):
    called = []
    monkeypatch.setattr(attention_cpu, "AttentionDropoutFunction",
                        type("X", (), {"apply": staticmethod(lambda *a: called.append(a))}))
    q = torch.randn(1, 2, 4, 8, dtype=torch.float16)
    out = attention(q, q, q, None, None, 0.5, True)
    assert out.shape == q.shape and out.dtype == torch.float16 and not called
