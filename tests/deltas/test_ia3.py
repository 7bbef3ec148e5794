"""(IA)^3: the delta contract on every family, the layer's maths, merge, and the PEFT layer it mirrors."""

from __future__ import annotations

import pytest
import torch
from delta_helpers import FAMILIES, hf_bert, native_bert, perturb, snapshot, assert_same_state
from torch import nn

from promptdelta.deltas import IA3Linear, attach, deltas_of, load_delta
from promptdelta.errors import CheckpointError, ConfigError, DeltaError

# every family whose key/value/FFN-output layers are nn.Linear (transformers GPT-2 keeps Conv1D: refused below)
CELLS = [f for f in FAMILIES if f != "hf_gpt2"]


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 99, (3, 7), generator=torch.Generator().manual_seed(1))   # (B, T)


@pytest.mark.parametrize("fam_id", CELLS)
def test_contract_on_every_family(fam_id: str, ids: torch.Tensor, tmp_path) -> None:
    """ones-init = base output (bit for bit), only the vectors train, save/load, merge = unmerged, detach
    restores every tensor and flag."""
    fam = FAMILIES[fam_id]
    model = fam.build()
    snap, base = snapshot(model), fam.out(model, ids)
    handle = attach(model, "ia3")
    assert handle.num_parameters() > 0 and all(k.endswith(".ia3_l") for k in handle.state_dict())
    assert torch.equal(fam.out(model, ids), base)
    torch.testing.assert_close(fam.out(model, ids, grad=True).detach(), fam.out(fam.build(), ids, grad=True),
                               rtol=1e-5, atol=1e-5)   # (SDPA picks another CPU kernel when a vector needs grad)
    delta = {id(p) for p in handle.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == delta
    perturb(handle.parameters())
    fam.out(model, ids, grad=True).square().mean().backward()
    assert all(p.grad is None for p in model.parameters() if id(p) not in delta)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in handle.parameters())
    tuned = fam.out(model, ids)
    assert not torch.allclose(tuned, base)
    torch.testing.assert_close(fam.out(model, ids, grad=True).detach(), tuned, rtol=1e-5, atol=1e-5)  # fold = scale
    handle.save(tmp_path / "ia3")
    fresh = fam.build()
    assert load_delta(fresh, tmp_path / "ia3").targets == handle.targets
    assert torch.equal(fam.out(fresh, ids), tuned)
    handle.merge()
    assert not any(isinstance(m, IA3Linear) and not m.merged for m in model.modules())
    torch.testing.assert_close(fam.out(model, ids), tuned, rtol=1e-5, atol=1e-5)
    handle.unmerge()
    assert torch.equal(fam.out(model, ids), tuned)
    handle.merge()            # detach from the merged state still restores the exact pretrained weights
    handle.detach()
    assert deltas_of(model) == {}
    assert_same_state(model, snap)
    assert torch.equal(fam.out(model, ids), base)


def test_the_three_vectors_scale_keys_values_and_the_ffn_activation() -> None:
    """k = l_k (W_k x + b_k), v likewise, FFN: W_2 (l_ff act(W_1 x)) + b_2, on the native BERT layers."""
    model = native_bert()
    handle = attach(model, "ia3")
    kinds = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}
    assert not kinds["k_proj"].feedforward and not kinds["v_proj"].feedforward and kinds["fc2"].feedforward
    assert handle.num_parameters() == 2 * (32 + 32 + 37)   # 2 layers x (l_k, l_v: hidden; l_ff: d_ff)
    layer = kinds["k_proj"]
    perturb([layer.ia3_l])
    x = torch.randn(5, 32)
    with torch.enable_grad():
        want = (x @ layer.base.weight.T + layer.base.bias) * layer.ia3_l
        torch.testing.assert_close(layer(x), want)
    ff = kinds["fc2"]
    perturb([ff.ia3_l])
    h = torch.randn(4, 6, 37)
    want = (h * ff.ia3_l) @ ff.base.weight.T + ff.base.bias
    with torch.enable_grad():
        torch.testing.assert_close(ff(h), want)
    with torch.no_grad():   # inference folds the vector into the weight once rows outnumber its out/in size
        h2 = torch.randn(64, 37)
        torch.testing.assert_close(ff(h2), (h2 * ff.ia3_l) @ ff.base.weight.T + ff.base.bias, rtol=1e-5, atol=1e-5)
        x2 = torch.randn(64, 32)
        torch.testing.assert_close(layer(x2), (x2 @ layer.base.weight.T + layer.base.bias) * layer.ia3_l,
                                   rtol=1e-5, atol=1e-5)


