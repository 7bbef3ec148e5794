"""``bench peers`` runs promptdelta's rows the way promptdelta trains (fused dropout on CPU) and PEFT's rows as
PEFT users run them; ``--torch-dropout`` puts promptdelta's rows on torch's dropout."""

import pytest
import torch
from torch import nn

from promptdelta.bench import peers
from promptdelta.kernels.dropout import FastDropout

pytest.importorskip("peft")


def kinds(model: nn.Module) -> tuple[int, int, set]:
    fast = sum(isinstance(m, FastDropout) for m in model.modules())
    plain = sum(type(m) is nn.Dropout for m in model.modules())
    impls = {m.config._attn_implementation for m in model.modules() if hasattr(m, "set_attn_implementation")}
    torch_attn = {getattr(m, "torch_dropout") for m in model.modules() if hasattr(m, "torch_dropout")}
    return fast, plain, impls | {f"native torch_dropout={t}" for t in torch_attn}


def test_promptdelta_rows_fused_peft_rows_torch():
    fast, plain, impls = kinds(peers.build_row("lora_qv", "pd-hf", tiny=True))
    assert fast > 0 and plain == 0 and impls == {"promptdelta_cpu"}
    fast, plain, impls = kinds(peers.build_row("lora_qv", "pd-native", tiny=True))
    assert fast > 0 and plain == 0 and impls == {"native torch_dropout=False"}
    fast, plain, impls = kinds(peers.build_row("lora_qv", "peft", tiny=True))
    assert fast == 0 and plain > 0 and "promptdelta_cpu" not in impls
    fast, plain, impls = kinds(peers.build_row("full", "hf", tiny=True))
    assert fast == 0 and impls == {"sdpa"}


@pytest.mark.parametrize("impl", ["pd-hf", "pd-native"])
def test_torch_dropout_switch(impl):
    fast, plain, impls = kinds(peers.build_row("lora_qv", impl, tiny=True, torch_dropout=True))
    assert fast == 0 and plain > 0 and "promptdelta_cpu" not in impls
    assert "native torch_dropout=False" not in impls


def test_fused_rows_train_step_is_finite_and_seeded():
    ids = torch.randint(5, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    for impl in ("pd-hf", "pd-native"):
        model = peers.build_row("prefix", impl, tiny=True)
        torch.manual_seed(0)
        a = model(ids, mask)
        torch.manual_seed(0)
        b = model(ids, mask)
        a.sum().backward()
        assert torch.isfinite(a).all() and torch.equal(a, b), impl
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
