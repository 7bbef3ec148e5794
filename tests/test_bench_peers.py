"""``promptdelta bench peers``: the rows are the same method in both libraries, and the tiny run prints the table."""

from __future__ import annotations

import pytest
import torch

from promptdelta.bench import peers
from promptdelta.errors import ConfigError

pytest.importorskip("peft")


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0   # one padded row: pooling and the attention mask matter
    return ids, mask


@pytest.mark.parametrize("method", peers.METHODS)
def test_rows_train_the_same_parameters(method: str) -> None:
    """Every impl of a method trains the same number of parameters (the same targets in both libraries)."""
    counts = {}
    for impl in peers.IMPLS:
        model = peers.build_row(method, impl, tiny=True)
        counts[impl] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert len(set(counts.values())) == 1, counts


@pytest.mark.parametrize("method", ["lora_qv", "lora_all", "bitfit", "ia3"])
def test_rows_start_at_the_base_model(method: str) -> None:
    """Zero-init LoRA B and untouched biases: every impl gives the frozen model's logits (same head seed)."""
    ids, mask = _batch()
    base = peers.build_row("floor", "hf", tiny=True).eval()
    with torch.no_grad():
        want = base(ids, mask)
        for impl in peers.IMPLS:
            got = peers.build_row(method, impl, tiny=True).eval()(ids, mask)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{method}/{impl}")


def test_prefix_rows_on_transformers_and_native_agree() -> None:
    """pd-hf (the transformers BertModel's cache) and pd-native (prefix_kv) are one method: the same prefixes
    give the same logits."""
    ids, mask = _batch()
    hf, native = peers.build_row("prefix", "pd-hf", tiny=True).eval(), peers.build_row("prefix", "pd-native", tiny=True)
    trained = {n: p for n, p in hf.named_parameters() if p.requires_grad}   # the prefixes (randn) and the head
    with torch.no_grad():
        for n, p in native.named_parameters():
            if p.requires_grad:
                p.copy_(trained.pop(n))
        assert trained == {}
        torch.testing.assert_close(hf(ids, mask), native.eval()(ids, mask), atol=1e-5, rtol=1e-5)


def test_floor_trains_one_vector_only() -> None:
    model = peers.build_row("floor", "native", tiny=True)
    body = [n for n, p in model.body.named_parameters() if p.requires_grad]
    assert len(body) == 1 and "embeddings" in body[0]


def test_bad_arguments_raise_one_line() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        peers.run_peers_bench(methods="lora_qv,ia4", tiny=True, seq=8)
    with pytest.raises(ConfigError, match="--seq"):
        peers.run_peers_bench(methods="bitfit", tiny=True, seq=60)
    with pytest.raises(ConfigError, match="rounds"):
        peers.run_peers_bench(methods="bitfit", tiny=True, rounds=0)


@pytest.mark.slow
def test_tiny_run_prints_the_table(monkeypatch, capsys) -> None:
    """One round on the tiny BERT, one worker process per row; PEFT's own ratio is 1.00."""
    assert peers.main(["--tiny", "--rounds", "1", "--methods", "lora_qv", "--batch", "2", "--seq", "8",
                       "--threads", "1"]) == 0
    out = capsys.readouterr().out
    lines = {tuple(line.split()[:2]): line for line in out.splitlines() if len(line.split()) > 3}
    assert {("full", "hf"), ("floor", "hf"), ("floor", "native"), ("lora_qv", "peft"), ("lora_qv", "pd-hf"),
            ("lora_qv", "pd-native")} <= set(lines)
    assert lines[("lora_qv", "peft")].split()[4] == "1.00"
    assert "peft 0." in out.splitlines()[0]
    monkeypatch.setattr(peers, "_has_peft", lambda: False)
    table = peers.run_peers_bench(methods="bitfit", tiny=True, batch=2, seq=8, rounds=1, threads=1)
    assert "bitfit    peft       not installed" in table


@pytest.mark.parametrize("method", ["bitfit", "lora_qv", "ia3"])
def test_pd_hf_step_does_no_more_work_than_peft(method: str) -> None:
    """Op counts of one training step on the tiny BERT: promptdelta on the transformers model runs no op more
    often than PEFT does (BitFit: exactly plain torch's ops; LoRA: the fused layer replaces PEFT's linears; IA3:
    fewer element-wise ops than PEFT's). Both on torch's dropout: the fused dropout is other ops by design."""
    peft_ops = peers.step_ops(method, "peft", tiny=True, batch=2, seq=8)
    ours = peers.step_ops(method, "pd-hf", tiny=True, batch=2, seq=8, torch_dropout=True)
    def calls(ops: dict, *names: str) -> int:
        return sum(ops.get(n, (0, 0.0))[0] for n in names)

    gemms = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")   # the fused layer's GEMMs are addmm_
    assert calls(ours, *gemms) <= calls(peft_ops, *gemms)
    for op in ("aten::copy_", "aten::cat", "aten::add", "aten::mul", "aten::sum", "aten::clone", "aten::bernoulli_"):
        assert calls(ours, op) <= calls(peft_ops, op), op
    if method == "bitfit":
        assert {k: c for k, (c, _) in ours.items()} == {k: c for k, (c, _) in peft_ops.items()}


def test_profile_prints_the_op_diff() -> None:
    out = peers.profile_method("prompt", tiny=True, batch=2, seq=8, threads=1)
    assert "prompt/peft" in out and "prompt/pd-native" in out and "total self CPU" in out
    with pytest.raises(ConfigError, match="not a method"):
        peers.profile_method("ia4", tiny=True)


def test_methods_run_in_groups_that_fit_the_workers() -> None:
    """3 references + 3 rows per method must fit max_workers; the MiniLM default reads the available memory."""
    assert peers._group_size(6, tiny=False) == 1 and peers._group_size(12, tiny=False) == 3
    assert peers._group_size(None, tiny=True) == len(peers.METHODS)
    with pytest.raises(ConfigError, match="--max-workers 6"):
        peers.run_peers_bench(methods="bitfit", tiny=True, seq=8, max_workers=5)
