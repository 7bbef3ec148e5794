"""Intrinsic subspace tuning (Aghajanyan et al. 2020, "Intrinsic Dimensionality Explains the Effectiveness
of Language Model Fine-Tuning"; Li et al. 2018 for the Fastfood projection; Qin et al. 2021).

Every chosen parameter tensor theta_i (flattened, D_i numbers) is reparameterised through one shared
low-dimensional vector d (the only big trainable tensor):

    theta_i = theta0_i + lambda_i * P_i d          P_i: (D_i, dim), a Fastfood transform, never materialised

``lambda_i`` are the per-tensor scalars of SAID (structure-aware intrinsic dimension; ``said=False`` drops
them). The Fastfood transform of Le et al. 2013 is ``P = H G Pi H B`` on a power-of-two length n:
B a random +-1 diagonal, H the (unnormalised) Walsh-Hadamard matrix applied in O(n log n) by
``fwht``, Pi a random permutation, G a Gaussian diagonal. d is zero-padded to n; when D_i exceeds
``block_size`` the rows are split into independent blocks of n (each its own B, Pi, G), stacked and cut to
D_i. Columns are scaled to unit norm in expectation (Li et al.'s ``divisor * sqrt(D / n)``). Memory is O(D_i),
not O(D_i * dim). All randomness comes from ``seed`` and the tensor's name, so the checkpoint holds only d
(+ the scalars) and the config's seed regenerates every P_i.

d starts at zero, so a fresh delta leaves the outputs unchanged. Each target module is wrapped
(``IntrinsicWrapper``); its forward calls the original module through ``torch.func.functional_call`` with
the reparameterised tensors (the module's own forward, never rebound). ``merge()`` writes theta0 + lambda P d
into the weights (the originals are kept, so ``unmerge()``/``detach()`` restore them bit for bit).
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from promptdelta.deltas.base import DeltaWrapper, ModuleSite, WrappingMethod, register_delta
from promptdelta.deltas.fingerprint import canonical_namer
from promptdelta.errors import ConfigError, DeltaError

logger = logging.getLogger(__name__)

D_KEY = "intrinsic.d"   # checkpoint key of the shared vector d


@dataclass
class IntrinsicConfig:
    """dim: size of the trainable vector d; said: add one trainable scalar per reparameterised tensor;
    seed: regenerates every projection; targets: modules whose own parameters are reparameterised (default
    every attention and FFN projection, T5 v1.1's FFN gate included, in native names, which also fit the
    transformers families); include_bias: biases too, not only weights;
    block_size: largest Fastfood block (a power of two); larger tensors are split into blocks;
    names: what seeds each projection, "canonical" (the tensor's canonical name: the same on a transformers
    model and on its native backbone, so a checkpoint moves between them) or "module" (the module's own name,
    as folders saved before 2026-12-07 did: they load with it)."""

    dim: int = 1000
    said: bool = True
    seed: int = 0
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2",
                                                              "mlp.gate"])
    include_bias: bool = True
    block_size: int = 2 ** 22
    names: str = "canonical"
    # a delta.json without `names` was saved before 2026-12-07, when projections were seeded from module names
    SAVED_WITHOUT: ClassVar[dict[str, str]] = {"names": "module"}

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ConfigError(f"intrinsic dim={self.dim!r} must be an integer >= 1; use e.g. dim=1000.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"intrinsic seed={self.seed!r} must be an integer >= 0; use e.g. seed=0.")
        for name in ("said", "include_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"intrinsic {name}={getattr(self, name)!r} must be True or False.")
        if self.names not in ("canonical", "module"):
            raise ConfigError(f"intrinsic names={self.names!r} must be 'canonical' or 'module'; leave the default.")
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 2 or b & (b - 1):
            raise ConfigError(f"intrinsic block_size={b!r} must be a power of two >= 2; use e.g. 2**22.")


# ------------------------------------------------------------------------------------------- Fastfood
def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform over the last dim (a power of two): x -> x H, O(n log n).

    H is the Sylvester Hadamard matrix (H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]), symmetric, H H = n I.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise DeltaError(f"fwht needs a power-of-two length, got {n}; zero-pad the input to the next power of two.")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)                       # (..., blocks, 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)    # (..., n)
        h *= 2
    return x


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Fastfood(nn.Module):
    """A random (D, d) projection ``v -> P v`` built from Fastfood blocks ``H G Pi H B`` (see module doc).

    Buffers (regenerated from ``seed``, so not saved): ``signs`` B (k, n), ``perm`` Pi (k, n), ``gauss``
    G (k, n), ``scale`` (k,) = 1 / (sqrt(n * sum G^2) * sqrt(D / n)).
    """

    def __init__(self, d: int, D: int, seed: int, block_size: int = 2 ** 22) -> None:
        super().__init__()
        self.d, self.D = d, D
        n = _next_pow2(max(d, min(D, block_size)))      # block length; d must fit in one block
        k = math.ceil(D / n)                            # number of blocks
        self.n, self.k = n, k
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (k, n), generator=g).float() * 2 - 1                      # (k, n) of +-1
        perm = torch.stack([torch.randperm(n, generator=g) for _ in range(k)])                  # (k, n)
        gauss = torch.randn(k, n, generator=g)                                                  # (k, n)
        scale = 1.0 / (torch.sqrt(n * gauss.square().sum(-1)) * math.sqrt(D / n))              # (k,)
        self.register_buffer("signs", signs, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("gauss", gauss, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def extra_repr(self) -> str:
        return f"d={self.d}, D={self.D}, blocks={self.k}x{self.n}"

    def forward(self, v: torch.Tensor) -> torch.Tensor:   # v: (d,) -> (D,)
        x = torch.nn.functional.pad(v.to(self.gauss.dtype), (0, self.n - self.d))  # (n,)
        x = fwht(self.signs * x)                        # (k, n): H B v, per block
        x = torch.gather(x, 1, self.perm) * self.gauss  # (k, n): G Pi H B v
        x = fwht(x) * self.scale[:, None]               # (k, n): H G Pi H B v, unit-norm columns
        return x.reshape(-1)[: self.D]                  # (D,)


# ------------------------------------------------------------------------------------------- wrapper
def _tensor_seed(seed: int, key: str) -> int:
    """A per-tensor seed from the config seed and the tensor's canonical name (order independent)."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63)


