"""Contrastive training of a prompt model's readout, then a head: parameter-efficient SetFit.

Stage 1 trains whatever in ``clf`` requires grad outside the verbalizer (a delta, a soft template) so that
the readout h(x) (the mask state, or the mean with ``readout="mean"``) puts same-class texts together:

- ``pairs`` (SetFit, Tunstall et al. 2022): per round, each example is paired with one random same-class
  and one random other-class example; cosine-similarity regression
      L = mean (cos(h_i, h_j) - y_ij)^2,   y_ij = 1 if same class else 0
- ``supcon`` (Khosla et al. 2020), on z = h / |h| and temperature tau, over the positives P(i) of anchor i:
      L = mean_i  -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a != i} exp(z_i.z_a / tau) )

Stage 2 fits the head on the tuned readout: ``logistic`` = a logistic-regression probe copied into a soft
verbalizer's linear head (prompts/probe.py, C chosen on dev); ``soft`` = cross-entropy on the verbalizer's
own parameters only; ``refresh`` = a similarity verbalizer's class vectors re-read; ``none`` = nothing.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional as F

from promptdelta.errors import ConfigError

OBJECTIVES = ("pairs", "supcon")
HEADS = ("logistic", "soft", "refresh", "none")


def pair_loss(h_a: torch.Tensor, h_b: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """SetFit's CosineSimilarityLoss: mean (cos(a, b) - same)^2 over pairs; h (P, H), same (P,) in {0, 1}."""
    return (F.cosine_similarity(h_a, h_b, dim=-1) - same.to(h_a.dtype)).pow(2).mean()


def supcon_loss(h: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out); anchors without a positive are skipped."""
    z = F.normalize(h, dim=-1)                                                  # (B, H)
    sim = z @ z.T / temperature                                                 # (B, B)
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = sim - sim.masked_fill(eye, float("-inf")).logsumexp(-1, keepdim=True)   # log softmax over a != i
    pos = (labels[:, None] == labels[None, :]) & ~eye                           # (B, B)
    has = pos.any(-1)
    if not has.any():
        return h.sum() * 0.0                                                    # no positives: no signal
    per_anchor = (log_prob * pos).sum(-1)[has] / pos.sum(-1)[has]
    return -per_anchor.mean()


def sample_pairs(labels: Sequence[int], rounds: int, rng: random.Random) -> list[tuple[int, int, float]]:
    """SetFit's sampling: per round and example, one positive and one negative partner (when one exists)."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    pairs = []
    for _ in range(rounds):
        for i, y in enumerate(labels):
            same = [j for j in by_class[y] if j != i]
            other = [j for c, idx in by_class.items() if c != y for j in idx]
            if same:
                pairs.append((i, rng.choice(same), 1.0))
            if other:
                pairs.append((i, rng.choice(other), 0.0))
    rng.shuffle(pairs)
    return pairs


def _readout(clf: Any, examples: Sequence[Any]) -> torch.Tensor:
    """The verbalizer's input for ``examples``: (B, H)."""
    hidden = clf._label_logits(clf.collate(list(examples)))[1]
    if hidden is None:
        raise ConfigError("contrastive training reads the readout state; this classifier scores label "
                          "sequences (a causal LM / T5 with sequence scoring); use readout='mean' or an encoder")
    return hidden


