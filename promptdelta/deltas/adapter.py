"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"; Pfeiffer et al.
2021, "AdapterFusion"; He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning").

An adapter is a small residual bottleneck  A(h) = s * W_up f(W_down h + b_down) + b_up,  W_down: (b, in),
W_up: (out, b), f an activation, s a scale. Placements:

    houlsby   (sequential)  y = M(x) + A(M(x))   after the attention output and after the FFN
                                                 (default targets ``attn.o_proj``, ``mlp.fc2``)
    pfeiffer  (sequential)  y = M(x) + A(M(x))   after the FFN only (default target ``mlp.fc2``)
    parallel                y = M(x) + A(x)      beside the whole FFN sublayer (default target ``mlp``)

M is the wrapped module (kept as the child ``base``); when it returns a tuple (attention modules that also
return their cache), the adapter acts on the first element. Initialisation is near-identity: W_down is
kaiming-uniform, W_up ~ N(0, init_scale) and both biases zero, so with ``init_scale=0`` (the default) a fresh
adapter is exactly the identity. Default targets are native names, which also fit the ``transformers``
BERT/RoBERTa/GPT-2/T5 models (see ``sites.py``); the parallel default ``mlp`` needs a module that is the
whole FFN (GPT-2's ``mlp``, T5's ``DenseReluDense``): transformers BERT/RoBERTa split theirs across
``intermediate`` and ``output`` (with the residual and LayerNorm inside), so name a target there (e.g.
``attention.output.dense``). Adapters cannot be merged: the activation makes A non-linear, so no weight
matrix equals M + A.

Learning rate: 3e-3 (AdamW) in the core benchmark suite (Pfeiffer, bottleneck 32, all-MiniLM-L6-v2, 16-shot,
30 steps), chosen on dev splits: 1e-3 undertrained (mean dev .477 against .555), and 3e-2 drove every grid
run to one predicted class.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from promptdelta.deltas.base import DeltaWrapper, ModuleSite, WrappingMethod, register_delta
from promptdelta.deltas.structure import is_linear, linear_dims
from promptdelta.errors import ConfigError, DeltaError

logger = logging.getLogger(__name__)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,       # "swish" in the adapters literature
    "tanh": torch.tanh,
    "identity": lambda x: x,
}
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
DEFAULT_TARGETS = {"houlsby": ["attn.o_proj", "mlp.fc2"], "pfeiffer": ["mlp.fc2"], "parallel": ["mlp"]}
_DEFAULT_REDUCTION = 16


@dataclass
class AdapterConfig:
    """placement: "houlsby" | "pfeiffer" | "parallel"; bottleneck: hidden size of the adapter, or
    reduction_factor: bottleneck = out_features / reduction_factor (default 16; give one of the two);
    activation: one of ``ACTIVATIONS``; scaling: s; init_scale: std of W_up at init (0 = exact identity);
    dropout: on the bottleneck; targets: modules to wrap (None = the placement's native default)."""

    placement: str = "houlsby"
    bottleneck: int | None = None
    reduction_factor: float | None = None
    activation: str = "relu"
    scaling: float = 1.0
    init_scale: float = 0.0
    dropout: float = 0.0
    targets: list[str] | str | None = None

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"adapter placement={self.placement!r} is unknown; use one of {list(PLACEMENTS)}.")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"adapter activation={self.activation!r} is unknown; use one of {sorted(ACTIVATIONS)}.")
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ConfigError("adapter got both bottleneck and reduction_factor; pass only one of them "
                              "(e.g. bottleneck=64 or reduction_factor=16).")
        if self.bottleneck is not None and (isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int)
                                            or self.bottleneck < 1):
            raise ConfigError(f"adapter bottleneck={self.bottleneck!r} must be an integer >= 1; use e.g. 64.")
        if self.reduction_factor is not None and (not _is_number(self.reduction_factor) or self.reduction_factor <= 0):
            raise ConfigError(f"adapter reduction_factor={self.reduction_factor!r} must be a positive number; "
                              f"use e.g. 16.")
        for key in ("scaling", "init_scale"):
            if not _is_number(getattr(self, key)) or (key == "init_scale" and self.init_scale < 0):
                raise ConfigError(f"adapter {key}={getattr(self, key)!r} must be a (non-negative for init_scale) "
                                  f"number; use e.g. {key}=1.0 / 0.0.")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter dropout={self.dropout!r} must be in [0, 1); use e.g. dropout=0.1.")
        if self.targets is None:   # resolved here so a saved config re-attaches to the same modules
            self.targets = list(DEFAULT_TARGETS[self.placement])

    def bottleneck_for(self, out_features: int) -> int:
        if self.bottleneck is not None:
            return self.bottleneck
        return max(1, round(out_features / (self.reduction_factor or _DEFAULT_REDUCTION)))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Bottleneck(nn.Module):
    """A(h) = scaling * up(dropout(act(down(h)))): (..., in) -> (..., out)."""

    def __init__(self, in_features: int, out_features: int, bottleneck: int, activation: str = "relu",
                 scaling: float = 1.0, init_scale: float = 0.0, dropout: float = 0.0,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, bottleneck, device=device, dtype=dtype)   # (b, in)
        self.up = nn.Linear(bottleneck, out_features, device=device, dtype=dtype)    # (out, b)
        self.activation, self.scaling = activation, scaling
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.normal_(self.up.weight, std=init_scale) if init_scale > 0 else nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def extra_repr(self) -> str:
        return f"activation={self.activation}, scaling={self.scaling}"

    def forward(self, h: torch.Tensor) -> torch.Tensor:   # h: (..., in)
        z = self.dropout(self.act(self.down(h.to(self.down.weight.dtype))))   # (..., b)
        return self.up(z) * self.scaling                                       # (..., out)


