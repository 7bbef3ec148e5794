"""Activation checkpointing in every native family: same loss and gradients as without it (dropout on), the
layers really are recomputed in backward, and it stays out of the way of evaluation, no_grad and the KV cache."""

import pytest
import torch

from promptdelta.backbones.bert import BertConfig, BertModel
from promptdelta.backbones.gpt import GPT2Config, GPT2Model
from promptdelta.backbones.roberta import RobertaConfig, RobertaModel
from promptdelta.backbones.t5 import T5Config, T5Model

ATOL = 1e-6   # the recomputation runs the same kernels on the same inputs: only summation order may differ
B, T, V = 3, 7, 99


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    enc = dict(vocab_size=V, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=37, has_lm_head=True)
    if family == "bert":
        return BertModel(BertConfig(**enc, max_position_embeddings=64))
    if family == "roberta":
        return RobertaModel(RobertaConfig(**enc, max_position_embeddings=66))
    if family == "gpt2":
        return GPT2Model(GPT2Config(vocab_size=V, n_positions=64, hidden_size=32, num_layers=3, num_heads=4,
                                    eos_token_id=2))
    return T5Model(T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=3,
                            num_heads=4, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8))


FAMILIES = ["bert", "roberta", "gpt2", "t5"]


def make_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -2:] = 0                                           # right padding in one row
    return ids, mask, torch.randint(0, V, (B, T), generator=g)


def prefixes(model, family: str, P: int = 2):
    """Trainable per-layer prefix keys/values in the family's layout."""
    g = torch.Generator().manual_seed(2)

    def pairs(n: int, heads: int, dim: int):
        return [tuple(torch.randn(1, heads, P, dim, generator=g).requires_grad_() for _ in range(2))
                for _ in range(n)]

    if family == "t5":
        c = model.config
        return {"encoder": pairs(c.num_layers, c.num_heads, c.d_kv),
                "decoder": pairs(c.num_decoder_layers, c.num_heads, c.d_kv),
                "cross": pairs(c.num_decoder_layers, c.num_heads, c.d_kv)}
    return pairs(len(model.layers), model.config.num_heads, model.config.head_dim)


def leaves(prefix_kv):
    if prefix_kv is None:
        return []
    parts = prefix_kv.values() if isinstance(prefix_kv, dict) else [prefix_kv]
    return [t for part in parts for pair in part for t in pair]


def loss_of(model, family: str, prefix_kv=None) -> torch.Tensor:
    ids, mask, labels = make_batch()
    if family == "t5":
        return model(input_ids=ids, attention_mask=mask, labels=labels, prefix_kv=prefix_kv).loss
    logits = model(input_ids=ids, attention_mask=mask, prefix_kv=prefix_kv).logits          # (B, T, V)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, V)[mask.reshape(-1).bool()],
                                             labels.reshape(-1)[mask.reshape(-1).bool()])


def first_layers(model, family: str) -> list[torch.nn.Module]:
    return [model.encoder.layers[0], model.decoder.layers[0]] if family == "t5" else [model.layers[0]]


def count_calls(model, family: str) -> list[int]:
    calls = [0]
    for layer in first_layers(model, family):
        layer.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))  # the recomputation stops
        # early (once it has every saved tensor), so a post-forward hook would not see it
    return calls


def loss_and_grads(family: str, checkpointing: bool, with_prefix: bool = False):
    model = build(family).train()                              # dropout 0.1 everywhere: masks must match
    if checkpointing:
        model.gradient_checkpointing_enable()
    calls = count_calls(model, family)
    prefix_kv = prefixes(model, family) if with_prefix else None
    torch.manual_seed(3)
    loss = loss_of(model, family, prefix_kv)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"prefix.{i}": t.grad for i, t in enumerate(leaves(prefix_kv))})
    return loss.detach(), grads, calls[0]


@pytest.mark.parametrize("with_prefix", [False, True], ids=["plain", "prefix_kv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_gives_the_same_loss_and_gradients(family, with_prefix):
    loss, grads, calls = loss_and_grads(family, checkpointing=False, with_prefix=with_prefix)
    loss_ck, grads_ck, calls_ck = loss_and_grads(family, checkpointing=True, with_prefix=with_prefix)
    stacks = 2 if family == "t5" else 1
    assert calls == stacks and calls_ck == 2 * stacks           # recomputed once in backward
    torch.testing.assert_close(loss_ck, loss, atol=ATOL, rtol=0)
    assert set(grads_ck) == set(grads) and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(grads_ck[name], g, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_no_checkpointing_in_eval_or_without_grad(family):
    model = build(family)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    calls = count_calls(model, family)
    stacks = 2 if family == "t5" else 1
    with torch.no_grad():
        model.train()
        loss_of(model, family)
    model.eval()
    loss_of(model, family).backward()                           # eval mode: no dropout, no recomputation
    assert calls[0] == 2 * stacks
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_kv_cache_paths_skip_checkpointing_and_still_work(family):
    ids, mask, _ = make_batch()
    ref, model = build(family), build(family)
    model.gradient_checkpointing_enable()
    decoder = model.layers if family == "gpt2" else model.decoder.layers
    calls = [0]
    decoder[0].register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    kw = dict(input_ids=ids, attention_mask=mask) if family == "gpt2" else \
        dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4])
    model.train(), ref.train()
    torch.manual_seed(4)
    out = model(**kw, use_cache=True)
    torch.manual_seed(4)
    expected = ref(**kw, use_cache=True)
    torch.testing.assert_close(out.logits, expected.logits, atol=ATOL, rtol=0)
    assert len(out.past_key_values) == 3 and all(kv is not None for kv in out.past_key_values)
    out.logits.float().square().mean().backward()               # grads flow through the cached path
    assert calls[0] == 1                                         # decoder run once: no recomputation with a cache
    model.eval(), ref.eval()                                     # cached generation, checkpointing still on
    torch.testing.assert_close(model.generate(ids, attention_mask=mask, max_new_tokens=3),
                               ref.generate(ids, attention_mask=mask, max_new_tokens=3))


def test_training_forward_without_cache_returns_no_cache():
    """With use_cache=False the per-layer keys/values are dropped (they would hold every layer's k, v)."""
    model = build("gpt2").train()
    model.gradient_checkpointing_enable()
    ids, mask, _ = make_batch()
    assert model(input_ids=ids, attention_mask=mask).past_key_values is None
