"""promptdelta.speed.fast_dropout on tiny transformers BERTs: eval unchanged bit for bit, the fused dropout and
attention really run in training (with the right mask), restore() gives back the original model, and the
trainer uses it on CPU by default and undoes it after fit."""

import pytest
import torch
import transformers
from torch import nn

from promptdelta import speed
from promptdelta.kernels.dropout import FastDropout, dropout, dropout_ops
from promptdelta.train import Trainer


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert dropout_ops() is not None


def tiny_bert(attn="sdpa", hidden_p=0.1, attn_p=0.1):
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=hidden_p,
                                  attention_probs_dropout_prob=attn_p, attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.BertModel(cfg)


def batch(B=3, T=11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0                       # padding: the attention mask path is exercised
    return ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_eval_unchanged_and_restore_gives_back_everything(attn):
    model = tiny_bert(attn).eval()
    ids, mask = batch()
    before = model(ids, attention_mask=mask).last_hidden_state
    originals = {name: m for name, m in model.named_modules() if type(m) is nn.Dropout}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    handle = speed.fast_dropout(model)
    assert handle.changed and "promptdelta_cpu" in handle.message
    assert model.config._attn_implementation == "promptdelta_cpu"
    swapped = {name: m for name, m in model.named_modules() if isinstance(m, FastDropout)}
    assert swapped.keys() == originals.keys() and len(swapped) == 1 + 3 * 2    # embeddings + 3 per layer
    assert all(swapped[n].p == originals[n].p for n in swapped)
    assert model.state_dict().keys() == sd.keys()
    after = model(ids, attention_mask=mask).last_hidden_state
    if attn == "sdpa":
        assert torch.equal(after, before)           # eval runs transformers' SDPA, bit for bit
    else:
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    handle.restore()
    assert model.config._attn_implementation == attn
    assert {n: m for n, m in model.named_modules() if type(m) is nn.Dropout} == originals
    assert not any(isinstance(m, FastDropout) for m in model.modules())
    assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, before)
    handle.restore()                                # a second restore is harmless


def test_training_runs_the_fused_attention_and_dropout(monkeypatch):
    model = tiny_bert().train()
    ids, mask = batch()
    calls, rates = [], []
    real = speed.attention
    monkeypatch.setattr(speed, "attention", lambda *a: calls.append(a[5]) or real(*a))
    with speed.fast_dropout(model):
        for m in model.modules():
            if isinstance(m, FastDropout):
                m.register_forward_hook(lambda mod, inp, out: rates.append(float((out == 0).float().mean())))
        torch.manual_seed(3)
        out1 = model(ids, attention_mask=mask).last_hidden_state
        torch.manual_seed(3)
        out2 = model(ids, attention_mask=mask).last_hidden_state
        out3 = model(ids, attention_mask=mask).last_hidden_state
    assert calls[:2] == [0.1, 0.1] and len(calls) == 6               # 2 layers x 3 forwards
    assert torch.isfinite(out1).all() and torch.equal(out1, out2) and not torch.equal(out1, out3)
    # hidden dropouts (embeddings, attention output, FFN output) drop ~10% of 3*11*32 elements each
    n = 3 * 11 * 32
    hidden = [r for r in rates]
    assert hidden and abs(sum(hidden) / len(hidden) - 0.1) < 6 * (0.1 * 0.9 / (n * len(hidden))) ** 0.5


def test_attention_glue_matches_same_mask_reference():
    """promptdelta_attention (the AttentionInterface entry) vs plain ops with the mask the kernel draws."""
    torch.manual_seed(0)
    module = nn.Module().train()
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keep[0, ..., 4:] = False                                       # SDPA-style boolean mask
    torch.manual_seed(9)
    m = dropout(torch.ones(2, 4, 6, 6), 0.2)
    torch.manual_seed(9)
    out, weights = speed.promptdelta_attention(module, q, k, v, keep, dropout=0.2, scaling=0.5)
    s = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~keep, float("-inf"))
    ref = (torch.softmax(s, -1) * m @ v).transpose(1, 2)
    assert weights is None and out.shape == (2, 6, 4, 8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_untouched_when_the_kernel_is_unavailable_or_nothing_to_do(monkeypatch):
    model = tiny_bert()
    monkeypatch.setattr(speed, "dropout_ops", lambda: None)
    handle = speed.fast_dropout(model)
    assert not handle.changed and "left untouched" in handle.message and "unavailable" in handle.message
    assert model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, FastDropout) for m in model.modules())
    plain = speed.fast_dropout(nn.Linear(2, 2))
    assert not plain.changed and "no nn.Dropout" in plain.message