class AdapterWrapper(DeltaWrapper):
    """A module ``base`` followed by (sequential) or beside (parallel) a ``Bottleneck`` adapter.

    sequential: y = base(x) + A(base(x));  parallel: y = base(x) + A(x), x the first input of ``base``.
    """

    def __init__(self, base: nn.Module, adapter: Bottleneck, parallel: bool) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.parallel = parallel

    def extra_repr(self) -> str:
        return f"parallel={self.parallel}, enabled={self.enabled}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        if not self.enabled:
            return out
        h = out[0] if isinstance(out, tuple) else out                 # (..., out)
        src = _first_tensor(args, kwargs) if self.parallel else h     # (..., in)
        if h.shape[-1] != self.adapter.up.out_features or src.shape[-1] != self.adapter.down.in_features:
            raise DeltaError(f"adapter {self.delta_name!r} maps {self.adapter.down.in_features} -> "
                             f"{self.adapter.up.out_features} features but its module ({type(self.base).__name__}) "
                             f"reads {src.shape[-1]} and outputs {h.shape[-1]}; target a linear layer or a sublayer "
                             f"that keeps the hidden size (e.g. 'mlp', 'attn.o_proj').")
        h = h + self.adapter(src).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(x, torch.Tensor):
        raise DeltaError(f"a parallel adapter reads the wrapped module's first input, but it is a "
                         f"{type(x).__name__}; target a module whose first argument is the hidden states.")
    return x


def _features(module: nn.Module, hidden: int | None) -> tuple[int, int] | None:
    """(in, out) of a linear layer (nn.Linear, or transformers' Conv1D with weight (in, out)); of a sublayer,
    the input of its first and the output of its last linear layer (BERT's ``intermediate``: (H, I)), else
    the model's hidden size for both; None when unknown."""
    if is_linear(module):
        return linear_dims(module)
    inner = [m for m in module.modules() if is_linear(m)]
    if inner:
        return linear_dims(inner[0])[0], linear_dims(inner[-1])[1]
    return (hidden, hidden) if hidden else None


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class Adapter(WrappingMethod):
    """Registered as "adapter": wraps each target module in an ``AdapterWrapper``."""

    config_cls = AdapterConfig

    def __init__(self, config: AdapterConfig, name: str) -> None:
        super().__init__(config, name)
        self._dims: dict[str, tuple[int, int]] = {}

    def select(self, model: nn.Module, sites: list[ModuleSite]) -> list[ModuleSite]:
        hidden = _hidden_size(model)
        unknown = []
        for s in sites:
            dims = _features(s.module, hidden)
            if dims is None or next(s.module.parameters(), None) is None:
                unknown.append(f"{s.name} ({type(s.module).__name__})")
            else:
                self._dims[s.name] = dims
        if unknown:
            raise DeltaError(f"adapter targets {self.config.targets!r} match modules whose sizes cannot be read "
                             f"({unknown[:5]}); target linear layers (e.g. 'attention.output.dense', 'output.dense' "
                             f"on transformers BERT) or sublayers of a model whose config has hidden_size.")
        nested = [s.name for s in sites if any(o.name.startswith(s.name + ".") for o in sites)]
        if nested:
            raise DeltaError(f"adapter targets {self.config.targets!r} match both {nested[:3]} and modules inside "
                             f"them; narrow the targets (exact names or a 're:' pattern).")
        return sites

    def apply(self, sites: list[ModuleSite]) -> None:
        c = self.config
        for s in sites:
            fan_in, fan_out = self._dims[s.name]
            ref = next(s.module.parameters())
            adapter = Bottleneck(fan_in if c.placement == "parallel" else fan_out, fan_out, c.bottleneck_for(fan_out),
                                 c.activation, c.scaling, c.init_scale, c.dropout, device=ref.device, dtype=ref.dtype)
            self._wrap(s, AdapterWrapper(s.module, adapter, parallel=c.placement == "parallel"))

    def named_delta_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{s.name}.adapter.{k}", p) for s, w in self.sites for k, p in w.adapter.named_parameters()]

    def merge(self) -> None:
        raise DeltaError(f"adapter {self.name!r} cannot be merged: its bottleneck has a non-linear activation "
                         f"({self.config.activation}), so no change of the base weights reproduces it. Keep the "
                         f"adapter attached for inference, or use 'lora' if you need a mergeable delta.")


register_delta("adapter", Adapter)
