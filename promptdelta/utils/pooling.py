"""Mean pooling over the real tokens, per example, also when a template reads one example as several rows."""

from __future__ import annotations

import torch


def grouped_mean(hidden: torch.Tensor, mask: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
    """Mean of the real tokens' states per example: (R, T, H), (R, T), row_group (R,) or None -> (B, H); with
    groups, every token of an example's windows counts once (the token-weighted mean of the windows' means)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)                        # (R, T, 1)
    sums, counts = (hidden * m).sum(1), m.sum(1)                     # (R, H), (R, 1)
    if group is not None:
        n = int(group.max()) + 1 if group.numel() else 0
        sums = sums.new_zeros(n, sums.shape[1]).index_add_(0, group, sums)        # (B, H)
        counts = counts.new_zeros(n, 1).index_add_(0, group, counts)              # (B, 1)
    return sums / counts.clamp_min(1.0)
