"""The oracle itself: closed-form gradients equal autograd's, merged weights equal the unmerged layer."""

import torch

from kernel_cases import operands
from promptdelta.kernels import lora_reference, lora_reference_grads, merged_weight


def test_closed_form_grads_match_autograd_in_float64():
    x, w, b, a, bb = (t.detach().double() if t is not None else None for t in operands(9, 11, 7, 3))
    x.requires_grad_(); a.requires_grad_(); bb.requires_grad_()
    y = lora_reference(x, w, b, a, bb, 0.75)
    g = torch.randn_like(y)
    auto = torch.autograd.grad(y, [x, a, bb], g)
    closed = lora_reference_grads(x, w, a, bb, 0.75, g)
    for got, ref in zip(closed, auto):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_merged_weight_reproduces_the_lora_layer():
    x, w, b, a, bb = (t.detach() if t is not None else None for t in operands(13, 20, 9, 4))
    merged = torch.nn.functional.linear(x, merged_weight(w, a, bb, 2.0), b)
    ref = lora_reference(x.double(), w.double(), b.double(), a.double(), bb.double(), 2.0)
    torch.testing.assert_close(merged.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
