"""Intrinsic prompt tuning, IPT (Qin et al. 2021, "Exploring Universal Intrinsic Task Subspace via Prompt
Tuning"): the soft prompts of many tasks lie near one low-dimensional subspace; a new task tunes only a
point z in it.

    1. per-task prompts p_1 .. p_n in R^D (here: the flattened per-layer key/value prefixes of a prefix
       delta, P-tuning v2's deep prompts, ``prompt_vector(handle)``)
    2. find the subspace (``fit_subspace``):
         "pca":         p ~ m + W z,                 W (D, d) the top-d principal directions, m the mean
         "autoencoder": p ~ W_2 tanh(W_1 z + b_1) + b_2,  z = Enc(p); trained on ||p - Dec(Enc(p))||^2
       (IPT's auto-encoder with a two-layer decoder; PCA is its linear optimum)
    3. a new task: the delta "ipt" feeds the prefixes Dec(z) to every attention layer (through the native
       backbones' ``prefix_kv``, as the "prefix" delta does) and trains z (d numbers) only.

The subspace is a shared artefact, like the base model: ``IntrinsicSubspace.save(folder)`` writes
safetensors + JSON, the delta's config names that folder (``subspace=...``) and records its SHA-256, so a
saved "ipt" delta holds only z and ``load_delta`` refuses a subspace that changed. Native backbones only
(transformers models have no ``prefix_kv``; load them with ``load_backbone``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from promptdelta.deltas.base import DeltaHandle, ModuleSite, register_delta
from promptdelta.deltas.prefix import PrefixDict, PrefixHolder, PrefixList, PrefixTuning, _native, _parts
from promptdelta.errors import CheckpointError, ConfigError, DeltaError, MissingFileError
from promptdelta.utils.io import atomic_save_safetensors, atomic_write_json

WEIGHTS, META = "subspace.safetensors", "subspace.json"
METHODS = ("pca", "autoencoder")


# --------------------------------------------------------------------------------------------- subspace
class IntrinsicSubspace(nn.Module):
    """The decoder z (d,) -> prompt (D,): linear (``w2`` (D, d), ``b2`` = mean) or a two-layer MLP.

    Held in buffers: the subspace is fixed while a task tunes z. ``layout`` records the prefix shapes the
    prompts came from: [(part, layers, heads, num_tokens, head_dim)], in prefix_kv order."""

    def __init__(self, w2: torch.Tensor, b2: torch.Tensor, layout: Sequence[Sequence[Any]],
                 w1: torch.Tensor | None = None, b1: torch.Tensor | None = None) -> None:
        super().__init__()
        self.layout = [tuple(x) for x in layout]
        self.register_buffer("w2", w2.detach().clone())          # (D, d) linear | (D, h) MLP
        self.register_buffer("b2", b2.detach().clone())          # (D,)
        self.register_buffer("w1", None if w1 is None else w1.detach().clone())   # (h, d)
        self.register_buffer("b1", None if b1 is None else b1.detach().clone())   # (h,)

    @property
    def dim(self) -> int:
        return int((self.w1 if self.w1 is not None else self.w2).shape[1])

    @property
    def prompt_size(self) -> int:
        return int(self.b2.shape[0])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (d,) or (n, d) -> prompts (D,) or (n, D)."""
        h = z if self.w1 is None else torch.tanh(z @ self.w1.T + self.b1)    # (n, h)
        return h @ self.w2.T + self.b2

    def project(self, p: torch.Tensor) -> torch.Tensor:
        """Least-squares z of prompts p (D,) or (n, D) for the linear decoder (the PCA coordinates)."""
        if self.w1 is not None:
            raise DeltaError("project() needs a linear ('pca') subspace; an auto-encoder's z comes from its encoder "
                             "(fit_subspace(..., method='autoencoder') returns it)")
        return torch.linalg.lstsq(self.w2, (p - self.b2).T).solution.T

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        folder = Path(folder)
        if folder.exists() and not overwrite:
            raise CheckpointError(f"{folder} already exists; pass overwrite=True to replace the subspace there")
        tensors = {k: v for k, v in (("w2", self.w2), ("b2", self.b2), ("w1", self.w1), ("b1", self.b1))
                   if v is not None}
        atomic_save_safetensors(folder / WEIGHTS, tensors, metadata={"format": "promptdelta.ipt"})
        atomic_write_json(folder / META, {"format": 1, "dim": self.dim, "prompt_size": self.prompt_size,
                                          "layout": [list(x) for x in self.layout]})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> IntrinsicSubspace:
        folder = Path(folder)
        for name in (WEIGHTS, META):
            if not (folder / name).is_file():
                raise MissingFileError(f"{folder / name} is missing; an IPT subspace folder is written by "
                                       f"IntrinsicSubspace.save(folder) (fit_subspace's result)")
        from safetensors.torch import load_file

        t = load_file(str(folder / WEIGHTS))
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        return cls(t["w2"], t["b2"], meta["layout"], t.get("w1"), t.get("b1"))