def train_contrastive(clf: Any, train: Sequence[Any], dev: Sequence[Any] | None = None, *,
                      objective: str = "pairs", epochs: int = 1, num_iterations: int = 20, lr: float = 1e-3,
                      batch_size: int = 16, temperature: float = 0.07, head: str = "logistic",
                      head_epochs: int = 20, head_lr: float = 1e-2, seed: int = 0) -> dict[str, Any]:
    """Contrastive stage on ``clf``'s non-verbalizer trainable parameters, then ``head``; returns a summary
    (losses per epoch, the head's dev result, seconds). ``num_iterations``: pair rounds per epoch (pairs)."""
    if objective not in OBJECTIVES or head not in HEADS:
        raise ConfigError(f"objective={objective!r}, head={head!r}: choose objective from {list(OBJECTIVES)} "
                          f"and head from {list(HEADS)}")
    train = list(train)
    if len({ex.label for ex in train}) < 2:
        raise ConfigError("contrastive training needs at least two classes in train; give labelled examples "
                          "of every class")
    verbalizer_ids = {id(p) for p in clf.verbalizer.parameters()}
    params = [p for p in clf.parameters() if p.requires_grad and id(p) not in verbalizer_ids]
    if not params:
        raise ConfigError("nothing to train contrastively: attach a delta (e.g. lora) or use a soft template; "
                          "a frozen backbone only needs the head (head='logistic' on its own: probe_init)")
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr)
    labels = [ex.label for ex in train]
    losses, t0 = [], time.perf_counter()
    clf.train()
    for _ in range(epochs):
        total, n = 0.0, 0
        if objective == "pairs":
            pairs = sample_pairs(labels, num_iterations, rng)
            chunks = [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]
        else:
            order = torch.randperm(len(train), generator=gen).tolist()
            chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for chunk in chunks:
            if objective == "pairs":
                h = _readout(clf, [train[i] for i, _, _ in chunk] + [train[j] for _, j, _ in chunk])  # (2P, H)
                same = torch.tensor([s for _, _, s in chunk], device=h.device)
                loss = pair_loss(h[:len(chunk)], h[len(chunk):], same)
            else:
                h = _readout(clf, [train[i] for i in chunk])
                loss = supcon_loss(h, torch.tensor([labels[i] for i in chunk], device=h.device), temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(chunk), n + len(chunk)
        losses.append(total / max(1, n))
    out: dict[str, Any] = {"objective": objective, "losses": losses, "contrastive_s": time.perf_counter() - t0}
    clf.eval()
    if head == "logistic":
        from promptdelta.prompts.probe import probe_init

        out["head"] = probe_init(clf, train, dev, seed=seed)
    elif head == "refresh":
        clf.verbalizer.refresh(clf)
    elif head == "soft":
        out["head_losses"] = _fit_verbalizer(clf, train, head_epochs, head_lr, batch_size, gen)
    out["seconds"] = time.perf_counter() - t0
    return out


def _fit_verbalizer(clf: Any, train: list, epochs: int, lr: float, batch_size: int,
                    gen: torch.Generator) -> list[float]:
    """Cross-entropy on the verbalizer's parameters only, on readouts computed once (the body is fixed)."""
    params = [p for p in clf.verbalizer.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"head='soft' trains the verbalizer, but {type(clf.verbalizer).__name__} has no "
                          f"trainable parameters; use verbalizer 'soft' or 'similarity', or head='none'")
    with torch.no_grad():
        hidden = torch.cat([_readout(clf, train[i:i + 64]) for i in range(0, len(train), 64)])   # (N, H)
    y = torch.tensor([ex.label for ex in train], device=hidden.device)
    opt, history = torch.optim.AdamW(params, lr=lr), []
    for _ in range(epochs):
        order, total = torch.randperm(len(train), generator=gen), 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(clf.verbalizer.process(hidden[idx], None, clf.backbone), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / len(train))
    return history


def train_body_pairs(backbone: Any, tokenizer: Any, train: Sequence[Any], *, max_length: int = 128,
                     num_iterations: int = 20, epochs: int = 1, lr: float = 2e-5, batch_size: int = 16,
                     weight_decay: float = 0.01, warmup_ratio: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """SetFit's body stage without a prompt: every parameter of ``backbone`` is trained on SetFit pairs of the
    plain texts (``pair_loss`` on mean-pooled states, AdamW, linear warmup then decay, dropout on), in place.

    This is our own equivalent of ``setfit.Trainer``'s contrastive stage (sentence-transformers with mean
    pooling and CosineSimilarityLoss); a logistic head is then fitted on ``bench.baselines.embed``."""
    from promptdelta.bench.baselines import mean_pool, tokenize_pairs
    from promptdelta.train.trainer import linear_warmup_decay

    train = list(train)
    labels = [ex.label for ex in train]
    if len(set(labels)) < 2:
        raise ConfigError("contrastive training needs at least two classes in train; give labelled examples "
                          "of every class")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    backbone.requires_grad_(True)
    params = [p for p in backbone.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rounds = [sample_pairs(labels, num_iterations, rng) for _ in range(epochs)]
    total = sum((len(r) + batch_size - 1) // batch_size for r in rounds)
    sched = linear_warmup_decay(opt, int(warmup_ratio * total), total)
    losses, t0 = [], time.perf_counter()
    backbone.train()
    for pairs in rounds:
        run, n = 0.0, 0
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            batch = tokenize_pairs(tokenizer, [train[a] for a, _, _ in chunk] + [train[b] for _, b, _ in chunk],
                                   max_length)
            batch.pop("labels", None)
            h = mean_pool(backbone(**batch).last_hidden_state, batch["attention_mask"])       # (2P, H)
            loss = pair_loss(h[:len(chunk)], h[len(chunk):], torch.tensor([s for _, _, s in chunk]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            run, n = run + loss.item() * len(chunk), n + len(chunk)
        losses.append(run / max(1, n))
    backbone.eval()
    return {"losses": losses, "steps": total, "seconds": time.perf_counter() - t0}
