"""Shared operand builders and tolerances for the kernel tests."""

import torch

from promptdelta.kernels import lora_reference, lora_reference_grads

# (M, K, N): none a multiple of 16 (the interpreter's tile) or of any GPU tile; M = 1 is a decoding row.
ODD_SHAPES = [(37, 45, 29), (1, 130, 67), (70, 33, 50)]
RANKS = [1, 4, 8, 16, 64]
# Relative to the largest reference entry. fp32 sums of K <= 130 products carry about sqrt(K) * 6e-8
# ~ 7e-7 relative error, so 1e-5 leaves a 10x margin yet fails for any wrong term (>= 1e-2). Half types
# round inputs/outputs at 2^-8 (bf16) / 2^-11 (fp16) relative: a few ulps of margin.
REL_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def operands(m, k, n, r, dtype=torch.float32, bias=True, lead=None, seed=0):
    """x (lead or (m,), K) requiring grad, frozen W and b, trainable A and B (B nonzero so every term counts)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (m, k) if lead is None else (*lead, k)
    x = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    a = (torch.randn(r, k, generator=gen) / k ** 0.5).to(dtype).requires_grad_()
    bb = (torch.randn(n, r, generator=gen) / r ** 0.5).to(dtype).requires_grad_()
    return x, w, b, a, bb


def check_against_reference(fn, x, w, b, a, bb, scale, dtype=torch.float32):
    """fn's output and (dx, dA, dB) against the float64 reference, within REL_TOL[dtype]."""
    y = fn(x, w, b, a, bb, scale)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    dx, da, db = torch.autograd.grad(y, [x, a, bb], g)
    d = [t.detach().double() if t is not None else None for t in (x, w, b, a, bb)]
    ref_y = lora_reference(*d, scale)
    refs = lora_reference_grads(d[0], d[1], d[3], d[4], scale, g.double())
    for name, got, ref in (("y", y, ref_y), ("dx", dx, refs[0]), ("dA", da, refs[1]), ("dB", db, refs[2])):
        assert got.shape == ref.shape and got.dtype == dtype, name
        tol = REL_TOL[dtype] * float(ref.abs().max())
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


def assert_same_under_dropout(impl, other, x, w, b, a, bb, scale, p=0.3, seed=3):
    """Same seed -> same dropout mask: ``lora_linear`` with impl and with other agree in y and in the
    gradients of x, A and B (fp32 rounding apart). Returns impl's y."""
    from promptdelta.kernels import lora_linear

    results = []
    for path in (impl, other):
        torch.manual_seed(seed)
        y = lora_linear(x, w, b, a, bb, scale, dropout_p=p, training=True, impl=path)
        results.append((y, torch.autograd.grad(y, [x, a, bb], torch.ones_like(y))))
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    for t1, t2 in zip(g1, g2):
        torch.testing.assert_close(t1, t2, rtol=1e-5, atol=1e-5)
    return y1


def check_trainable_weight_and_bias(fn):
    """fn(x, W, b, A, B, scale) gives W and b their gradients when they require them, as autograd does."""
    x, w, b, a, bb = operands(37, 12, 10, 2)
    w.requires_grad_()
    b.requires_grad_()
    y = fn(x, w, b, a, bb, 0.3)
    ref = torch.nn.functional.linear(x, w, b) + 0.3 * (x @ a.t()) @ bb.t()
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, w, b, a, bb], g)
    want = torch.autograd.grad(ref, [x, w, b, a, bb], g)
    for gt, wt in zip(got, want):
        torch.testing.assert_close(gt, wt, rtol=1e-5, atol=1e-5)