def subspace_digest(folder: str | Path) -> str:
    """SHA-256 of the subspace's weights file (recorded in the delta's config)."""
    return hashlib.sha256((Path(folder) / WEIGHTS).read_bytes()).hexdigest()


def prompt_layout(model: nn.Module, num_tokens: int) -> list[tuple[str, int, int, int, int]]:
    """[(part, layers, heads, num_tokens, head_dim)] of a native backbone's prefixes."""
    return [(p.name, p.layers, p.heads, num_tokens, p.head_dim) for p in _parts(model)]


def prompt_vector(handle: DeltaHandle) -> torch.Tensor:
    """A "prefix" delta's prompt as one flat vector (D,): per part, keys then values (plain prefixes)."""
    if not isinstance(handle._method, PrefixTuning) or isinstance(handle._method, IntrinsicPromptTuning):
        raise DeltaError(f"prompt_vector needs a 'prefix' delta handle (got {handle.method!r}); attach one with "
                         f"attach(model, 'prefix', ...) and train it on the task")
    _, t = handle._method.export_state()
    parts = list(handle._method.sets)
    return torch.cat([t[f"prefix.{p}.{kv}"].reshape(-1) for p in parts for kv in ("keys", "values")])


def fit_subspace(prompts: torch.Tensor, layout: Sequence[Sequence[Any]], dim: int, method: str = "pca",
                 hidden: int = 64, steps: int = 500, lr: float = 1e-2, seed: int = 0
                 ) -> tuple[IntrinsicSubspace, torch.Tensor]:
    """Find a ``dim``-dimensional subspace of the task prompts (n, D); returns it and the tasks' z (n, d)."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is unknown; use one of {list(METHODS)}")
    if prompts.dim() != 2 or not 1 <= dim <= prompts.shape[1]:
        raise ConfigError(f"prompts must be (n_tasks, D) and 1 <= dim <= D; got {tuple(prompts.shape)}, dim={dim}")
    size = sum(2 * math.prod(x[1:]) for x in layout)
    if size != prompts.shape[1]:
        raise ConfigError(f"the layout {list(layout)} describes prompts of {size} numbers but they have "
                          f"{prompts.shape[1]}; pass prompt_layout(model, num_tokens) of the model they came from")
    prompts = prompts.detach().float()
    if method == "pca":
        mean = prompts.mean(0)
        _, _, vh = torch.linalg.svd(prompts - mean, full_matrices=False)      # vh (min(n, D), D)
        basis = vh[:dim].T                                                    # (D, d')
        if basis.shape[1] < dim:                                              # fewer tasks than dims: pad
            basis = torch.cat([basis, basis.new_zeros(basis.shape[0], dim - basis.shape[1])], 1)
        sub = IntrinsicSubspace(basis, mean, layout)
        return sub, sub.project(prompts)
    return _fit_autoencoder(prompts, layout, dim, hidden, steps, lr, seed)


def _fit_autoencoder(prompts: torch.Tensor, layout: Sequence[Sequence[Any]], dim: int, hidden: int, steps: int,
                     lr: float, seed: int) -> tuple[IntrinsicSubspace, torch.Tensor]:
    """IPT's auto-encoder: Enc = linear D -> d, Dec = d -> tanh(h) -> D; Adam on the reconstruction MSE."""
    g = torch.Generator().manual_seed(seed)
    D = prompts.shape[1]
    scale = prompts.std().clamp(min=1e-6)
    enc = nn.Linear(D, dim)
    dec = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, D))
    for p in [*enc.parameters(), *dec.parameters()]:
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=lr)
    x = prompts / scale                                                       # unit scale trains steadily
    for _ in range(steps):
        loss = (dec(enc(x)) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        sub = IntrinsicSubspace(dec[2].weight * scale, dec[2].bias * scale, layout, dec[0].weight, dec[0].bias)
        return sub, enc(x)


# --------------------------------------------------------------------------------------------- the delta
@dataclass
class IPTConfig:
    """subspace: folder written by ``IntrinsicSubspace.save``; subspace_sha256: filled in on attach and
    checked when given (a saved delta refuses a changed subspace); init: starting z, "zeros" (the
    subspace's centre for PCA) or a list of d numbers."""

    subspace: str = ""
    subspace_sha256: str = ""
    init: Any = "zeros"

    def __post_init__(self) -> None:
        if not isinstance(self.subspace, str) or not self.subspace:
            raise ConfigError("ipt needs subspace='<folder>' (written by IntrinsicSubspace.save); fit one with "
                              "promptdelta.deltas.ipt.fit_subspace over task prompts")
        if self.init != "zeros" and not (isinstance(self.init, (list, tuple))
                                         and all(isinstance(v, (int, float)) for v in self.init)):
            raise ConfigError(f"ipt init={self.init!r} must be 'zeros' or a list of d numbers")


class IPTHolder(PrefixHolder):
    """Holds z (the only trainable tensor) and the fixed subspace inside the backbone."""

    def __init__(self, subspace: IntrinsicSubspace, z: torch.Tensor) -> None:
        super().__init__()
        self.subspace = subspace
        self.z = nn.Parameter(z)                                              # (d,)


class IntrinsicPromptTuning(PrefixTuning):
    """Registered as "ipt": prefixes Dec(z) from a fixed subspace, only z (d numbers) trains."""

    config_cls = IPTConfig

    def select(self, model: nn.Module, sites: list[ModuleSite]) -> list[ModuleSite]:
        if not _native(model):   # no cache path here, so its tokens are always numbered from 0 (no `positions`)
            raise DeltaError(f"ipt feeds its prefixes through a native backbone's prefix_kv, which "
                             f"{type(model).__name__} (transformers) does not take; attach it to "
                             f"promptdelta.load_backbone(model)[0] instead.")
        sites = super().select(model, sites)
        folder = Path(self.config.subspace)
        self.subspace = IntrinsicSubspace.load(folder)
        digest = subspace_digest(folder)
        if self.config.subspace_sha256 and self.config.subspace_sha256 != digest:
            raise CheckpointError(f"the subspace in {folder} changed since this ipt delta was made (sha256 "
                                  f"{digest[:12]} != {self.config.subspace_sha256[:12]}); use the subspace it was "
                                  f"trained in")
        self.config = dataclasses.replace(self.config, subspace_sha256=digest)
        n_tok = self.subspace.layout[0][3] if self.subspace.layout else 0
        if [tuple(x) for x in prompt_layout(model, n_tok)] != self.subspace.layout:
            raise DeltaError(f"the subspace in {folder} holds prompts of layout {self.subspace.layout}, but this "
                             f"{type(model).__name__} needs {prompt_layout(model, n_tok)}; fit the subspace on "
                             f"prompts of this model")
        return sites

    def apply(self, sites: list[ModuleSite]) -> None:
        model = self.model
        ref = next(model.parameters())
        d = self.subspace.dim
        z = torch.zeros(d) if self.config.init == "zeros" else torch.tensor(self.config.init, dtype=torch.float32)
        if z.shape != (d,):
            raise ConfigError(f"ipt init has {z.numel()} numbers but the subspace has d={d}; pass d numbers")
        self.holder = IPTHolder(self.subspace.to(ref.device, ref.dtype), z.to(ref.device, ref.dtype))
        self.holder.delta_name = self.name
        self.holder.train(model.training)
        model.add_module(self._attr, self.holder)
        self._arg_index = list(inspect.signature(model.forward).parameters).index("prefix_kv")
        self._hook = model.register_forward_pre_hook(self._inject, with_kwargs=True)

    def named_delta_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [("ipt.z", self.holder.z)] if isinstance(self.holder, IPTHolder) else []

    def prompt(self) -> torch.Tensor:
        """The current prompt Dec(z): (D,)."""
        return self.holder.subspace.decode(self.holder.z)

    def prefix_kv(self) -> PrefixList | PrefixDict:
        """Dec(z) cut into per-layer (k, v) pairs, each (1, nh, P, hd), in the backbone's prefix_kv format."""
        flat, at, parts = self.prompt(), 0, {}
        for name, layers, heads, n_tok, hd in self.holder.subspace.layout:
            n = layers * heads * n_tok * hd
            k = flat[at:at + n].view(layers, heads, n_tok, hd)
            v = flat[at + n:at + 2 * n].view(layers, heads, n_tok, hd)
            parts[name] = [(k[i][None], v[i][None]) for i in range(layers)]
            at += 2 * n
        out: PrefixList | PrefixDict = PrefixList(parts["layers"]) if "layers" in parts else PrefixDict(parts)
        out.owners = frozenset({self.name})
        return out

    def merge(self) -> None:
        self.merged = True          # nothing to fold: Dec(z) is computed on the fly

    def export_state(self) -> tuple[IPTConfig, dict[str, torch.Tensor]]:
        return self.config, {"ipt.z": self.holder.z.detach()}


register_delta("ipt", IntrinsicPromptTuning)
