"""S3Delta: automatic search of the delta structure (Hu et al. 2022, "Sparse Structure Search for
Parameter-Efficient Tuning").

Every candidate (site, method) pair — LoRA, a sequential adapter or BitFit at each target linear layer —
is put in one super-network, each behind a gate g = sigmoid(a) (a: one learned logit per candidate):

    y = W x + b  +  g_lora (alpha/r) B A x  +  g_adapter A(W x + b)  +  g_bitfit b'

The delta weights and the gate logits train together on the task loss plus a budget penalty on the
expected number of trainable parameters (c_i: the parameters candidate i would add):

    L = L_task + lam * relu(sum_i g_i c_i - budget) / budget        (delta weights under weight decay)

The search then emits a plain delta configuration (``emit_plan``): the candidates by gate, highest first,
kept while the total stays within the budget (and the gate at least ``min_gate``, default 0), with at most
one wrapping method (LoRA or adapter) per module, and one method of any kind on a bias-free module (BitFit
adds its bias there by wrapping too). The plan is a JSON list of ``attach`` calls; ``apply_plan`` attaches
them to a fresh model, which is then trained and saved as usual (each entry is an ordinary delta).

The super-network itself is the registered delta "s3delta" (so attach, freezing and detach are the usual
ones). It wraps ``nn.Linear`` layers: native backbones and transformers BERT/RoBERTa/T5 (GPT-2's Conv1D is
not a candidate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptdelta.deltas.adapter import Bottleneck
from promptdelta.deltas.base import (DeltaHandle, DeltaWrapper, ModuleSite, WrappingMethod, attach,
                                     register_delta)
from promptdelta.errors import CheckpointError, ConfigError, DeltaError, MissingFileError
from promptdelta.utils.io import atomic_write_json

METHODS = ("lora", "adapter", "bitfit")
WRAPPING = ("lora", "adapter")           # at most one of these per module (a module is wrapped once)


@dataclass
class S3DeltaConfig:
    """methods: candidate methods at each target; targets: linear layers (native names); r, alpha: LoRA's;
    bottleneck: the adapters'; gate_init: the initial gate logit a (sigmoid(0) = 0.5)."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "fc1",
                                                               "fc2"])
    r: int = 4
    alpha: float = 8
    bottleneck: int = 8
    gate_init: float = 0.0

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"s3delta methods={self.methods!r}: use a non-empty subset of {list(METHODS)}")
        for key in ("r", "bottleneck"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"s3delta {key}={v!r} must be an integer >= 1")


def candidate_cost(method: str, in_features: int, out_features: int, r: int, bottleneck: int) -> int:
    """Trainable parameters the plain delta adds at one linear layer (in -> out)."""
    if method == "lora":
        return r * (in_features + out_features)                          # A (r, in), B (out, r)
    if method == "adapter":
        return 2 * bottleneck * out_features + bottleneck + out_features   # down, up with biases
    return out_features                                                  # bitfit: the bias


class SearchWrapper(DeltaWrapper):
    """One linear layer with every candidate delta behind its gate (see the module docstring)."""

    def __init__(self, base: nn.Linear, methods: list[str], r: int, alpha: float, bottleneck: int,
                 gate_init: float) -> None:
        super().__init__()
        self.base = base
        w = base.weight
        out_f, in_f = w.shape
        kw = dict(device=w.device, dtype=w.dtype)
        self.methods = list(methods)
        self.gates = nn.Parameter(torch.full((len(methods),), float(gate_init), **kw))   # (M,) logits
        self.scaling = alpha / r
        if "lora" in methods:
            self.lora_A = nn.Parameter(torch.empty(r, in_f, **kw))                      # (r, in)
            self.lora_B = nn.Parameter(torch.zeros(out_f, r, **kw))                     # (out, r)
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if "adapter" in methods:
            self.adapter = Bottleneck(out_f, out_f, bottleneck, device=w.device, dtype=w.dtype)
        if "bitfit" in methods:
            self.bitfit_bias = nn.Parameter(torch.zeros(out_f, **kw))                   # (out,)
        self.costs = [candidate_cost(m, in_f, out_f, r, bottleneck) for m in methods]

    def gate_values(self) -> torch.Tensor:
        return torch.sigmoid(self.gates)                                                # (M,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # x: (..., in)
        y = self.base(x)                                      # (..., out)
        if not self.enabled:
            return y
        g = self.gate_values()
        out = y
        for i, m in enumerate(self.methods):
            if m == "lora":
                d = (x @ self.lora_A.T) @ self.lora_B.T * self.scaling                # (..., out)
            elif m == "adapter":
                d = self.adapter(y)                                                   # (..., out)
            else:
                d = self.bitfit_bias
            out = out + g[i] * d
        return out


