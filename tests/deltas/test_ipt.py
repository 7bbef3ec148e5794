"""IPT: only the d-dim vector trains; tuning through the model reproduces a prompt inside the subspace;
PCA / auto-encoder subspaces reconstruct the task prompts; save/load round trip; named errors."""

import pytest
import torch
from delta_helpers import native_bert

import promptdelta as pd
from promptdelta.deltas.ipt import (IntrinsicSubspace, fit_subspace, prompt_layout, prompt_vector)
from promptdelta.errors import CheckpointError, ConfigError, DeltaError

P = 3   # prefix tokens


def _task_prompts(model, n=4, d=2, seed=0):
    """n prompts p_i = m + B c_i in a d-dim affine subspace (B, m random), laid out like the model's prefixes."""
    g = torch.Generator().manual_seed(seed)
    D = sum(2 * l * h * t * hd for _, l, h, t, hd in prompt_layout(model, P))
    m, B = torch.randn(D, generator=g), torch.randn(D, d, generator=g) / 2
    return m, B, m + torch.randn(n, d, generator=g) @ B.T


def _subspace(model, tmp_path, d=2):
    _, B, prompts = _task_prompts(model, d=d)
    sub, z = fit_subspace(prompts, prompt_layout(model, P), dim=d)
    return sub.save(tmp_path / "subspace"), sub, B


def test_pca_and_autoencoder_reconstruct_task_prompts():
    model = native_bert()
    _, _, prompts = _task_prompts(model, n=5)
    sub, z = fit_subspace(prompts, prompt_layout(model, P), dim=2)
    assert z.shape == (5, 2)
    torch.testing.assert_close(sub.decode(z), prompts, atol=1e-4, rtol=1e-4)     # exact: they span 2 dims
    ae, z_ae = fit_subspace(prompts, prompt_layout(model, P), dim=2, method="autoencoder", steps=150, lr=2e-2)
    err = (ae.decode(z_ae) - prompts).pow(2).mean() / prompts.var()
    assert err < 0.05                                                           # IPT's reconstruction objective


def test_tuning_touches_only_z_and_reproduces_a_prompt_in_the_subspace(tmp_path):
    model = native_bert()
    folder, sub, _ = _subspace(model, tmp_path)
    target_z = torch.tensor([1.5, -1.0])
    target = sub.decode(target_z)                                                 # a prompt inside the subspace
    ids = torch.randint(1, 99, (4, 9), generator=torch.Generator().manual_seed(2))
    teacher = pd.attach(model, "prefix", num_tokens=P, reparam=False)            # the target prompt, plainly
    shapes = {k: v.shape for k, v in teacher.state_dict().items()}
    n = shapes["prefix.layers.keys"].numel()
    teacher.load_state_dict({"prefix.layers.keys": target[:n].view(shapes["prefix.layers.keys"]),
                             "prefix.layers.values": target[n:].view(shapes["prefix.layers.values"])})
    torch.testing.assert_close(prompt_vector(teacher), target)
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    teacher.detach()

    base = {k: v.clone() for k, v in model.state_dict().items()}
    handle = pd.attach(model, "ipt", subspace=str(folder))
    assert [(k, tuple(p.shape)) for k, p in handle.named_parameters()] == [("ipt.z", (2,))]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"prefix_ipt.z"]
    opt = torch.optim.Adam(handle.parameters(), lr=0.05)
    for _ in range(300):
        loss = (model(input_ids=ids).last_hidden_state - want).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = handle.state_dict()["ipt.z"]
    torch.testing.assert_close(z, target_z, atol=2e-2, rtol=0)                  # z found the target prompt
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())               # nothing else moved

    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
    handle.save(tmp_path / "delta")
    handle.detach()
    assert not hasattr(model, "prefix_ipt")
    loaded = pd.load_delta(model, tmp_path / "delta")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, got)
    loaded.detach()


def test_named_errors(tmp_path):
    model = native_bert()
    folder, sub, _ = _subspace(model, tmp_path)
    with pytest.raises(ConfigError, match="subspace="):
        pd.attach(model, "ipt")
    with pytest.raises(ConfigError, match="d numbers"):
        pd.attach(model, "ipt", subspace=str(folder), init=[1.0, 2.0, 3.0])
    other = native_bert(hidden=48)
    with pytest.raises(DeltaError, match="layout"):
        pd.attach(other, "ipt", subspace=str(folder))
    h = pd.attach(model, "ipt", subspace=str(folder))
    h.save(tmp_path / "delta")
    h.detach()
    IntrinsicSubspace(sub.w2 * 2, sub.b2, sub.layout).save(folder, overwrite=True)   # the subspace changes
    with pytest.raises(CheckpointError, match="changed"):
        pd.load_delta(model, tmp_path / "delta")
    with pytest.raises(DeltaError, match="'prefix' delta"):
        prompt_vector(pd.attach(model, "ipt", subspace=str(folder), name="again"))


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5", "t5v11"])
def test_task_prompt_in_the_subspace_gives_the_prefix_deltas_outputs(family, ids, tmp_path):
    """On every native family: three trained-looking prefix prompts span the subspace, and "ipt" at a task's z
    gives exactly the outputs of that task's own prefix delta (T5: encoder, decoder and cross prefixes)."""
    from delta_helpers import FAMILIES

    fam = FAMILIES[family]
    model = fam.build()
    prompts, outs = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        h = pd.attach(model, "prefix", num_tokens=2, reparam=False)
        prompts.append(prompt_vector(h))
        outs.append(fam.out(model, ids))
        h.detach()
    sub, z = fit_subspace(torch.stack(prompts), prompt_layout(model, 2), dim=2)
    handle = pd.attach(model, "ipt", subspace=str(sub.save(tmp_path / "s")), init=z[1].tolist())
    torch.testing.assert_close(fam.out(model, ids), outs[1], atol=1e-4, rtol=1e-4)
    handle.detach()
