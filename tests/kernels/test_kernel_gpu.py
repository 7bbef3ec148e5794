"""Full-size Triton runs on a CUDA device (``pytest -m gpu tests/kernels``); skipped without one."""

import pytest
import torch

from kernel_cases import operands
from promptdelta.kernels import lora_linear, lora_linear_multi, lora_reference
from test_kernel_triton import _multi_operands

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mkn,r", [((4096, 4096, 4096), 16), ((2048, 768, 768), 8), ((3, 1000, 999), 64)])
def test_gpu_triton_matches_reference(dtype, mkn, r):
    ops = [t.detach().cuda().requires_grad_(t.requires_grad) if t is not None else None
           for t in operands(*mkn, r, dtype=dtype)]
    y = lora_linear(*ops, 2.0, impl="triton")
    ref = lora_reference(*(t.double() if t is not None else None for t in ops), 2.0)
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype] * float(ref.abs().max())
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=tol)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [ops[0], ops[3], ops[4]], g)
    want = torch.autograd.grad(lora_reference(*ops, 2.0), [ops[0], ops[3], ops[4]], g)
    for t1, t2 in zip(got, want):
        rel = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
        torch.testing.assert_close(t1.double(), t2.double(), rtol=0, atol=rel * float(t2.abs().max()))


def test_gpu_sgmv_equals_torch_fallback():
    ops = [t.cuda() for t in _multi_operands(4096, 1024, 1024, 16, 8, dtype=torch.bfloat16)]
    got = lora_linear_multi(*ops, impl="triton")
    want = lora_linear_multi(*ops, impl="torch")
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=3e-2 * float(want.abs().max()))


def test_gpu_triton_backward_is_deterministic():
    """dA and dB come from per-tile partials summed in a fixed order: two backward passes agree bitwise
    (the atomics they replaced added in completion order)."""
    ops = [t.detach().cuda().requires_grad_(t.requires_grad) if t is not None else None
           for t in operands(4096, 1024, 1024, 16)]
    g = torch.randn(4096, 1024, device="cuda")
    runs = [torch.autograd.grad(lora_linear(*ops, 2.0, impl="triton"), [ops[3], ops[4]], g) for _ in range(3)]
    for other in runs[1:]:
        for t1, t2 in zip(runs[0], other):
            assert torch.equal(t1, t2)
