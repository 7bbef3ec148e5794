"""Shared token selection: filters on hand-made logits, parity with transformers' warpers, the loop."""

import math

import pytest
import torch

from promptdelta.backbones.generation import (GenerationConfig, decode_loop, mark_finished, process_logits,
                                              select_next_token, top_k_filter, top_p_filter)
from promptdelta.errors import ConfigError

NEG = float("-inf")


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 5.0], [4.0, 0.0, -1.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert torch.equal(out, torch.tensor([[NEG, 3.0, NEG, 5.0], [4.0, NEG, NEG, 2.0]]))


def test_top_k_keeps_ties_and_is_off_at_zero_or_full_vocab():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert torch.equal(top_k_filter(logits, 1), torch.tensor([[NEG, 2.0, 2.0, NEG]]))
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 4), logits)


def _logits_of(probs):
    return torch.tensor([probs]).log()


def test_top_p_keeps_smallest_set_reaching_p():
    logits = _logits_of([0.05, 0.5, 0.15, 0.3])  # ranked: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.7) == [False, True, False, True]
    assert kept(0.4) == [False, True, False, False]      # the top token alone already holds >= p
    assert kept(0.85) == [False, True, True, True]
    assert kept(0.01) == [False, True, False, False]     # the most likely token always stays
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    for k in (1, 5, 17):
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits.clone()))
    for p in (0.1, 0.5, 0.9, 0.99):
        assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits.clone()))
    hf = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.7)(None, logits.clone())))
    torch.testing.assert_close(process_logits(logits, temperature=0.7, top_k=10, top_p=0.8), hf)


def test_temperature_is_applied_before_top_p():
    logits = _logits_of([0.6, 0.4])
    assert torch.isfinite(process_logits(logits, temperature=1.0, top_p=0.9)).sum() == 2
    assert torch.isfinite(process_logits(logits, temperature=0.1, top_p=0.9)).sum() == 1  # sharpened first


def test_greedy_is_argmax_and_sampling_is_seeded():
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    assert torch.equal(select_next_token(logits, GenerationConfig()), logits.argmax(-1))
    cfg = GenerationConfig(do_sample=True, temperature=1.5)
    draws = [select_next_token(logits, cfg, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    many = torch.stack([select_next_token(logits, cfg, torch.Generator().manual_seed(s)) for s in range(20)])
    assert len(set(many[:, 0].tolist())) > 1  # really sampling, not argmax


def test_sampling_stays_inside_the_filtered_set():
    torch.manual_seed(2)
    logits = torch.randn(3, 40)
    g = torch.Generator().manual_seed(0)
    top1 = select_next_token(logits, GenerationConfig(do_sample=True, top_k=1), g)
    assert torch.equal(top1, logits.argmax(-1))
    allowed = torch.isfinite(top_k_filter(logits, 4))
    for _ in range(50):
        tok = select_next_token(logits, GenerationConfig(do_sample=True, top_k=4, temperature=3.0), g)
        assert allowed.gather(1, tok[:, None]).all()


def test_mark_finished_pads_finished_rows_and_flags_eos():
    cfg = GenerationConfig(eos_token_id=[9, 8], pad_token_id=0)
    tokens, finished = mark_finished(torch.tensor([9, 3, 4, 8]), torch.tensor([False, False, True, False]), cfg)
    assert tokens.tolist() == [9, 3, 0, 8]
    assert finished.tolist() == [True, False, True, True]
    assert GenerationConfig(eos_token_id=5).fill_id == 5  # no pad: the EOS fills, as transformers does


def _scripted_step(script, calls):
    """A fake model whose next-token argmax follows ``script`` (B, N)."""
    def step(new):
        calls.append(None if new is None else new.clone())
        logits = torch.zeros(script.shape[0], 10)
        logits[torch.arange(script.shape[0]), script[:, len(calls) - 1]] = 1.0
        return logits
    return step


def test_decode_loop_feeds_back_tokens_and_stops_when_all_rows_end():
    script = torch.tensor([[1, 2, 9, 3, 3, 3], [4, 9, 5, 6, 7, 7]])
    calls = []
    out = decode_loop(_scripted_step(script, calls), 2, GenerationConfig(max_new_tokens=6, eos_token_id=9,
                                                                          pad_token_id=0))
    assert out.tolist() == [[1, 2, 9], [4, 9, 0]]  # row 1 padded after its EOS; stop once both ended
    assert calls[0] is None and calls[1].tolist() == [[1], [4]] and calls[2].tolist() == [[2], [9]]


def test_decode_loop_runs_to_max_without_eos_and_handles_zero():
    script = torch.tensor([[1, 2, 3, 4]])
    assert decode_loop(_scripted_step(script, []), 1, GenerationConfig(max_new_tokens=3)).tolist() == [[1, 2, 3]]
    assert decode_loop(_scripted_step(script, []), 1, GenerationConfig(max_new_tokens=0)).shape == (1, 0)


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", -1), ("max_new_tokens", 2.5), ("do_sample", "yes"), ("temperature", 0.0),
    ("temperature", -1.0), ("top_k", -3), ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan),
    ("eos_token_id", -2), ("eos_token_id", [1, "a"]), ("pad_token_id", -1),
])
def test_bad_generation_config_names_field_and_fix(field, value):
    with pytest.raises(ConfigError, match=rf"{field}=.*Fix: set {field}"):
        GenerationConfig(**{field: value})
