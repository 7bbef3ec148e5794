"""Token selection and the decoding loop shared by every generating backbone (GPT-2, T5).

Pipeline per step, in the order ``transformers`` applies it (so seeded results line up with HF)::

    logits (B, V) -> / temperature -> top-k filter -> top-p (nucleus) filter -> argmax | multinomial

* top-k (Fan et al., 2018): keep the k largest logits (ties with the k-th kept), the rest -> -inf.
* top-p (Holtzman et al., 2020, "The Curious Case of Neural Text Degeneration"): keep the smallest set
  of tokens, in order of probability, whose total probability is >= p; the most likely token always stays.

Use from a model (the model owns its cache; the loop only sees logits)::

    cfg = GenerationConfig(max_new_tokens=20, do_sample=True, top_p=0.9, eos_token_id=eos, pad_token_id=pad)
    def step(new_tokens):          # None on the first call, then (B, 1) LongTensor of the chosen tokens
        ...                        # run the model (prompt first, then one token with the KV cache)
        return logits              # (B, V) next-token logits
    new = decode_loop(step, batch_size=B, config=cfg, generator=g)   # (B, N) with N <= max_new_tokens

Rows that produced an EOS are finished: every later token of theirs is ``pad_token_id``. The loop stops
early once every row is finished (as ``transformers`` does), so N may be smaller than max_new_tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from promptdelta.errors import ConfigError

logger = logging.getLogger(__name__)

StepFn = Callable[[torch.Tensor | None], torch.Tensor]


def _fail(field: str, value: object, what: str) -> None:
    raise ConfigError(f"GenerationConfig.{field}={value!r} is invalid. Fix: set {field} to {what}.")


@dataclass
class GenerationConfig:
    """How to pick tokens. ``eos_token_id`` may be one id or a list of ids (any of them ends a row)."""

    max_new_tokens: int = 20
    do_sample: bool = False      # False: greedy (argmax); temperature / top_k / top_p are then ignored
    temperature: float = 1.0
    top_k: int = 0               # 0 = off
    top_p: float = 1.0           # 1.0 = off
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None  # default: the first EOS id (what transformers does)

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 0:
            _fail("max_new_tokens", self.max_new_tokens, "an int >= 0")
        if not isinstance(self.do_sample, bool):
            _fail("do_sample", self.do_sample, "True or False")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            _fail("temperature", self.temperature, "a float > 0 (for greedy decoding use do_sample=False)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            _fail("top_k", self.top_k, "an int >= 0 (0 turns top-k off)")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            _fail("top_p", self.top_p, "a float in (0, 1] (1.0 turns top-p off)")
        for i in self.eos_ids:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                _fail("eos_token_id", self.eos_token_id, "None, a token id >= 0, or a list of such ids")
        pad = self.pad_token_id
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 0):
            _fail("pad_token_id", pad, "None or a token id >= 0")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The EOS ids as a tuple (empty when there is none)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def fill_id(self) -> int | None:
        """The id written into finished rows: pad_token_id, else the first EOS id, else None."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_ids[0] if self.eos_ids else None


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf. ``k <= 0`` or ``k >= V``: unchanged."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the fewest most-likely tokens whose probability sums to >= p; others -> -inf.

    A token is dropped when the tokens ranked above it already hold >= p of the mass; the top token always
    stays. ``p >= 1``: unchanged.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs                          # (..., V) mass ranked above each
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)                  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p, on (B, V) logits (the order transformers uses)."""
    if temperature != 1.0:
        logits = logits / temperature
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def select_next_token(logits: torch.Tensor, config: GenerationConfig,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax when ``do_sample`` is False, else a seeded draw."""
    if not config.do_sample:
        return logits.argmax(dim=-1)
    scores = process_logits(logits.float(), config.temperature, config.top_k, config.top_p)
    probs = scores.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def mark_finished(tokens: torch.Tensor, finished: torch.Tensor,
                  config: GenerationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the fill id into rows already finished; return (tokens (B,), finished (B,) after this step)."""
    eos = config.eos_ids
    if not eos:
        return tokens, finished
    tokens = torch.where(finished, torch.full_like(tokens, config.fill_id), tokens)
    hit = torch.isin(tokens, torch.tensor(eos, device=tokens.device))
    return tokens, finished | hit


@torch.no_grad()
def decode_loop(step: StepFn, batch_size: int, config: GenerationConfig,
                generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Run ``step`` until ``max_new_tokens`` or every row has finished; return the new tokens (B, N).

    ``step(None)`` is called first (the model reads its prompt) and then ``step(tokens)`` with the (B, 1)
    tokens just chosen; each call returns the (B, V) logits of the next position.
    """
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    chosen: list[torch.Tensor] = []
    last: torch.Tensor | None = None
    for _ in range(config.max_new_tokens):
        logits = step(last)  # (B, V)
        tokens = select_next_token(logits, config, generator).to(finished.device)  # (B,)
        tokens, finished = mark_finished(tokens, finished, config)
        chosen.append(tokens)
        last = tokens[:, None]  # (B, 1)
        if bool(finished.all()):
            break
    if not chosen:
        return torch.empty(batch_size, 0, dtype=torch.long, device=device)
    return torch.stack(chosen, dim=1)  # (B, N)
