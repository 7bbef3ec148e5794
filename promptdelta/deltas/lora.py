"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen linear layer ``y = W0 x + b`` gets a trainable low-rank update:

    y = W0 x + b + (alpha / r) * B A dropout(x)        A: (r, in), B: (out, r)

A starts kaiming-uniform and B at zero, so a fresh LoRA leaves the model's outputs unchanged. ``merge()``
folds ``(alpha / r) B A`` into W0 (then forward uses the base weight only); ``unmerge()`` puts the exact
original weight back. Works on ``nn.Linear`` and on the transformers ``Conv1D`` (GPT-2, weight (in, out)).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from promptdelta.deltas.base import DeltaWrapper, ModuleSite, WrappingMethod, register_delta
from promptdelta.errors import ConfigError, DeltaError
from promptdelta.kernels import lora_linear

logger = logging.getLogger(__name__)


@dataclass
class LoRAConfig:
    """r: rank; alpha: scale numerator (update scaled by alpha / r); dropout on the LoRA input only;
    targets: modules to wrap (default the attention query/value projections, in native names: they also
    fit transformers BERT/RoBERTa/T5, and GPT-2's fused c_attn, which LoRA then adapts as a whole);
    fan_in_fan_out: the targets store their weight as (in, out) (GPT-2 Conv1D; detected automatically);
    impl: "fused" (the fused LoRA matmul of promptdelta.kernels) or "plain" (base(x) + B A x, for comparison);
    rslora: scale by alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023, "A Rank Stabilization Scaling
    Factor for Fine-Tuning with LoRA"; PEFT's use_rslora)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    fan_in_fan_out: bool = False
    impl: str = "fused"
    rslora: bool = False

    def __post_init__(self) -> None:
        if self.impl not in ("fused", "plain"):
            raise ConfigError(f"LoRA impl={self.impl!r} is unknown; use 'fused' (promptdelta.kernels, the "
                              f"default) or 'plain' (separate modules, for comparison).")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA r={self.r!r} must be an integer >= 1; use e.g. r=8.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise ConfigError(f"LoRA alpha={self.alpha!r} must be a positive number; use e.g. alpha=16.")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout={self.dropout!r} must be in [0, 1); use e.g. dropout=0.1.")
        for key in ("fan_in_fan_out", "rslora"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"LoRA {key}={getattr(self, key)!r} must be True or False.")


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): y = x @ W + b with W of shape (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(
        getattr(module, "weight", None), nn.Parameter)


class LoRALinear(DeltaWrapper):
    """A frozen linear layer (kept as the child ``base``) plus a low-rank update ``(alpha/r) B A``.

    Args:
        base: the ``nn.Linear`` (or transformers ``Conv1D``) to adapt; it is not copied.
        r: rank of the update. alpha: scale numerator. dropout: dropout probability on the LoRA input.
        fan_in_fan_out: ``base.weight`` is stored as (in, out) (true for Conv1D).
        rslora: scale by alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r.
    """

    impl: str = "fused"   # class default; each instance sets its own from LoRAConfig.impl
    token_wise = True     # acts on each token alone: native backbones may hand it packed (N, in) real tokens

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 fan_in_fan_out: bool = False, impl: str = "fused", rslora: bool = False) -> None:
        super().__init__()
        self.base = base
        self.impl = impl          # "fused": promptdelta.kernels.lora_linear; "plain": base(x) + B A x
        self.fan_in_fan_out = fan_in_fan_out
        w = base.weight
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if fan_in_fan_out else w.shape
        self.r, self.alpha, self.scaling = r, alpha, alpha / (math.sqrt(r) if rslora else r)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, merged={self.merged}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: (..., in)
        if self.merged or not self.enabled:
            return self.base(x)                            # (..., out)
        if self._can_fuse(x):
            p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
            return lora_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling,
                               dropout_p=p, training=self.training, impl="fused")
        y = self.base(x)                                   # (..., out)
        return y + self._lora_forward(x).to(y.dtype)

    def _can_fuse(self, x: torch.Tensor) -> bool:
        """The fused kernel needs an nn.Linear base and one dtype/device for x and every weight."""
        w = self.base.weight
        return (self.impl == "fused" and not self.fan_in_fan_out and type(self.base) is nn.Linear
                and x.dtype == w.dtype == self.lora_A.dtype and x.device == w.device)

    def _lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha/r) B A dropout(x): the seam where a fused kernel is called later."""
        h = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.t()   # (..., r)
        return (h @ self.lora_B.t()) * self.scaling                    # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) B A in the layout of ``base.weight``: (out, in), or (in, out) when fan_in_fan_out."""
        dw = (self.lora_B @ self.lora_A) * self.scaling   # (out, in)
        return dw.t() if self.fan_in_fan_out else dw

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + (alpha/r) B A (idempotent). The original W0 is kept so unmerge is exact."""
        if self.merged:
            return
        w = self.base.weight
        self._unmerged_weight = w.detach().clone()
        w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the exact pre-merge W0 back (idempotent)."""
        if not self.merged:
            return
        self.base.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False


class LoRA(WrappingMethod):
    """Registered as "lora": wraps each target linear layer in a ``LoRALinear``."""

    config_cls = LoRAConfig

    def select(self, model: nn.Module, sites: list[ModuleSite]) -> list[ModuleSite]:
        bad = [f"{s.name} ({type(s.module).__name__})" for s in sites
               if not (isinstance(s.module, nn.Linear) or _is_conv1d(s.module))]
        if bad:
            raise DeltaError(f"LoRA wraps only linear layers, but targets {self.config.targets!r} also match "
                             f"{bad[:5]}; name the linear layers only (e.g. 'q_proj' or a narrower 're:' pattern).")
        if self.config.fan_in_fan_out:
            lin = [s.name for s in sites if isinstance(s.module, nn.Linear)]
            if lin:
                raise DeltaError(f"fan_in_fan_out=True but {lin[:3]} are nn.Linear with (out, in) weights; "
                                 f"drop fan_in_fan_out (it is detected automatically for Conv1D).")
        return sites

    def apply(self, sites: list[ModuleSite]) -> None:
        c = self.config
        for s in sites:
            conv = _is_conv1d(s.module)
            if conv and not c.fan_in_fan_out:
                logger.debug("%s is a Conv1D: using fan_in_fan_out=True", s.name)
            self._wrap(s, LoRALinear(s.module, c.r, c.alpha, c.dropout, fan_in_fan_out=conv, impl=c.impl,
                                     rslora=c.rslora))

    def named_delta_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{s.name}.{k}", p) for s, w in self.sites for k, p in (("lora_A", w.lora_A), ("lora_B", w.lora_B))]

    def original_values(self) -> dict[int, torch.Tensor]:
        return {id(w.base.weight): w._unmerged_weight for _, w in self.sites if w.merged}


register_delta("lora", LoRA)
