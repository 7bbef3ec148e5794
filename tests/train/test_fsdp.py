"""FSDP (train.fsdp): 2 gloo ranks shard a tiny native BERT with LoRA layer by layer and end with the same
weights, dev history, gradients and checkpoint as one process with the same global batch; each rank holds
only half of a frozen weight during training; a run resumes from a gathered checkpoint; what FSDP cannot run
raises ConfigError."""

import json
from pathlib import Path

import pytest
import torch

from train_helpers import Classifier, Ex

from promptdelta.backbones.bert import BertConfig, BertModel
from promptdelta.backbones.t5 import T5Config, T5Model
from promptdelta.deltas import attach
from promptdelta.errors import ConfigError
from promptdelta.train import Trainer, TrainConfig
from promptdelta.train import checkpoint as ckpt
from promptdelta.train.distributed import fsdp_units, launch

HERE = Path(__file__).parent


def make_data(n: int, seed: int) -> list[Ex]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (n, 6), generator=g)
    return [Ex(tuple(row.tolist()), int(row[1] > 25)) for row in ids]


def build() -> Classifier:
    """Tiny native BERT (hidden 32, 2 layers, no dropout) + LoRA r=3 on q/v + a trainable head."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                     max_position_embeddings=16, has_pooler=False, hidden_dropout_prob=0.0,
                     attention_dropout_prob=0.0)
    model = Classifier(BertModel(cfg), 32)
    attach(model, "lora", r=3)
    model.head.requires_grad_(True)
    return model


# 21 examples, global batch 5 (shards 3 + 2), 2 micro-batches a step: each epoch ends with a step of one
# example (rank 1's share is empty); 17 dev examples in batches of 4 (rank 0 runs one batch more)
CONFIG = dict(lr=0.05, epochs=3, batch_size=5, grad_accum=2, eval_every=2, eval_batch_size=4, seed=3,
              progress=False, checkpoint_every=4, keep_checkpoints=2)
STEP_INDICES = list(range(10))          # one optimizer step's worth, for the gradient check


SCRIPT = """
import json, shutil, sys, torch
sys.path.insert(0, {here!r})
torch.set_num_threads(1)
import torch.distributed as dist
from test_fsdp import CONFIG, STEP_INDICES, build, make_data
from promptdelta.train import Trainer
from promptdelta.train import checkpoint as ckpt
from promptdelta.train.distributed import full_tensor
out = {out!r}
train, dev = make_data(21, 0), make_data(17, 1)
model = build()
seen = []                                   # layer 0's frozen weight, seen while layer 1 runs its forward
q0 = model.backbone.layers[0].attn.q_proj.base
model.backbone.layers[1].register_forward_pre_hook(lambda m, a: seen.append(
    (type(q0.weight).__name__, q0.weight.to_local().numel() if hasattr(q0.weight, "to_local") else -1)))
t = Trainer(model, **CONFIG, fsdp=True, checkpoint_dir=out + "/ckpt").fit(train, dev)
rank = dist.get_rank()
assert t.sharded and dist.get_world_size() == 2
emb = model.backbone.embeddings.word_embeddings.weight
shards = {{"seen": sorted(set(seen)), "n_seen": len(seen), "emb": [type(emb).__name__, emb.to_local().numel()]}}
json.dump(shards, open(out + f"/shards{{rank}}.json", "w"))
model.zero_grad(set_to_none=True)
model.train()
t._accumulate_grads(train, STEP_INDICES)
grads = {{n: full_tensor(p.grad) for n, p in model.named_parameters() if p.requires_grad}}
with t.consolidated():
    weights = {{k: v.clone() for k, v in model.state_dict().items()}}
if rank == 0:
    hist = [{{k: v for k, v in h.items() if k != "dev_examples_per_s"}} for h in t.state.history]
    torch.save({{"weights": weights, "grads": grads}}, out + "/fsdp.pt")
    json.dump({{"history": hist, "step": t.state.step}}, open(out + "/result.json", "w"))
    shutil.rmtree(ckpt.latest_checkpoint(out + "/ckpt"))      # resume from the one before the last
dist.barrier()
again = build()
t2 = Trainer(again, **CONFIG, fsdp=True, checkpoint_dir=out + "/ckpt", resume=True).fit(train, dev)
with t2.consolidated():
    resumed = {{k: v.clone() for k, v in again.state_dict().items()}}
if rank == 0:
    torch.save(resumed, out + "/resumed.pt")