class S3DeltaSearch(WrappingMethod):
    """Registered as "s3delta": the gated super-network of candidate deltas (used for the search only)."""

    config_cls = S3DeltaConfig

    def select(self, model: nn.Module, sites: list[ModuleSite]) -> list[ModuleSite]:
        lin = [s for s in sites if isinstance(s.module, nn.Linear)]
        if not lin:
            raise DeltaError(f"s3delta targets {self.config.targets!r} match no nn.Linear layer; name linear layers "
                             f"such as 'q_proj' (GPT-2's Conv1D layers are not candidates)")
        return lin

    def apply(self, sites: list[ModuleSite]) -> None:
        c = self.config
        for s in sites:
            self._wrap(s, SearchWrapper(s.module, c.methods, c.r, c.alpha, c.bottleneck, c.gate_init))

    def named_delta_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{s.name}.{k}", p) for s, w in self.sites for k, p in w.named_parameters()
                if not k.startswith("base.")]

    def merge(self) -> None:
        raise DeltaError("the s3delta super-network is for the search only and cannot be merged; emit_plan() its "
                         "result, apply_plan() it to the model and merge those deltas")


register_delta("s3delta", S3DeltaSearch)


# --------------------------------------------------------------------------------------------- search
def _search(handle: DeltaHandle) -> S3DeltaSearch:
    if not isinstance(handle._method, S3DeltaSearch):
        raise DeltaError(f"delta {handle.name!r} is a {handle.method!r} delta; pass the handle of "
                         f"attach(model, 's3delta', ...)")
    handle._check_attached()
    return handle._method


def gate_parameters(handle: DeltaHandle) -> list[nn.Parameter]:
    """The gate logits (one (M,) vector per site)."""
    return [w.gates for _, w in _search(handle).sites]


def weight_parameters(handle: DeltaHandle) -> list[nn.Parameter]:
    """The candidate deltas' own weights (everything but the gates)."""
    gates = {id(p) for p in gate_parameters(handle)}
    return [p for p in handle.parameters() if id(p) not in gates]


def expected_cost(handle: DeltaHandle) -> torch.Tensor:
    """sum_i g_i c_i: the expected number of trainable parameters (differentiable)."""
    return sum((w.gate_values() * torch.tensor(w.costs, dtype=w.gates.dtype, device=w.gates.device)).sum()
               for _, w in _search(handle).sites)


def budget_penalty(handle: DeltaHandle, budget: int) -> torch.Tensor:
    """relu(sum_i g_i c_i - budget) / budget."""
    return torch.relu(expected_cost(handle) - budget) / budget


@dataclass
class Candidate:
    site: str
    method: str
    cost: int
    gate: float


def candidates(handle: DeltaHandle) -> list[Candidate]:
    """Every (site, method) candidate with its cost and current gate, highest gate first."""
    out = [Candidate(s.name, m, c, float(g)) for s, w in _search(handle).sites
           for m, c, g in zip(w.methods, w.costs, w.gate_values().tolist())]
    return sorted(out, key=lambda c: -c.gate)


