"""Data parallelism: 2 gloo ranks on CPU reach the same delta weights as one process with the same global
batch; sharding and the launcher are checked on their own."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from promptdelta.errors import ConfigError
from promptdelta.train import Trainer
from promptdelta.train.distributed import launch, shard

HERE = Path(__file__).parent


@dataclass
class Ex:
    x: tuple
    label: int


class FrozenBaseToy(torch.nn.Module):
    """A frozen 'backbone' layer plus a trainable head: only the head is synchronised and trained."""

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(2, 8).requires_grad_(False)
        self.head = torch.nn.Linear(8, 3)

    def collate(self, examples):
        return {"x": torch.tensor([e.x for e in examples]), "labels": torch.tensor([e.label for e in examples])}

    def forward(self, batch):
        return self.head(torch.tanh(self.base(batch["x"])))

    def loss(self, batch):
        logits = self(batch)
        return torch.nn.functional.cross_entropy(logits, batch["labels"]), logits


def make_data(n: int, seed: int) -> list[Ex]:
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(n, 2, generator=g)
    return [Ex(tuple(p.tolist()), int(p[0] > 0) + int(p[1] > 0.5)) for p in pts]


# global batch 5 (shards of 3 and 2), 2 micro-batches a step, 23 examples: uneven shards and a short tail
CONFIG = dict(lr=0.05, epochs=3, batch_size=5, grad_accum=2, eval_every=2, seed=3, progress=False)


def build() -> FrozenBaseToy:
    torch.manual_seed(0)
    return FrozenBaseToy()


SCRIPT = """
import json, sys, torch
sys.path.insert(0, {here!r})
torch.set_num_threads(1)
import torch.distributed as dist
from test_distributed import CONFIG, build, make_data
from promptdelta.train import Trainer
model = build()
t = Trainer(model, **CONFIG).fit(make_data(23, 0), make_data(17, 1))
assert dist.get_world_size() == 2
if dist.get_rank() == 0:
    hist = [{{k: v for k, v in h.items() if k != "dev_examples_per_s"}} for h in t.state.history]
    torch.save({{k: v for k, v in model.state_dict().items()}}, {out!r} + "/weights.pt")
    json.dump({{"history": hist, "step": t.state.step}}, open({out!r} + "/result.json", "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_two_gloo_ranks_match_one_process(tmp_path):
    script = tmp_path / "ddp_worker.py"
    script.write_text(SCRIPT.format(here=str(HERE), out=str(tmp_path)))
    rc = launch(2, [], script=str(script), env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert rc == 0
    ddp = json.loads((tmp_path / "result.json").read_text())
    ddp_weights = torch.load(tmp_path / "weights.pt", weights_only=True)

    model = build()
    single = Trainer(model, **CONFIG).fit(make_data(23, 0), make_data(17, 1))
    assert ddp["step"] == single.state.step == 9
    hist = [{k: v for k, v in h.items() if k != "dev_examples_per_s"} for h in single.state.history]
    assert [h["step"] for h in ddp["history"]] == [h["step"] for h in hist]
    for a, b in zip(ddp["history"], hist):
        assert a["dev_accuracy"] == b["dev_accuracy"] and a["dev_n"] == b["dev_n"] == 17
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ddp_weights[name], value, rtol=1e-5, atol=1e-6)
    assert torch.equal(ddp_weights["base.weight"], build().base.weight)     # frozen stays frozen


def test_shard_covers_batch_in_order():
    for n in range(0, 12):
        for world in (1, 2, 3, 4):
            parts = [shard(list(range(n)), r, world) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_launch_rejects_bad_nproc():
    with pytest.raises(ConfigError, match="--nproc"):
        launch(0, ["run"])


def test_single_process_has_no_process_group():
    import torch.distributed as dist

    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1"
    t = Trainer(build(), max_steps=1, batch_size=4, progress=False).fit(make_data(8, 0))
    assert not t.dist.enabled and t.dist.is_main and not dist.is_initialized()