class Clf(nn.Module):
    """tiny BERT -> [CLS] -> linear head, with the trainer's collate/loss protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.bert, self.head = tiny_bert(), nn.Linear(32, 2)

    def collate(self, examples):
        return {"ids": torch.tensor([e[0] for e in examples]), "labels": torch.tensor([e[1] for e in examples])}

    def forward(self, batch):
        return self.head(self.bert(input_ids=batch["ids"]).last_hidden_state[:, 0])

    def loss(self, batch):
        logits = self(batch)
        return nn.functional.cross_entropy(logits, batch["labels"]), logits


def data(n=32):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 100, (n, 8), generator=g)
    labels = (ids[:, 1] > 50).long()
    ids[:, 1] = torch.where(labels.bool(), 99, 3)                  # a token that gives the label away
    return [(i.tolist(), int(y)) for i, y in zip(ids, labels)]


def test_trainer_uses_it_on_cpu_learns_and_restores(monkeypatch):
    model = Clf()
    seen = []
    real = speed.attention
    monkeypatch.setattr(speed, "attention", lambda *a: seen.append(1) or real(*a))
    train = data()
    model.eval()
    with torch.no_grad():
        loss0 = float(model.loss(model.collate(train))[0])
    trainer = Trainer(model, lr=3e-3, epochs=6, batch_size=8, progress=False, seed=1).fit(train)
    assert seen                                                      # the fused attention trained the model
    assert model.bert.config._attn_implementation == "sdpa"          # ... and was undone after fit
    assert not any(isinstance(m, FastDropout) for m in model.modules())
    model.eval()
    assert float(model.loss(model.collate(train))[0].detach()) < loss0 * 0.7
    assert trainer.config.fast_dropout is True


def test_trainer_switch_off_and_config_validation():
    model = Clf()
    called = []
    orig = speed.fast_dropout
    import promptdelta.train.trainer as tr

    tr_fast = tr.fast_dropout
    try:
        tr.fast_dropout = lambda m: called.append(m) or orig(m)
        Trainer(model, lr=1e-3, max_steps=1, batch_size=8, progress=False, fast_dropout=False).fit(data(8))
        assert not called
        Trainer(model, lr=1e-3, max_steps=1, batch_size=8, progress=False).fit(data(8))
        assert called
    finally:
        tr.fast_dropout = tr_fast
    from promptdelta.errors import ConfigError

    with pytest.raises(ConfigError, match="fast_dropout"):
        Trainer(model, fast_dropout="yes")


def test_fast_dropout_false_puts_a_native_backbone_on_torch_dropout_while_it_trains(monkeypatch):
    """A native BERT runs the fused dropout by itself; train.fast_dropout false must give torch's dropout there
    too (a run recorded before the key existed resumes on torch's masks), and fit gives the fused one back."""
    from promptdelta.backbones import load_backbone
    from promptdelta.kernels import attention_cpu

    model = Clf()
    model.bert = load_backbone(model.bert)[0]
    fused = []
    real = attention_cpu.attention
    monkeypatch.setattr(attention_cpu, "attention", lambda *a, **k: fused.append(1) or real(*a, **k))
    monkeypatch.setattr(FastDropout, "forward", lambda self, x: fused.append(1) or dropout(x, self.p, self.training))
    Trainer(model, lr=1e-3, max_steps=2, batch_size=8, progress=False, fast_dropout=False).fit(data(16))
    assert not fused
    assert all(isinstance(layer.dropout, FastDropout) and not layer.attn.torch_dropout for layer in model.bert.layers)
    Trainer(model, lr=1e-3, max_steps=1, batch_size=8, progress=False).fit(data(8))
    assert fused


def test_same_seed_same_training_with_fast_dropout():
    def run():
        model = Clf()
        Trainer(model, lr=3e-3, max_steps=3, batch_size=8, progress=False, seed=4).fit(data(16))
        return model.head.weight.detach().clone()

    assert torch.equal(run(), run())


def test_gradient_checkpointing_recomputes_the_same_masks():
    """Activation checkpointing reruns the forward in backward; torch's checkpoint restores the RNG state, so
    the recomputed fused dropouts draw the same seeds and the gradients equal those without checkpointing."""
    ids, mask = batch()
    grads = []
    for ckpt in (False, True):
        model = tiny_bert().train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with speed.fast_dropout(model):
            torch.manual_seed(5)
            model(ids, attention_mask=mask).last_hidden_state.square().sum().backward()
        grads.append(model.encoder.layer[0].attention.self.query.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_training_with_fast_dropout():
    """precision='bf16' (CPU autocast) through the fused dropout and attention: finite, parameters move."""
    model = Clf()
    before = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    Trainer(model, lr=1e-3, max_steps=2, batch_size=8, progress=False, precision="bf16").fit(data(16))
    after = model.bert.encoder.layer[0].attention.self.query.weight.detach()
    assert torch.isfinite(after).all() and not torch.equal(before, after)
