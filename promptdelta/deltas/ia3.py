"""(IA)^3: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning").

Three learned vectors per block rescale activations element-wise, nothing else changes:

    k = l_k * (W_k x + b_k)     v = l_v * (W_v x + b_v)     FFN: y = W_2 (l_ff * act(W_1 x)) + b_2

l_k, l_v: (out,) scale the key/value projections' outputs; l_ff: (d_ff,) scales the FFN's inner activation,
i.e. the input of its second linear layer (``fc2``; the input of Llama's ``down_proj``, so gated FFNs too).
All start at ones, so a fresh (IA)^3 leaves the model's outputs unchanged. PEFT's IA3 is the same layer:
an output-scaling vector for its ``target_modules``, an input-scaling one for its ``feedforward_modules``.

Mergeable (``merge()``): an output scale folds into the layer's own rows, W <- diag(l) W and b <- l * b; an
input scale into its columns, W <- W diag(l) (the bias is untouched). The exact pre-merge tensors are kept, so
``unmerge()`` restores them bit for bit. Without autograd (inference) the vector is folded into a scaled
copy of the weight when that touches fewer numbers than scaling the activation (rows M > in or out).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from promptdelta.deltas.base import DeltaWrapper, ModuleSite, WrappingMethod, register_delta
from promptdelta.deltas.merge import _unload_wrapping, register_unload
from promptdelta.deltas.sites import match_targets
from promptdelta.errors import ConfigError, DeltaError


@dataclass
class IA3Config:
    """targets: the linear layers that get a vector (native names; they also fit transformers models: key,
    value and the FFN's output dense on BERT); feedforward: which of them scale their *input* (the FFN's inner
    activation) rather than their output; init: the vectors' start value (1.0: outputs unchanged)."""

    targets: list[str] | str = field(default_factory=lambda: ["k_proj", "v_proj", "fc2"])
    feedforward: list[str] | str = field(default_factory=lambda: ["fc2"])
    init: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.init, bool) or not isinstance(self.init, (int, float)):
            raise ConfigError(f"IA3 init={self.init!r} must be a number; use init=1.0 (outputs start unchanged).")
        if not isinstance(self.feedforward, (str, list, tuple)):
            raise ConfigError(f"IA3 feedforward={self.feedforward!r} must be a module name or a list of them "
                              f"(e.g. ['fc2']), or [] for output scaling only.")


class IA3Linear(DeltaWrapper):
    """A frozen ``nn.Linear`` (child ``base``) whose output (or, ``feedforward``, input) is scaled by ``ia3_l``.

    Output scaling: y = l * (W x + b), l: (out,). Input scaling: y = W (l * x) + b, l: (in,).
    """

    token_wise = True   # acts on each token alone: native backbones may hand it packed (N, in) real tokens

    def __init__(self, base: nn.Linear, feedforward: bool, init: float = 1.0) -> None:
        super().__init__()
        self.base = base
        self.feedforward = feedforward
        w = base.weight                                                       # (out, in)
        size = w.shape[1] if feedforward else w.shape[0]
        self.ia3_l = nn.Parameter(torch.full((size,), float(init), device=w.device, dtype=w.dtype))
        self.merged = False
        self._unmerged: tuple[torch.Tensor, torch.Tensor | None] | None = None   # (W0, b0) while merged

    def extra_repr(self) -> str:
        side = "input" if self.feedforward else "output"
        return f"scales the {side} ({self.ia3_l.numel()}), merged={self.merged}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: (..., in)
        if self.merged or not self.enabled:
            return self.base(x)                            # (..., out)
        l, w = self.ia3_l.to(x.dtype), self.base.weight
        if not torch.is_grad_enabled() and x.numel() // w.shape[1] > w.shape[0 if self.feedforward else 1]:
            return F.linear(x, self._scaled_weight(l), self._scaled_bias(l))   # fewer numbers scaled
        if self.feedforward:
            return self.base(x * l)                        # (..., out): W (l * x) + b
        return self.base(x) * l                            # (..., out): l * (W x + b)

    def _scaled_weight(self, l: torch.Tensor) -> torch.Tensor:
        """W with the vector folded in: W diag(l) (input scaling) or diag(l) W (output scaling), (out, in)."""
        w = self.base.weight
        return w * l.to(w.dtype) if self.feedforward else w * l.to(w.dtype).unsqueeze(1)

    def _scaled_bias(self, l: torch.Tensor) -> torch.Tensor | None:
        b = self.base.bias
        return b if b is None or self.feedforward else b * l.to(b.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the vector into the weight (and, output scaling, the bias); keeps W0, b0 for unmerge."""
        if self.merged:
            return
        w, b = self.base.weight, self.base.bias
        self._unmerged = (w.detach().clone(), None if b is None else b.detach().clone())
        w.copy_(self._scaled_weight(self.ia3_l))
        if b is not None:
            b.copy_(self._scaled_bias(self.ia3_l))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the exact pre-merge weight and bias back (idempotent)."""
        if not self.merged or self._unmerged is None:
            return
        w0, b0 = self._unmerged
        self.base.weight.copy_(w0)
        if b0 is not None:
            self.base.bias.copy_(b0)
        self._unmerged = None
        self.merged = False


class IA3(WrappingMethod):
    """Registered as "ia3": wraps each target linear layer in an ``IA3Linear``."""

    config_cls = IA3Config

    def select(self, model: nn.Module, sites: list[ModuleSite]) -> list[ModuleSite]:
        bad = [f"{s.name} ({type(s.module).__name__})" for s in sites if not isinstance(s.module, nn.Linear)]
        if bad:
            raise DeltaError(f"IA3 scales nn.Linear layers only, but targets {self.config.targets!r} also match "
                             f"{bad[:5]}; name the linear layers (e.g. 'k_proj', 'v_proj', 'fc2').")
        self._ff = self._feedforward_ids(model, sites)
        return sites

    def _feedforward_ids(self, model: nn.Module, sites: list[ModuleSite]) -> set[int]:
        """ids of the target modules that scale their input (named by ``config.feedforward``)."""
        ff = self.config.feedforward
        if not ff:
            return set()
        chosen = {id(s.module) for s in match_targets(model, ff, warn_unused=False)}
        ids = {id(s.module) for s in sites} & chosen
        if not ids:
            raise DeltaError(f"IA3 feedforward={ff!r} names none of the targets {self.config.targets!r}; name "
                             f"target modules (e.g. feedforward=['fc2']) or pass feedforward=[].")
        return ids

    def apply(self, sites: list[ModuleSite]) -> None:
        ff = getattr(self, "_ff", set())
        for s in sites:
            self._wrap(s, IA3Linear(s.module, id(s.module) in ff, self.config.init))

    def named_delta_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{s.name}.ia3_l", w.ia3_l) for s, w in self.sites]

    def original_values(self) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for _, w in self.sites:
            if w.merged and w._unmerged is not None:
                out[id(w.base.weight)] = w._unmerged[0]
                if w._unmerged[1] is not None:
                    out[id(w.base.bias)] = w._unmerged[1]
        return out


register_delta("ia3", IA3)
register_unload("ia3", _unload_wrapping)   # merge_and_unload: fold the vectors in, put the plain layers back