class IntrinsicWrapper(DeltaWrapper):
    """Runs ``base`` with each chosen parameter replaced by ``theta0 + lambda * P d`` (see module doc).

    ``d`` is shared by every wrapper of one delta (registered in each; ``model.parameters()`` counts it once).
    """

    def __init__(self, base: nn.Module, names: list[str], keys: list[str], d: nn.Parameter, said: bool,
                 seed: int, block_size: int) -> None:
        super().__init__()
        self.base = base
        self.names = names                              # parameter names inside base ("weight", "bias")
        self.d = d                                      # (dim,), shared
        self.proj = nn.ModuleDict()
        self.said = nn.ParameterDict() if said else None
        for name, key in zip(names, keys):
            p = getattr(base, name)
            self.proj[name] = Fastfood(d.numel(), p.numel(), _tensor_seed(seed, key), block_size).to(p.device)
            if said:
                self.said[name] = nn.Parameter(torch.ones((), device=p.device, dtype=torch.float32))
        self.merged = False
        self._originals: dict[str, torch.Tensor] = {}

    def delta(self, name: str) -> torch.Tensor:
        """lambda * P d for parameter ``name``, in its shape and dtype."""
        p = getattr(self.base, name)
        upd = self.proj[name](self.d)                   # (D,)
        if self.said is not None:
            upd = upd * self.said[name]
        return upd.view(p.shape).to(p.dtype)

    def _versions(self) -> tuple:
        """Identity and version of every tensor the effective weights depend on (d, base weights, SAID)."""
        ts = [self.d, *(getattr(self.base, n) for n in self.names)]
        ts += [self.said[n] for n in self.names] if self.said is not None else []
        return tuple((t._version, t.data_ptr(), t.dtype) for t in ts)   # data_ptr: .to() / load replace tensors

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.merged or not self.enabled:
            return self.base(*args, **kwargs)
        if torch.is_grad_enabled():
            tensors = {n: getattr(self.base, n) + self.delta(n) for n in self.names}
        else:
            # inference: theta0 + P d is computed once and reused until d, a SAID scalar or a base weight
            # changes (an optimizer step bumps their versions); training recomputes it every step
            key = self._versions()
            cached = getattr(self, "_eval_cache", None)
            if cached is None or cached[0] != key:
                cached = (key, {n: getattr(self.base, n) + self.delta(n) for n in self.names})
                self._eval_cache = cached
            tensors = cached[1]
        return functional_call(self.base, tensors, args, kwargs)

    @torch.no_grad()
    def merge(self) -> None:
        """theta <- theta0 + lambda P d (idempotent); the originals are kept for an exact unmerge."""
        if self.merged:
            return
        for n in self.names:
            p = getattr(self.base, n)
            self._originals[n] = p.detach().clone()
            p.add_(self.delta(n))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for n in self.names:
            getattr(self.base, n).copy_(self._originals[n])
        self._originals = {}
        self.merged = False


