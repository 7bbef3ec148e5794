"""Native BERT/RoBERTa run per-token work on the real tokens only (padding packed away): outputs and gradients
at real positions equal transformers', padded positions come out as zeros, and layers holding modules that
are not token-wise (hooks, routed linears) keep the (B, T, H) path."""

import pytest
import torch
import transformers

from promptdelta.backbones import load_backbone
from promptdelta.backbones.bert import Packing, _packable
from promptdelta.deltas import attach

ATOL = 1e-5
LORA_ATOL = 1e-4   # as test_bert_fused_qkv's FUSED_ATOL: LoRA layers may sum in another order than transformers'


def pair(family):
    kw = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=66, initializer_range=0.3)
    torch.manual_seed(0)
    if family == "bert":
        hf = transformers.BertModel(transformers.BertConfig(**kw), add_pooling_layer=False)
    else:
        hf = transformers.RobertaModel(transformers.RobertaConfig(**kw, pad_token_id=1), add_pooling_layer=False)
    hf = hf.eval()
    return hf, load_backbone(hf)[0].eval()


def batch(pad, left=False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 99, (4, 10), generator=g)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 7:], mask[2, 3:], mask[3, 1:] = 0, 0, 0
    if left:
        mask = mask.flip(1)
    return ids.masked_fill(mask == 0, pad), mask


@pytest.mark.parametrize("family,left", [("bert", False), ("roberta", False), ("bert", True)])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lora_outputs_and_grads_match_transformers(family, left, targets):
    hf, ours = pair(family)
    for m in (hf, ours):
        torch.manual_seed(3)
        attach(m, "lora", r=4, targets=targets)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora" in n:
                    p.normal_(0, 0.2)
    ids, mask = batch(ours.config.pad_token_id, left)
    keep = mask.bool()
    g = torch.randn(4, 10, 32, generator=torch.Generator().manual_seed(2)) * keep[..., None]  # real positions
    outs = {}
    for name, m in (("hf", hf), ("ours", ours)):
        y = m(input_ids=ids, attention_mask=mask).last_hidden_state
        y.backward(g)
        trained = [p for p in m.parameters() if p.requires_grad]   # same module order in both models
        outs[name] = (y.detach(), [p.detach() for p in trained], [p.grad for p in trained])
    # LoRA on both sides: the packed native layer and transformers' per-layer one can take different GEMMs
    # (the native one of csrc/lora_gemm.h, MKL's) with their own summation orders: LORA_ATOL
    assert (outs["ours"][0] - outs["hf"][0])[keep].abs().max() <= LORA_ATOL
    assert outs["ours"][0][~keep].abs().max() == 0          # the packed path ran: nothing computed at padding
    assert len(outs["ours"][1]) == len(outs["hf"][1]) > 0
    for a, b, ga, gb in zip(outs["ours"][1], outs["hf"][1], outs["ours"][2], outs["hf"][2]):
        assert torch.equal(a, b)                            # the same LoRA weights on both sides
        torch.testing.assert_close(ga, gb, atol=1e-4 * gb.abs().max().item(), rtol=0)


def test_hooked_or_unknown_modules_keep_the_padded_path():
    _, ours = pair("bert")
    ids, mask = batch(0)
    with torch.no_grad():
        packed = ours(ids, attention_mask=mask).last_hidden_state
    assert all(_packable(layer) for layer in ours.layers)
    seen = []
    hook = ours.layers[1].mlp.fc1.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    assert not _packable(ours.layers[1]) and _packable(ours.layers[0])
    with torch.no_grad():
        hooked = ours(ids, attention_mask=mask).last_hidden_state
    hook.remove()
    assert seen == [(4, 10, 32)]                              # the hook saw the (B, T, H) it expects
    keep = mask.bool()
    assert (hooked - packed)[keep].abs().max() <= ATOL
    assert hooked[~keep].abs().max() == 0                     # padded outputs are zeros on either path
    ours.layers[0].attn.extra = torch.nn.GELU()               # not a known token-wise module
    assert not _packable(ours.layers[0])


def test_packing_index_and_unpack():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    p = Packing.of(mask)
    assert p.index.tolist() == [0, 1, 4, 5] and p.row.tolist() == [0, 0, 1, 1] and p.col.tolist() == [0, 1, 1, 2]
    x = torch.arange(8.0).view(4, 2)
    assert p.unpack(x).view(2, 3, 2)[mask.bool()].tolist() == x.tolist()
    assert Packing.of(torch.ones(2, 3)) is None and Packing.of(None) is None
