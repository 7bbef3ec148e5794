"""The torch-ops fused autograd function (``native=False``; the native layer has test_kernel_native.py) against
the float64 reference over odd shapes, ranks, bias, 2-D/3-D."""

import pytest
import torch

from kernel_cases import (ODD_SHAPES, RANKS, assert_same_under_dropout, check_against_reference,
                          check_trainable_weight_and_bias, operands)
from promptdelta.kernels import fused_lora_linear, lora_linear


def torch_ops(*args):
    return fused_lora_linear(*args, native=False)


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_cpu_matches_reference_2d(shape, r, bias):
    check_against_reference(torch_ops, *operands(*shape, r, bias=bias), scale=1.7)


@pytest.mark.parametrize("r", [1, 8])
def test_fused_cpu_matches_reference_3d(r):
    check_against_reference(torch_ops, *operands(0, 45, 29, r, lead=(3, 13)), scale=0.5)


def test_fused_cpu_bfloat16_within_bf16_rounding():
    check_against_reference(torch_ops, *operands(37, 45, 29, 8, dtype=torch.bfloat16), scale=2.0,
                            dtype=torch.bfloat16)


def test_non_contiguous_input_is_handled():
    x, w, b, a, bb = operands(30, 24, 20, 4)
    xt = x.detach().t().contiguous().t().requires_grad_()          # same values, column-major strides
    check_against_reference(torch_ops, xt, w, b, a, bb, scale=1.0)


def test_trainable_weight_and_bias_get_their_gradients():
    check_trainable_weight_and_bias(torch_ops)


@pytest.mark.parametrize("impl", ["cpu", "auto", "fused", "torch-ops"])
def test_dropout_applies_to_the_lora_branch_only(impl):
    """Same seed -> same dropout mask: the fused path must equal the plain path in value and gradient."""
    x, w, b, a, bb = operands(25, 18, 11, 4)
    y = assert_same_under_dropout(impl, "plain", x, w, b, a, bb, 1.5, p=0.4, seed=5)
    base = torch.nn.functional.linear(x, w, b)
    assert not torch.allclose(y, base + 1.5 * (x @ a.t()) @ bb.t())      # dropout really acted


def test_dropout_is_off_in_eval():
    x, w, b, a, bb = operands(9, 8, 6, 2)
    y = lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5, training=False)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b) + (x @ a.t()) @ bb.t())


def test_plain_path_matches_reference():
    check_against_reference(lambda *o: lora_linear(*o, impl="plain"), *operands(37, 45, 29, 4), scale=1.1)