# ------------------------------------------------------------------------------------------- method
class Intrinsic(WrappingMethod):
    """Registered as "intrinsic": wraps each target module in an ``IntrinsicWrapper`` sharing one d."""

    config_cls = IntrinsicConfig

    def __init__(self, config: IntrinsicConfig, name: str) -> None:
        super().__init__(config, name)
        self.d: nn.Parameter | None = None
        self._namer: Callable[[str], str] = lambda key: key

    def _names(self, module: nn.Module) -> list[str]:
        own = [n for n, p in module.named_parameters(recurse=False) if p.is_floating_point()]
        return [n for n in own if self.config.include_bias or n != "bias"]

    def select(self, model: nn.Module, sites: list[ModuleSite]) -> list[ModuleSite]:
        # the projections' seeds: canonical names are the same on a transformers model and its native backbone
        self._namer = canonical_namer(model) if self.config.names == "canonical" else (lambda key: key)
        keep = [s for s in sites if self._names(s.module)]
        if not keep:
            raise DeltaError(f"intrinsic targets {self.config.targets!r} match only modules without parameters of "
                             f"their own ({[s.name for s in sites][:5]}); target layers such as 'q_proj', "
                             f"'query' or 'fc1'.")
        seen: set[int] = set()
        for s in keep:
            for n in self._names(s.module):
                p = getattr(s.module, n)
                if id(p) in seen:
                    raise DeltaError(f"{s.name}.{n} is shared with another target (tied weights); leave one of "
                                     f"the tied modules out of targets.")
                seen.add(id(p))
        return keep

    def apply(self, sites: list[ModuleSite]) -> None:
        c = self.config
        device = next(sites[0].module.parameters()).device
        namer = self._namer
        self.d = nn.Parameter(torch.zeros(c.dim, device=device, dtype=torch.float32))   # (dim,), zero: no change
        for s in sites:
            names = self._names(s.module)
            self._wrap(s, IntrinsicWrapper(s.module, names, [namer(f"{s.name}.{n}") for n in names], self.d, c.said,
                                           c.seed, c.block_size))
        total = sum(w.proj[n].D for _, w in self.sites for n in w.names)
        logger.info("intrinsic: %d tensors (%d numbers) in a %d-dim subspace", len(self.sites), total, c.dim)

    def remove(self) -> None:
        super().remove()
        self.d = None

    def named_delta_parameters(self) -> list[tuple[str, nn.Parameter]]:
        if self.d is None:
            return []
        out = [(D_KEY, self.d)]
        for s, w in self.sites:
            if w.said is not None:
                out += [(f"{s.name}.said_{n}", w.said[n]) for n in w.names]
        return out

    def original_values(self) -> dict[int, torch.Tensor]:
        return {id(getattr(w.base, n)): t for _, w in self.sites if w.merged for n, t in w._originals.items()}


register_delta("intrinsic", Intrinsic)
