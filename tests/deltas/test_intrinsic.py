"""Intrinsic subspace (SAID): the Fastfood transform against dense references, what trains, merge = theta0 +
lambda P d, save/load of d only, learning a tiny task, and bad inputs. The invariants (fresh delta, detach,
merge, checkpoints, disabled) on every family are in test_families.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from delta_helpers import FAMILIES, native_bert, perturb
from safetensors.torch import load_file

from promptdelta.deltas import Fastfood, attach, fwht, load_delta
from promptdelta.errors import ConfigError, DeltaError

NAMES = ["hf_bert", "bert", "gpt2"]


@pytest.fixture(params=NAMES)
def name(request):
    return request.param


def build(name: str, seed: int = 0, **kw):
    return FAMILIES[name].build(seed, **kw)


def attach_i(name: str, model, **cfg):
    return attach(model, "intrinsic", dim=cfg.pop("dim", 16), **cfg)


def out(model, ids):
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return model(input_ids=ids, attention_mask=mask).logits   # (B, T, V)


def trained(name, seed=0, **cfg):
    model = build(name, seed)
    handle = attach_i(name, model, **cfg)
    perturb(handle.parameters(), scale=0.5)
    return model, handle


# ----------------------------------------------------------------------------------------- Fastfood
def hadamard(n: int) -> torch.Tensor:
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_fwht_matches_the_dense_hadamard_matrix(n):
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ hadamard(n).double())


def reference(f: Fastfood) -> torch.Tensor:
    """The dense (D, d) matrix from the factors: blocks (1/norm) H G Pi H B, stacked, rows cut to D, scaled."""
    n, blocks = f.n, []
    H = hadamard(n)
    for b in range(f.k):
        Pi = torch.zeros(n, n)
        Pi[torch.arange(n), f.perm[b]] = 1.0                 # (Pi v)_i = v_perm[i]
        V = H @ torch.diag(f.gauss[b]) @ Pi @ H @ torch.diag(f.signs[b])
        blocks.append(V * f.scale[b])
    return torch.cat(blocks)[: f.D, : f.d]


@pytest.mark.parametrize("d,D,block", [(5, 37, 2 ** 22), (5, 37, 8), (3, 3, 4), (6, 4, 2)])
def test_fastfood_matches_its_dense_reference(d, D, block):
    f = Fastfood(d, D, seed=7, block_size=block)
    dense = torch.stack([f(e) for e in torch.eye(d)], dim=1)  # transform applied to identity columns
    assert dense.shape == (D, d) and f.k == math.ceil(D / f.n) and f.n >= d
    torch.testing.assert_close(dense, reference(f), atol=1e-5, rtol=1e-5)
    v = torch.randn(d)
    torch.testing.assert_close(f(v), dense @ v, atol=1e-5, rtol=1e-5)


def test_fastfood_columns_have_unit_norm_and_memory_is_linear_in_D():
    d, D = 64, 100_000
    f = Fastfood(d, D, seed=0, block_size=2 ** 14)
    assert f.k == math.ceil(D / 2 ** 14)
    cols = torch.stack([f(e) for e in torch.eye(d)[:8]], dim=1)   # (D, 8)
    torch.testing.assert_close(cols.norm(dim=0), torch.ones(8), atol=0.05, rtol=0)
    assert abs(cols[:, 0] @ cols[:, 1]) < 0.05                     # near-orthogonal, as a random projection
    stored = sum(b.numel() for b in f.buffers())
    assert stored <= 3 * (D + f.n) + f.k                            # O(D), not O(d * D)


def test_fastfood_is_regenerated_from_its_seed():
    v = torch.randn(10)
    assert torch.equal(Fastfood(10, 300, seed=3)(v), Fastfood(10, 300, seed=3)(v))
    assert not torch.allclose(Fastfood(10, 300, seed=3)(v), Fastfood(10, 300, seed=4)(v))


def test_gradients_reach_only_d_and_the_said_scalars(name, ids):
    model = build(name)
    handle = attach_i(name, model)
    keys = [k for k, _ in handle.named_parameters()]
    assert keys[0] == "intrinsic.d" and all(".said_" in k for k in keys[1:]) and len(keys) > 1
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in handle.parameters()}
    out(model, ids).square().mean().backward()
    d = dict(handle.named_parameters())["intrinsic.d"]
    assert d.grad is not None and d.grad.abs().sum() > 0     # at d = 0 only d has a non-zero gradient
    own = {id(p) for p in handle.parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in own)
    perturb(handle.parameters())
    handle.model.zero_grad()
    out(model, ids).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in handle.parameters())


@pytest.mark.parametrize("fam", ["t5v11", "hf_t5"])
def test_default_targets_cover_every_projection_including_the_t5_v11_gate(fam):
    h = attach(FAMILIES[fam].build(), "intrinsic", dim=8)
    n_enc, n_dec = (2, 3) if fam == "t5v11" else (2, 2)
    per_layer = 4 + 3                             # q, k, v, o + gate, fc1, fc2 (HF: wi_0, wi_1, wo)
    assert len(h.targets) == per_layer * n_enc + (per_layer + 4) * n_dec   # + cross-attention q, k, v, o
    assert any(t.endswith(("mlp.gate", "DenseReluDense.wi_0")) for t in h.targets)


def test_said_false_trains_d_only(ids):
    model = native_bert()
    handle = attach(model, "intrinsic", dim=8, said=False, include_bias=False)
    assert [k for k, _ in handle.named_parameters()] == ["intrinsic.d"]
    assert all(w.names == ["weight"] for _, w in handle._method.sites)


def test_merge_writes_theta0_plus_lambda_P_d(ids):
    model = native_bert()
    w0 = model.layers[0].attn.q_proj.weight.detach().clone()
    handle = attach(model, "intrinsic", dim=8, targets=["layers.0.attn.q_proj"])
    perturb(handle.parameters())
    wrapper = handle._method.sites[0][1]
    d, lam = dict(handle.named_parameters())["intrinsic.d"], wrapper.said["weight"]
    expected = w0 + lam * (wrapper.proj["weight"](d)).view_as(w0)
    handle.merge()
    torch.testing.assert_close(model.layers[0].attn.q_proj.base.weight, expected.detach(), atol=1e-6, rtol=0)


def test_save_load_holds_only_d_scalars_and_the_seed(name, ids, tmp_path):
    model, handle = trained(name)
    expected = out(model, ids)
    handle.save(tmp_path / "d")
    tensors = load_file(tmp_path / "d" / "delta.safetensors")
    from promptdelta.deltas.base import canonical_namer

    namer = canonical_namer(model)          # files hold canonical (native) names, on transformers models too
    assert set(tensors) == {namer(k) for k in handle.state_dict()}
    assert tensors["intrinsic.d"].shape == (16,) and all(t.dim() == 0 for k, t in tensors.items() if "said" in k)
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert meta["config"]["seed"] == 0 and meta["config"]["dim"] == 16
    fresh = build(name)
    load_delta(fresh, tmp_path / "d")
    assert torch.equal(out(fresh, ids), expected)


def test_another_seed_gives_another_subspace(ids):
    a, b = native_bert(), native_bert()
    ha = attach(a, "intrinsic", dim=8, seed=1)
    hb = attach(b, "intrinsic", dim=8, seed=2)
    perturb(ha.parameters())
    perturb(hb.parameters())
    assert not torch.allclose(out(a, ids), out(b, ids))


def test_a_small_subspace_learns_a_tiny_task():
    model = native_bert()
    handle = attach(model, "intrinsic", dim=32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (8, 6), generator=g)
    labels = torch.tensor([0, 1] * 4)
    readout = torch.randn(32, 2, generator=g)                     # fixed random classifier on h[:, 0]
    opt = torch.optim.Adam(handle.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        logits = model(input_ids=ids).last_hidden_state[:, 0] @ readout   # (B, 2)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


# ----------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("bad", [dict(dim=0), dict(dim=2.0), dict(seed=-1), dict(said="yes"), dict(include_bias=1),
                                 dict(block_size=1000), dict(block_size=1)])
def test_bad_config_values_name_the_fix(bad):
    with pytest.raises(ConfigError) as err:
        attach(native_bert(), "intrinsic", **bad)
    key = next(iter(bad))
    assert key in str(err.value) and ("use e.g." in str(err.value) or "True or False" in str(err.value))


def test_targets_without_own_parameters_are_refused():
    with pytest.raises(DeltaError, match="target layers such as"):
        attach(native_bert(), "intrinsic", targets=["attn"])


def test_tied_parameters_are_refused():
    model = native_bert()    # the MLM decoder weight is the word embedding matrix
    with pytest.raises(DeltaError, match="tied") as err:
        attach(model, "intrinsic", targets=["word_embeddings", "lm_head.decoder"])
    assert "leave one of the tied modules out" in str(err.value)


def test_fwht_refuses_other_lengths():
    with pytest.raises(DeltaError, match="zero-pad"):
        fwht(torch.ones(6))


def test_same_module_cannot_take_lora_and_intrinsic():
    model = native_bert()
    attach(model, "lora", targets=["q_proj"])
    with pytest.raises(DeltaError, match="already wrapped"):
        attach(model, "intrinsic", targets=["q_proj"])


def test_inference_reuses_theta_until_a_step_changes_d():
    """Without autograd theta0 + P d is computed once; an optimizer step (d's version) invalidates it."""
    import promptdelta as pd
    from promptdelta.deltas.intrinsic import IntrinsicWrapper

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    handle = pd.attach(net, "intrinsic", targets=["0", "2"], dim=4)
    x = torch.randn(3, 8)
    wrappers = [m for m in net.modules() if isinstance(m, IntrinsicWrapper)]
    calls = []
    for w in wrappers:
        w.delta = (lambda f: (lambda n: calls.append(n) or f(n)))(w.delta)
    with torch.no_grad():
        a = net(x)
        n_first = len(calls)
        b = net(x)
    assert n_first > 0 and len(calls) == n_first and torch.equal(a, b)       # second call: cache hit
    d = next(p for n, p in handle.named_parameters() if n.endswith("d") or p.numel() == 4)
    with torch.no_grad():
        d.add_(0.5)                                                           # what an optimizer step does
        c = net(x)
    assert len(calls) == 2 * n_first and not torch.allclose(a, c)
    y = net(x)                                                                # with autograd: recomputed
    torch.testing.assert_close(y, c)
