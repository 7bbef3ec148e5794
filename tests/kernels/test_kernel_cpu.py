"""Fused CPU autograd function against the float64 reference over odd shapes, ranks, bias, 2-D/3-D."""

import pytest
import torch

from kernel_cases import ODD_SHAPES, RANKS, check_against_reference, operands
from promptdelta.kernels import fused_lora_linear, lora_linear


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_cpu_matches_reference_2d(shape, r, bias):
    check_against_reference(fused_lora_linear, *operands(*shape, r, bias=bias), scale=1.7)


@pytest.mark.parametrize("r", [1, 8])
def test_fused_cpu_matches_reference_3d(r):
    check_against_reference(fused_lora_linear, *operands(0, 45, 29, r, lead=(3, 13)), scale=0.5)


def test_fused_cpu_bfloat16_within_bf16_rounding():
    check_against_reference(fused_lora_linear, *operands(37, 45, 29, 8, dtype=torch.bfloat16), scale=2.0,
                            dtype=torch.bfloat16)


def test_non_contiguous_input_is_handled():
    x, w, b, a, bb = operands(30, 24, 20, 4)
    xt = x.detach().t().contiguous().t().requires_grad_()          # same values, column-major strides
    check_against_reference(fused_lora_linear, xt, w, b, a, bb, scale=1.0)


def test_trainable_weight_and_bias_get_their_gradients():
    x, w, b, a, bb = operands(17, 12, 10, 2)
    w.requires_grad_(); b.requires_grad_()
    y = fused_lora_linear(x, w, b, a, bb, 0.3)
    ref = torch.nn.functional.linear(x, w, b) + 0.3 * (x @ a.t()) @ bb.t()
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, w, b, a, bb], g)
    want = torch.autograd.grad(ref, [x, w, b, a, bb], g)
    for gt, wt in zip(got, want):
        torch.testing.assert_close(gt, wt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["cpu", "auto", "fused"])
def test_dropout_applies_to_the_lora_branch_only(impl):
    """Same seed -> same dropout mask: the fused path must equal the plain path in value and gradient."""
    x, w, b, a, bb = operands(25, 18, 11, 4)
    results = []
    for path in (impl, "plain"):
        torch.manual_seed(5)
        y = lora_linear(x, w, b, a, bb, 1.5, dropout_p=0.4, training=True, impl=path)
        results.append((y, torch.autograd.grad(y, [x, a, bb], torch.ones_like(y))))
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    for t1, t2 in zip(g1, g2):
        torch.testing.assert_close(t1, t2, rtol=1e-5, atol=1e-5)
    base = torch.nn.functional.linear(x, w, b)
    assert not torch.allclose(y1, base + 1.5 * (x @ a.t()) @ bb.t())     # dropout really acted


def test_dropout_is_off_in_eval():
    x, w, b, a, bb = operands(9, 8, 6, 2)
    y = lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5, training=False)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b) + (x @ a.t()) @ bb.t())


def test_plain_path_matches_reference():
    check_against_reference(lambda *o: lora_linear(*o, impl="plain"), *operands(37, 45, 29, 4), scale=1.1)