def test_matches_peft_ia3_on_transformers_bert() -> None:
    """The same vectors in PEFT's IA3 (target key/value/FFN output dense, the latter a feedforward module) give
    the same outputs as ours."""
    peft = pytest.importorskip("peft")
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(2))
    ours, theirs = hf_bert().bert, hf_bert().bert
    handle = attach(ours, "ia3")
    perturb(handle.parameters())
    ff = r".*\.layer\.\d+\.output\.dense"
    pm = peft.get_peft_model(theirs, peft.IA3Config(target_modules=rf".*\.(key|value)|{ff}", feedforward_modules=ff))
    peft_vectors = {n.split("base_model.model.")[-1].replace(".ia3_l.default", ""): p
                    for n, p in pm.named_parameters() if "ia3_l" in n}
    ours_vectors = {k.removesuffix(".ia3_l"): p for k, p in handle.named_parameters()}
    assert set(peft_vectors) == set(ours_vectors)
    with torch.no_grad():
        for k, p in peft_vectors.items():
            p.copy_(ours_vectors[k].view_as(p))   # PEFT: (out, 1) / (1, in)
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).last_hidden_state, pm(input_ids=ids).last_hidden_state)


def test_refusals_are_one_line() -> None:
    with pytest.raises(DeltaError, match="nn.Linear layers only"):
        attach(FAMILIES["hf_gpt2"].build(), "ia3", targets=["c_attn"], feedforward=[])
    with pytest.raises(DeltaError, match="names none of the targets"):
        attach(hf_bert(), "ia3", targets=["key", "value"], feedforward=["query"])
    with pytest.raises(ConfigError, match="init"):
        attach(hf_bert(), "ia3", init="one")


def test_output_scaling_only_and_init() -> None:
    model = hf_bert()
    handle = attach(model, "ia3", targets=["key", "value"], feedforward=[], init=0.5)
    assert all(not m.feedforward for m in model.modules() if isinstance(m, IA3Linear))
    assert all(torch.equal(p, torch.full_like(p, 0.5)) for p in handle.parameters())
    assert isinstance(dict(model.named_modules())["bert.encoder.layer.0.attention.self.key"], nn.Module)


# ----------------------------------------------------------------------------------------- PEFT's IA3 folder
def _peft_ia3_bert(seed: int = 0):
    """PEFT's IA3 on the transformers BertForMaskedLM (key/value outputs, FFN output dense input), perturbed."""
    peft = pytest.importorskip("peft")
    ff = r".*\.layer\.\d+\.output\.dense"
    pm = peft.get_peft_model(hf_bert(seed), peft.IA3Config(target_modules=rf".*\.(key|value)|{ff}",
                                                           feedforward_modules=ff))
    perturb([p for n, p in pm.named_parameters() if "ia3_l" in n])
    return pm.eval()


@pytest.mark.parametrize("native", [False, True])
def test_peft_ia3_folder_both_ways(native: bool, tmp_path) -> None:
    """PEFT's own IA3 folder loads onto the transformers and the native BERT with PEFT's logits; ours saved
    with format='peft' loads back into PEFT with the same logits."""
    peft = pytest.importorskip("peft")
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(3))
    pm = _peft_ia3_bert()
    pm.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    ours = native_bert() if native else hf_bert()
    handle = load_delta(ours, tmp_path / "theirs")
    assert handle.method == "ia3" and handle.num_parameters() == 2 * (32 + 32 + 37)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    handle.save(tmp_path / "ours", format="peft")
    back = peft.PeftModel.from_pretrained(hf_bert(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_peft_ia3_refusals(tmp_path) -> None:
    pytest.importorskip("peft")
    _peft_ia3_bert().save_pretrained(tmp_path / "theirs")
    with pytest.raises(CheckpointError, match="names no linear layer"):
        load_delta(FAMILIES["llama"].build(), tmp_path / "theirs")
    with pytest.raises(DeltaError, match="fuses q|k|v"):
        attach(FAMILIES["gpt2"].build(), "ia3").save(tmp_path / "gpt2", format="peft")
    assert not (tmp_path / "gpt2").exists()


def test_disabled_and_merge_and_unload(ids: torch.Tensor) -> None:
    """disabled() gives the base model; merge_and_unload folds the vectors in and leaves plain nn.Linear layers."""
    from promptdelta.deltas import merge_and_unload

    fam = FAMILIES["bert"]
    model = fam.build()
    base = fam.out(model, ids)
    handle = attach(model, "ia3")
    perturb(handle.parameters())
    tuned = fam.out(model, ids)
    with handle.disabled():
        assert torch.equal(fam.out(model, ids), base)
    assert torch.equal(fam.out(model, ids), tuned)
    merge_and_unload(model)
    assert deltas_of(model) == {} and not any(isinstance(m, IA3Linear) for m in model.modules())
    torch.testing.assert_close(fam.out(model, ids), tuned, rtol=1e-5, atol=1e-5)
