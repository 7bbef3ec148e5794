"""Fused CPU dropout (Srivastava et al. 2014, "Dropout"): y = x * m / (1 - p), m_i ~ Bernoulli(1 - p).

Work in progress: this first version is torch's own dropout behind the final API.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Drop-in for ``F.dropout(x, p, training)``."""
    return F.dropout(x, p, training)


class FastDropout(nn.Dropout):
    """Drop-in for ``nn.Dropout`` (same ``p``, same empty state_dict) running :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return dropout(x, self.p, self.training)
