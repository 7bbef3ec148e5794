"""Trainer on a toy model: learns, selects the best dev checkpoint, stops early, is seeded."""

from dataclasses import dataclass

import pytest
import torch

from promptdelta.errors import ConfigError
from promptdelta.train import TrainConfig, Trainer, compute_metrics
from promptdelta.train.trainer import _param_groups


@dataclass
class Ex:
    x: tuple
    label: int


class Toy(torch.nn.Module):
    """Linear classifier over 2-D points; offers the collate/loss/forward protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def collate(self, examples):
        return {"x": torch.tensor([e.x for e in examples]), "labels": torch.tensor([e.label for e in examples])}

    def forward(self, batch):
        return self.lin(batch["x"])

    def loss(self, batch):
        logits = self(batch)
        return torch.nn.functional.cross_entropy(logits, batch["labels"]), logits


def make_data(n: int, seed: int) -> list[Ex]:
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(n, 2, generator=g)
    return [Ex(tuple(p.tolist()), int(p[0] + 0.3 * p[1] > 0)) for p in pts]


def test_learns_separable_task():
    train, dev = make_data(64, 0), make_data(64, 1)
    torch.manual_seed(0)
    trainer = Trainer(Toy(), lr=0.1, epochs=10, batch_size=8, progress=False).fit(train, dev)
    assert trainer.evaluate(dev)["accuracy"] >= 0.9
    assert trainer.state.history and trainer.state.step == 80


def test_restores_best_dev_checkpoint():
    train, dev = make_data(32, 0), make_data(32, 1)
    torch.manual_seed(0)
    model = Toy()
    trainer = Trainer(model, lr=0.1, epochs=6, batch_size=8, progress=False).fit(train, dev)
    best = max(h["dev_accuracy"] for h in trainer.state.history)
    assert trainer.evaluate(dev)["accuracy"] == pytest.approx(best)
    assert trainer.state.best_score == pytest.approx(best)


def test_early_stopping_stops_before_the_end():
    train, dev = make_data(32, 0), make_data(32, 1)
    torch.manual_seed(0)
    trainer = Trainer(Toy(), lr=1e-9, epochs=50, batch_size=8, patience=2, progress=False).fit(train, dev)
    # with a vanishing lr dev accuracy never improves after the first evaluation
    assert len(trainer.state.history) == 3
    assert trainer.state.step == 12


def test_same_seed_same_result_and_only_trainable_params_change():
    train, dev = make_data(32, 0), make_data(32, 1)

    def once():
        torch.manual_seed(5)
        m = Toy()
        m.lin.bias.requires_grad_(False)
        bias = m.lin.bias.detach().clone()
        Trainer(m, lr=0.05, epochs=3, batch_size=4, seed=7, progress=False).fit(train, dev)
        assert torch.equal(m.lin.bias, bias)
        return m.lin.weight.detach().clone()

    assert torch.equal(once(), once())


def test_bad_config_and_no_trainable_params():
    with pytest.raises(ConfigError, match="unknown train config key"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=-1)
    m = Toy().requires_grad_(False)
    with pytest.raises(ConfigError, match="attach a delta"):
        Trainer(m, progress=False).fit(make_data(4, 0))


def test_metrics_macro_f1_counts_missing_classes():
    m = compute_metrics([0, 1, 1], [0, 1, 1], num_classes=3)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == pytest.approx(2 / 3)


class ToyPrompt(torch.nn.Module):
    """Toy with a 'backbone' and a 'verbalizer' (as PromptForClassification names them)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Linear(2, 4)
        self.verbalizer = torch.nn.Linear(4, 2)

    def collate(self, examples):
        return Toy.collate(self, examples)

    def forward(self, batch):
        return self.verbalizer(self.backbone(batch["x"]))

    def loss(self, batch):
        logits = self(batch)
        return torch.nn.functional.cross_entropy(logits, batch["labels"]), logits


def test_head_lr_trains_the_verbalizer_at_its_own_rate():
    train, dev = make_data(32, 0), make_data(32, 1)
    torch.manual_seed(0)
    model = ToyPrompt()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, lr=1e-9, head_lr=0.05, epochs=2, batch_size=8, progress=False,
                      warmup_ratio=0.0).fit(train, dev)
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    assert max(moved[n] for n in moved if n.startswith("backbone.")) < 1e-6          # ~ steps x 1e-9
    assert min(moved[n] for n in moved if n.startswith("verbalizer.")) > 1e-3
    assert trainer.state.step == 8
    groups = _param_groups(model, 0.01, head_lr=0.05)              # AdamW's default lr fills the others
    head = {id(p) for g in groups if g.get("lr") == 0.05 for p in g["params"]}
    assert head == {id(p) for p in model.verbalizer.parameters()}


def test_head_lr_without_prompt_parameters_names_the_fix():
    with pytest.raises(ConfigError, match="head_lr.*no trainable template or verbalizer"):
        Trainer(Toy(), lr=0.1, head_lr=0.5, epochs=1, batch_size=8, progress=False).fit(make_data(8, 0), [])
    with pytest.raises(ConfigError, match="head_lr"):
        TrainConfig(head_lr=-1.0)
