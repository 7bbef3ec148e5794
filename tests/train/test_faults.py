"""Faults and knobs: non-finite losses are skipped then abort, OOM names the knobs, grad accumulation and
bf16 autocast behave."""

import logging
from dataclasses import dataclass

import pytest
import torch

from promptdelta.errors import ConfigError, PromptDeltaError
from promptdelta.train import Trainer
from promptdelta.train.trainer import NonFiniteLossError, TrainingOutOfMemoryError


@dataclass
class Ex:
    x: tuple
    label: int


class Toy(torch.nn.Module):
    """Linear classifier; examples whose x[0] is NaN poison the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.fail_with: Exception | None = None

    def collate(self, examples):
        return {"x": torch.tensor([e.x for e in examples]), "labels": torch.tensor([e.label for e in examples])}

    def forward(self, batch):
        if self.fail_with is not None:
            raise self.fail_with
        return self.lin(batch["x"])

    def loss(self, batch):
        logits = self(batch)
        return torch.nn.functional.cross_entropy(logits, batch["labels"]), logits


def make_data(n: int, seed: int) -> list[Ex]:
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(n, 2, generator=g)
    return [Ex(tuple(p.tolist()), int(p[0] + 0.3 * p[1] > 0)) for p in pts]


def fresh() -> Toy:
    torch.manual_seed(0)
    return Toy()


def test_nonfinite_loss_skips_step_with_warning(caplog):
    data = make_data(16, 0)
    data[0] = Ex((float("nan"), 0.0), 1)
    model = fresh()
    with caplog.at_level(logging.WARNING, logger="promptdelta.train.trainer"):
        t = Trainer(model, lr=0.1, epochs=2, batch_size=4, progress=False, max_nonfinite_steps=3).fit(data)
    # a skipped step does not count: the 8 optimizer steps are still made, drawing more batches
    assert t.state.step == 8 and 1 <= t.state.skipped_steps <= 3
    assert caplog.text.count("non-finite loss") == t.state.skipped_steps
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_loss_aborts_after_limit():
    data = [Ex((float("nan"), 0.0), 1)] + make_data(15, 0)
    with pytest.raises(NonFiniteLossError, match="lower train.lr") as info:
        Trainer(fresh(), lr=0.1, epochs=5, batch_size=4, progress=False, max_nonfinite_steps=1).fit(data)
    assert isinstance(info.value, PromptDeltaError) and isinstance(info.value, FloatingPointError)
    assert "max_nonfinite_steps=1" in str(info.value)


def test_zero_tolerance_aborts_at_once():
    data = [Ex((float("inf"), 0.0), 1)] * 4
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_steps=0"):
        Trainer(fresh(), lr=0.1, epochs=1, batch_size=4, progress=False, max_nonfinite_steps=0).fit(data)


@pytest.mark.parametrize("err", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                 RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_reports_batch_size_and_knobs(err):
    model = fresh()
    model.fail_with = err
    with pytest.raises(TrainingOutOfMemoryError) as info:
        Trainer(model, lr=0.1, epochs=1, batch_size=8, grad_accum=2, progress=False).fit(make_data(16, 0))
    msg = str(info.value)
    assert "batch_size=8" in msg and "grad_accum" in msg and "bf16" in msg
    assert isinstance(info.value, PromptDeltaError) and info.value.__cause__ is err


def test_out_of_memory_in_evaluation_names_eval_batch_size():
    model = fresh()
    model.fail_with = torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(TrainingOutOfMemoryError, match="eval_batch_size=64"):
        Trainer(model, progress=False).evaluate(make_data(4, 0))


def test_other_errors_are_not_swallowed():
    model = fresh()
    model.fail_with = RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        Trainer(model, epochs=1, progress=False).fit(make_data(4, 0))


def test_grad_accumulation_equals_bigger_batch():
    data = make_data(24, 0)
    a, b = fresh(), fresh()
    Trainer(a, lr=0.1, epochs=2, batch_size=8, progress=False, warmup_ratio=0).fit(data)
    tb = Trainer(b, lr=0.1, epochs=2, batch_size=4, grad_accum=2, progress=False, warmup_ratio=0).fit(data)
    assert tb.state.step == 6
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_trains_on_cpu():
    train, dev = make_data(64, 0), make_data(64, 1)
    seen = []
    model = fresh()
    model.lin.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    t = Trainer(model, lr=0.1, epochs=5, batch_size=8, precision="bf16", progress=False).fit(train, dev)
    assert torch.bfloat16 in seen and model.lin.weight.dtype == torch.float32
    assert t.evaluate(dev)["accuracy"] >= 0.85


def test_knob_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="bf16"):
        Trainer(fresh(), precision="fp16", device="cpu")
    with pytest.raises(ConfigError, match="precision"):
        Trainer(fresh(), precision="fp8")
    with pytest.raises(ConfigError, match="grad_accum"):
        Trainer(fresh(), grad_accum=0)
    with pytest.raises(ConfigError, match="max_nonfinite_steps"):
        Trainer(fresh(), max_nonfinite_steps=-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_with_loss_scaling_trains_on_gpu():
    train, dev = make_data(64, 0), make_data(64, 1)
    t = Trainer(fresh(), lr=0.1, epochs=5, batch_size=8, precision="fp16", device="cuda", progress=False)
    t.fit(train, dev)
    assert t.model.lin.weight.dtype == torch.float32 and t.evaluate(dev)["accuracy"] >= 0.85