def search(handle: DeltaHandle, loss_fn: Callable[[Any], torch.Tensor], batches: Iterable[Any], budget: int,
           lr: float = 1e-3, gate_lr: float = 1e-1, penalty: float = 1.0, weight_decay: float = 0.1,
           extra_params: Iterable[nn.Parameter] = (), extra_lr: float | None = None) -> list[float]:
    """Train the super-network: AdamW on ``loss_fn(batch) + penalty * budget_penalty`` over ``batches``
    (delta weights at ``lr`` with ``weight_decay``, gate logits at ``gate_lr`` without). Returns the loss per step.
    ``extra_params`` (e.g. a fresh soft verbalizer's head, which the loss needs trained too) train alongside at
    ``extra_lr`` (default ``lr``), without weight decay.

    Why the weight decay: a gate and its delta's weights are redundant (g * B equals 1 * gB), so without it
    the weights absorb any gate change and the gates carry no ranking. Decay makes large weights costly: a
    useful candidate then keeps its gate open against the budget penalty, a useless one lets it close."""
    if budget < 1:
        raise ConfigError(f"budget={budget} must be a positive number of trainable parameters")
    opt = torch.optim.AdamW([{"params": weight_parameters(handle), "lr": lr, "weight_decay": weight_decay},
                             {"params": gate_parameters(handle), "lr": gate_lr, "weight_decay": 0.0}])
    extra = [p for p in extra_params if p.requires_grad]
    if extra:
        opt.add_param_group({"params": extra, "lr": lr if extra_lr is None else extra_lr, "weight_decay": 0.0})
    history = []
    for batch in batches:
        loss = loss_fn(batch) + penalty * budget_penalty(handle, budget)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history


# --------------------------------------------------------------------------------------------- the plan
@dataclass
class S3DeltaPlan:
    """The emitted configuration: ``attach`` calls ({"method", "name", "targets", **config}) and its cost."""

    calls: list[dict[str, Any]]
    cost: int
    budget: int
    chosen: list[Candidate] = field(default_factory=list)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """JSON {"budget", "cost", "attach": [calls]} written atomically."""
        if Path(path).exists() and not overwrite:
            raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it, or choose another path")
        return atomic_write_json(path, {"format": "promptdelta.s3delta", "budget": self.budget, "cost": self.cost,
                                        "attach": self.calls})

    @classmethod
    def load(cls, path: str | Path) -> S3DeltaPlan:
        import json

        if not Path(path).is_file():
            raise MissingFileError(f"plan file {path} does not exist; write one with S3DeltaPlan.save(path)")
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != "promptdelta.s3delta" or not isinstance(data.get("attach"), list):
            raise ConfigError(f"{path} is not an s3delta plan (needs format 'promptdelta.s3delta' and an 'attach' "
                              f"list); write it with S3DeltaPlan.save")
        return cls(data["attach"], int(data["cost"]), int(data["budget"]))


def emit_plan(handle: DeltaHandle, budget: int, min_gate: float = 0.0) -> S3DeltaPlan:
    """Greedy by gate: keep candidates (gate >= min_gate) while the total cost stays <= budget.

    The default keeps the ranking only (the budget penalty lowers every gate, so an absolute threshold
    such as 0.5 can leave nothing); raise min_gate to drop candidates the search switched off."""
    cfg = _search(handle).config
    ranked = candidates(handle)
    if ranked and min(c.cost for c in ranked) > budget:
        raise ConfigError(f"budget={budget} is below the cheapest candidate ({min(c.cost for c in ranked)} "
                          f"parameters); raise the budget or lower r / bottleneck")
    # a bias-free layer (T5, Llama) gets BitFit's bias by wrapping, so it takes one method of any kind
    biasless = {s.name for s, w in _search(handle).sites if w.base.bias is None}
    chosen, cost, wrapped, used = [], 0, set(), set()
    for c in ranked:
        clash = (c.method in WRAPPING and c.site in wrapped) or (c.site in biasless and c.site in used)
        if c.gate < min_gate or cost + c.cost > budget or clash:
            continue
        chosen.append(c)
        cost += c.cost
        used.add(c.site)
        if c.method in WRAPPING:
            wrapped.add(c.site)
    extra = {"lora": {"r": cfg.r, "alpha": cfg.alpha}, "adapter": {"bottleneck": cfg.bottleneck}, "bitfit": {}}
    calls = []
    for m in METHODS:
        sites = [c.site for c in chosen if c.method == m]
        if sites:
            calls.append({"method": m, "name": f"s3delta_{m}", "targets": sites, **extra[m]})
    return S3DeltaPlan(calls, cost, budget, chosen)


def apply_plan(model: nn.Module, plan: S3DeltaPlan) -> list[DeltaHandle]:
    """Attach every call of the plan to ``model`` (plain deltas, trained and saved as usual)."""
    handles = []
    for call in plan.calls:
        call = dict(call)
        handles.append(attach(model, call.pop("method"), **call))
    return handles
