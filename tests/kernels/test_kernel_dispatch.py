"""Dispatch choices and the documented errors (each message names the fix)."""

import pytest
import torch

from promptdelta.errors import ConfigError, DeltaError
from promptdelta.kernels import cpu, lora_linear
from promptdelta.kernels.reference import lora_reference


def _ops():
    return torch.randn(5, 4), torch.randn(6, 4), torch.randn(6), torch.randn(2, 4), torch.randn(6, 2)


class _Calls(list):
    native = False


@pytest.fixture
def fused_calls(monkeypatch):
    """Records which fused path ran: "torch-ops" (the Python autograd function) or "native" (C++)."""
    calls = _Calls()
    real = cpu.FusedLoRAFunction.apply
    monkeypatch.setattr(cpu.FusedLoRAFunction, "apply", lambda *a: calls.append("torch-ops") or real(*a))
    native = cpu.native_ops()
    if native is not None:
        class Spy:
            def lora_linear(self, *args):
                calls.append("native")
                return native.lora_linear(*args)
        monkeypatch.setattr(cpu, "native_ops", lambda: Spy())
    calls.native = native is not None
    return calls


@pytest.mark.parametrize("impl", ["auto", "fused", "cpu", "torch-ops"])
def test_cpu_tensors_use_a_fused_path(impl, fused_calls):
    """fp32 CPU at rank 2: the native kernels where they built, else (and for "torch-ops") torch ops."""
    x, *rest = _ops()
    lora_linear(x.requires_grad_(), *rest, 1.0, impl=impl)
    assert fused_calls == ["native" if fused_calls.native and impl != "torch-ops" else "torch-ops"]


@pytest.mark.parametrize("m,merged", [(64, True), (3, False)])
def test_inference_on_many_rows_folds_the_adapter_into_the_weight(m, merged, fused_calls):
    """Without the native kernels, no gradient and M (K + N) >= 2 N K: y = x (W + s B A)^T + b, equal to
    the reference; few rows (or bf16, or a gradient) keep the fused function. The native layer, where it
    runs, runs for inference too (it measured cheaper than the merge)."""
    x, w, b, a, bb = torch.randn(m, 8), torch.randn(6, 8), torch.randn(6), torch.randn(2, 8), torch.randn(6, 2)
    with torch.no_grad():
        y = lora_linear(x, w, b, a, bb, 1.5)
        torch.testing.assert_close(y, lora_reference(x, w, b, a, bb, 1.5), rtol=1e-5, atol=1e-5)
        expected = ["native"] if fused_calls.native else ([] if merged else ["torch-ops"])
        assert fused_calls == expected
        lora_linear(x, w, b, a, bb, 1.5, impl="torch-ops")            # no native: the merge where it applies
        assert fused_calls[len(expected):] == ([] if merged else ["torch-ops"])
        lora_linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), a.bfloat16(), bb.bfloat16(), 1.5)
        assert fused_calls[-1:] == ["torch-ops"]                    # bf16: no native kernels
    assert cpu.merge_on_the_fly(x, w, a, bb, None) is merged
    assert not cpu.merge_on_the_fly(x, w, a.requires_grad_(), bb, None)
    assert not cpu.merge_on_the_fly(x, w, a, bb, x.clone())


def test_plain_does_not_use_the_fused_function(monkeypatch):
    monkeypatch.setattr(cpu.FusedLoRAFunction, "apply", lambda *a: pytest.fail("fused path used"))
    lora_linear(*_ops(), 1.0, impl="plain")


@pytest.mark.parametrize("index,bad,match", [
    (1, torch.randn(6, 3), r"pass weight \(N, 4\)"),
    (2, torch.randn(5), r"pass bias \(6,\) or None"),
    (3, torch.randn(2, 3), r"pass lora_a \(r, 4\)"),
    (4, torch.randn(6, 3), r"pass lora_b \(6, 2\)"),
    (4, torch.randn(6, 2, dtype=torch.float64), r"move it with \.to\(x\.device, x\.dtype\)"),
])
def test_operand_mismatch_raises_delta_error(index, bad, match):
    ops = list(_ops())
    ops[index] = bad
    with pytest.raises(DeltaError, match=match):
        lora_linear(*ops, 1.0)


def test_unknown_impl_raises_config_error():
    with pytest.raises(ConfigError, match="use one of auto, fused, plain, triton, cpu"):
        lora_linear(*_ops(), 1.0, impl="cuda")


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_bad_dropout_raises_config_error(p):
    with pytest.raises(ConfigError, match="outside \\[0, 1\\); pass a LoRA dropout"):
        lora_linear(*_ops(), 1.0, dropout_p=p, training=True)


def test_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(DeltaError, match="needs CUDA tensors.*use impl='auto'"):
        lora_linear(*_ops(), 1.0, impl="triton")


@pytest.mark.parametrize("impl", ["fused", "plain"])
def test_autocast_bf16_casts_operands_like_f_linear(impl):
    """Under CPU bf16 autocast a bf16 activation meets fp32 weights (as in a Trainer with precision='bf16'):
    the LoRA path casts like autocast does for F.linear, and fp32 parameters get fp32 gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g).bfloat16()
    w, b = torch.randn(12, 16, generator=g), torch.randn(12, generator=g)
    a = torch.randn(4, 16, generator=g).requires_grad_()
    bb = torch.randn(12, 4, generator=g).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, b, a, bb, 0.5, impl=impl)
    assert y.dtype == torch.bfloat16
    ref = lora_reference(x.float(), w, b, a.detach(), bb.detach(), 0.5)
    assert (y.float() - ref).abs().max() <= 0.05 * ref.abs().max()         # bf16 has an 8-bit mantissa
    y.float().sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32