dist.barrier()
dist.destroy_process_group()
"""


def test_fsdp_two_gloo_ranks_match_one_process(tmp_path):
    script = tmp_path / "fsdp_worker.py"
    script.write_text(SCRIPT.format(here=str(HERE), out=str(tmp_path)))
    rc = launch(2, [], script=str(script), env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert rc == 0
    result = json.loads((tmp_path / "result.json").read_text())
    fsdp = torch.load(tmp_path / "fsdp.pt", weights_only=True)

    train, dev = make_data(21, 0), make_data(17, 1)
    model = build()
    single = Trainer(model, **CONFIG, checkpoint_dir=str(tmp_path / "single")).fit(train, dev)
    assert result["step"] == single.state.step == 9
    hist = [{k: v for k, v in h.items() if k != "dev_examples_per_s"} for h in single.state.history]
    assert [h["step"] for h in result["history"]] == [h["step"] for h in hist]
    for a, b in zip(result["history"], hist):
        assert a["dev_accuracy"] == b["dev_accuracy"] and a["dev_n"] == b["dev_n"] == 17
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)

    # same final weights (LoRA, head) and untouched frozen weights, gathered from the shards
    # (sharded reductions sum in another order: after 9 Adam steps at lr 0.05 an element of ~0.25 was seen
    # 3.4e-6 apart on one host, so 1e-5 absolute; a wrong shard or a missed update is off by ~1e-2)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(fsdp["weights"][name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(fsdp["weights"]["backbone.layers.0.attn.q_proj.base.weight"],
                       build().backbone.layers[0].attn.q_proj.base.weight)

    # one step's gradient (2 micro-batches, uneven shards) equals the 1-process one: FSDP sums, not averages
    model.zero_grad(set_to_none=True)
    model.train()
    single._accumulate_grads(train, STEP_INDICES)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(fsdp["grads"]) == set(grads) and len(grads) == 2 * 2 * 2 + 2   # 2 layers x q,v x A,B + head
    for name, g in grads.items():
        torch.testing.assert_close(fsdp["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)

    # every forward of layer 1 saw layer 0's frozen weight as a half shard; the embeddings are sharded too
    for rank in (0, 1):
        shards = json.loads((tmp_path / f"shards{rank}.json").read_text())
        assert shards["seen"] == [["DTensor", 32 * 32 // 2]] and shards["n_seen"] > 9
        assert shards["emb"] == ["DTensor", 50 * 32 // 2]

    # the checkpoint holds whole tensors; the optimizer state covers the trainable parameters only; the run
    # resumed from step 8 (its gathered checkpoint cut back into shards) ends where the first one did
    tensors, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "ckpt"))
    ref, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "single"))
    assert set(tensors) - {k for k in tensors if k.startswith("rng.")} == \
        set(ref) - {k for k in ref if k.startswith("rng.")}
    assert len([k for k in ref if k.endswith(".exp_avg")]) == len(grads)
    for key, value in ref.items():
        if not key.startswith("rng."):
            torch.testing.assert_close(tensors[key], value, rtol=1e-5, atol=1e-5, msg=key)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_fsdp_units_are_the_layers():
    model = build()
    assert fsdp_units(model) == list(model.backbone.layers)
    t5 = T5Model(T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=3, num_heads=2, dropout=0.0))
    units = fsdp_units(t5)      # block 0 of each stack owns the position bias the stack reads: root unit
    assert units == [*t5.encoder.layers[1:], *t5.decoder.layers[1:]]


def test_fsdp_units_of_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    hf = transformers.BertModel(cfg)
    assert fsdp_units(Classifier(hf, 16)) == list(hf.encoder.layer)


class NoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(6, 2)

    def collate(self, examples):
        return {"x": torch.tensor([e.ids for e in examples], dtype=torch.float32),
                "labels": torch.tensor([e.label for e in examples])}

    def forward(self, batch):
        return self.head(batch["x"])

    def loss(self, batch):
        logits = self(batch)
        return torch.nn.functional.cross_entropy(logits, batch["labels"]), logits


def test_fsdp_refuses_what_it_cannot_shard():
    with pytest.raises(ConfigError, match="holds no backbone with per-layer structure.*train.fsdp=false"):
        Trainer(NoLayers(), fsdp=True, max_steps=1, progress=False).fit(make_data(4, 0))
    with pytest.raises(ConfigError, match="fsdp=true does not work with precision='fp16'.*bf16"):
        TrainConfig(fsdp=True, precision="fp16", device="cuda")
    with pytest.raises(ConfigError, match="train.fsdp='yes' has the wrong type"):
        TrainConfig.from_dict({"fsdp": "yes"})


def test_fsdp_in_one_process_trains_unsharded():
    plain, flagged = build(), build()
    Trainer(plain, max_steps=2, batch_size=4, progress=False).fit(make_data(8, 0))
    t = Trainer(flagged, fsdp=True, max_steps=2, batch_size=4, progress=False).fit(make_data(8, 0))
    assert not t.sharded
    for (name, a), b in zip(plain.state_dict().items(), flagged.state_dict().values()):
        assert torch.equal(a, b), name


def test_cli_run_with_fsdp_saves_the_same_delta(tiny_bert_dir, tmp_path):
    """``promptdelta run --nproc 2 --fsdp``: ranks gather the sharded delta and prompt tensors, rank 0 writes
    the same files as one process."""
    import shutil

    from safetensors.torch import load_file

    from promptdelta.cli import main

    backbone = tmp_path / "tiny"                  # dropout off: ranks would draw other masks
    shutil.copytree(tiny_bert_dir, backbone)
    cfg = json.loads((backbone / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (backbone / "config.json").write_text(json.dumps(cfg))
    argv = ["run", "--backbone", str(backbone), "--shots", "4", "--seeds", "13", "--verbalizer", "soft",
            "--max-steps", "2", "--batch-size", "4", "--output-dir", str(tmp_path), "--no-progress"]
    assert main([*argv, "--name", "one"]) == 0
    assert main([*argv, "--name", "two", "--nproc", "2", "--fsdp"]) == 0
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text())["rows"][0] for n in ("one", "two"))
    assert (two["accuracy"], two["steps"], two["best_step"]) == (one["accuracy"], one["steps"], one["best_step"])
    for name in ("delta/delta.safetensors", "prompt.safetensors"):
        a, b = (load_file(tmp_path / n / "seed13" / name) for n in ("one", "two"))
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    meta = [json.loads((tmp_path / n / "seed13" / "delta" / "delta.json").read_text()) for n in ("one", "two")]
    assert meta[0]["fingerprint"] == meta[1]["fingerprint"]        # read from the gathered frozen weights
