"""Native names for the modules of any transformers model, read from its module structure (no name tables).

A model of a registered family is read through the family's key table (``sites.canonical_aliases``); any
other model (Gemma, Phi-3, DistilBERT, a Llama before its family is registered ...) through its structure:

* layer stacks: ``nn.ModuleList`` s whose items are all of one class and each hold >= 3 linear layers
  (``nn.Linear`` or transformers' ``Conv1D``); one stack is ``layers.{i}``, two (encoder-decoder) are
  ``encoder.layers.{i}`` and ``decoder.layers.{i}``;
* in a block, with H the input width of its first linear layer: the last linear layer is the FFN output
  ``mlp.fc2`` (I -> H); the linear layers right before it that read H and write I (or 2I, a fused gate/up
  projection) are the FFN inputs (two: ``mlp.gate`` then ``mlp.fc1``, as in SwiGLU/GEGLU; one: ``mlp.fc1``);
* every other linear layer belongs to an attention group: the layers under one child of the block (its
  attention sublayer). In a group the last one that writes H is the output projection ``o_proj`` and the
  others are q, k, v in order (one fused layer stands for all three, two for q and a fused k/v). The first group is ``attn``, a second ``cross_attn``;
* containers: the block is ``layers.{i}``; the smallest module holding one group and no other weights (a
  norm) is ``...attn``, and the one holding exactly the FFN layers is ``...mlp`` (if any does: BERT's
  attention module also holds a LayerNorm, its FFN is split over two modules, so neither gets a name).

The output head (``get_output_embeddings()``) is never part of a block. Tensor names never change: these
are aliases that targets may use.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2: y = x W + b with W of shape (in, out))."""
    if isinstance(module, nn.Linear):
        return True
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(w, nn.Parameter) and w.dim() == 2


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]   # Conv1D: (in, out)


def output_heads(model: nn.Module) -> list[nn.Module]:
    """The model's output (LM) head linear layers, which ``all-linear`` leaves out: ``get_output_embeddings()``
    of a transformers model, and any linear layer that shares its weight with the input embeddings or
    writes ``config.vocab_size`` logits (a native backbone's ``lm_head``, BERT's tied MLM decoder)."""
    heads: list[nn.Module] = []
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (AttributeError, NotImplementedError):
            head = None
        if isinstance(head, nn.Module):
            heads.append(head)
    embed = getattr(model, "input_embeddings", None) or getattr(model, "get_input_embeddings", None)
    try:
        tied = embed().weight if callable(embed) else None
    except (AttributeError, NotImplementedError):
        tied = None
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for m in model.modules():
        if is_linear(m) and m not in heads and (m.weight is tied or (vocab and linear_dims(m)[1] == vocab)):
            heads.append(m)
    return heads


def output_head(model: nn.Module) -> nn.Module | None:
    """The first of ``output_heads`` (None when the model has none)."""
    heads = output_heads(model)
    return heads[0] if heads else None


def _linears(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if n and is_linear(m)]


def layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The outermost ``nn.ModuleList`` s of same-class blocks holding >= 3 linear layers each, in order."""
    out: list[tuple[str, nn.ModuleList]] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or any(name.startswith(s + ".") for s, _ in out):
            continue
        if len({type(b) for b in m}) == 1 and all(len(_linears(b)) >= 3 for b in m):
            out.append((name, m))
    return out


def _top_child(name: str) -> str:
    return name.split(".", 1)[0]


def _smallest_holder(block: nn.Module, names: list[str], others: list[str]) -> str | None:
    """Relative name of the deepest module in ``block`` that holds every one of ``names`` and none of
    ``others`` (None when only the block itself would)."""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for comps in zip(*parts):
        if len(set(comps)) > 1:
            break
        common.append(comps[0])
    while common:
        prefix = ".".join(common)
        if prefix not in names and not any(o == prefix or o.startswith(prefix + ".") for o in others):
            return prefix
        common.pop()
    return None


def _attention_groups(names: list[str]) -> list[list[str]]:
    """Split a block's attention layers into attention sublayers: by the shallowest module level at which
    they fall into several sets of >= 2 layers each (T5's decoder: ``layer.0`` self-, ``layer.1`` cross-
    attention); else one group (BERT's q, k, v under ``attention.self`` and o under ``attention.output``)."""
    depth = max((n.count(".") for n in names), default=0)
    for d in range(1, depth + 1):
        sets: dict[str, list[str]] = {}
        for n in names:
            sets.setdefault(".".join(n.split(".")[:d]), []).append(n)
        if len(sets) > 1:
            return list(sets.values()) if all(len(v) >= 2 for v in sets.values()) else [names]
    return [names]


def block_aliases(block: nn.Module, prefix: str) -> dict[str, list[str]]:
    """Relative module name -> native names, for one transformer block named ``prefix`` (see module doc)."""
    lins = _linears(block)
    dims = {n: linear_dims(m) for n, m in lins}
    names = [n for n, _ in lins]
    H = dims[names[0]][0]
    fc2 = names[-1]
    if dims[fc2][1] != H:
        return {}
    inner = dims[fc2][0]
    mlp_in: list[str] = []
    for n in reversed(names[:-1]):
        if dims[n][0] == H and dims[n][1] in (inner, 2 * inner) and (inner != H or _top_child(n) == _top_child(fc2)):
            mlp_in.insert(0, n)
        else:
            break
    if not mlp_in:
        return {}
    out: dict[str, list[str]] = {"": [prefix], fc2: [f"{prefix}.mlp.fc2"]}
    if len(mlp_in) == 1:
        fused = dims[mlp_in[0]][1] == 2 * inner
        out[mlp_in[0]] = [f"{prefix}.mlp.gate", f"{prefix}.mlp.fc1"] if fused else [f"{prefix}.mlp.fc1"]
    else:
        out[mlp_in[-2]], out[mlp_in[-1]] = [f"{prefix}.mlp.gate"], [f"{prefix}.mlp.fc1"]
    mlp = mlp_in + [fc2]
    leaves = [n for n, m in block.named_modules()   # a holder holds no other weights (BERT's attention: a norm)
              if n and not isinstance(m, nn.Embedding) and next(m.parameters(recurse=False), None) is not None]
    attn = [n for n in names if n not in mlp]
    groups = _attention_groups(attn)
    for g, group in zip(("attn", "cross_attn"), groups):
        writes_h = [n for n in group if dims[n][1] == H]
        o = writes_h[-1] if writes_h else group[-1]   # Phi-3 registers o_proj before its fused qkv_proj
        qkv = [n for n in group if n != o]
        out[o] = [f"{prefix}.{g}.o_proj"]
        roles = {1: [("q", "k", "v")], 2: [("q",), ("k", "v")], 3: [("q",), ("k",), ("v",)]}.get(len(qkv), [])
        for n, rs in zip(qkv, roles):
            out[n] = [f"{prefix}.{g}.{r}_proj" for r in rs]
        holder = _smallest_holder(block, group, [x for x in leaves if x not in group])
        if holder is not None:
            out.setdefault(holder, []).append(f"{prefix}.{g}")
    holder = _smallest_holder(block, mlp, [x for x in leaves if x not in mlp])
    if holder is not None:
        out.setdefault(holder, []).append(f"{prefix}.mlp")
    norms = block_norms(block, H)
    if len(norms) == len(groups[:2]) + 1:   # one norm per sublayer, in order: attn, (cross_attn,) mlp
        for n, role in zip(norms, [f"{g}_norm" for g in ("attn", "cross_attn")[:len(groups)]] + ["mlp_norm"]):
            out[n] = [f"{prefix}.{role}"]
    return out


def block_norms(block: nn.Module, hidden: int) -> list[str]:
    """Relative names of a block's norm layers: leaves whose only weight is a (hidden,) vector (a bias too
    for LayerNorm), in registration order."""
    out = []
    for n, m in block.named_modules():
        own = dict(m.named_parameters(recurse=False))
        w = own.get("weight")
        if n and not list(m.children()) and w is not None and w.dim() == 1 and w.numel() == hidden \
                and set(own) <= {"weight", "bias"} and not is_linear(m):
            out.append(n)
    return out


def structural_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Own module name -> native names, for every block of every layer stack of ``model`` (module doc)."""
    stacks = layer_stacks(model)
    if not stacks:
        return {}
    if len(stacks) == 2:
        stack_names = ["encoder.layers", "decoder.layers"]
    else:
        stack_names = ["layers"] + [f"stack{k}.layers" for k in range(1, len(stacks))]
    out: dict[str, list[str]] = {}
    for (own, stack), native in zip(stacks, stack_names):
        for i, block in enumerate(stack):
            for rel, natives in block_aliases(block, f"{native}.{i}").items():
                out[f"{own}.{i}" + (f".{rel}" if rel else "")] = natives
    counts = Counter(len(v) for v in out.values())
    logger.debug("structural aliases for %s: %d modules (%s)", type(model).__name__, len(out), dict(counts))
    return out


def infer_block_spec(model: nn.Module) -> Any:
    """A ``BlockSpec`` read from a one-stack transformers model itself (no registered family): norm kind
    (a norm without bias is RMSNorm), pre/post norm (one probe forward records whether the first norm runs
    before the query projection), gating (two FFN inputs), biases, activation and eps from the config.
    None when the model has not exactly one layer stack of recognised blocks."""
    from promptdelta.backbones.registry import BlockSpec

    stacks = layer_stacks(model)
    if len(stacks) != 1 or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    block = stacks[0][1][0]
    aliases = block_aliases(block, "layers.0")
    role = {a.rsplit(".", 1)[-1] if "norm" in a else a.split(".", 2)[-1]: n for n, al in aliases.items() for a in al}
    if not {"attn_norm", "mlp_norm", "attn.q_proj"} <= set(role):
        return None
    mods = dict(block.named_modules())
    norm, q = mods[role["attn_norm"]], mods[role["attn.q_proj"]]
    order: list[str] = []
    hooks = [norm.register_forward_hook(lambda *a: order.append("norm")),
             q.register_forward_hook(lambda *a: order.append("q"))]
    try:
        with torch.no_grad():
            model(input_ids=torch.ones(1, 2, dtype=torch.long, device=q.weight.device))
    except Exception as e:   # a model that needs other inputs: the spec stays unknown
        logger.debug("probe forward of %s failed: %s", type(model).__name__, e)
        return None
    finally:
        for h in hooks:
            h.remove()
    c = model.config
    act = next((v for k in ("hidden_act", "hidden_activation", "activation_function", "activation")
                if isinstance(v := getattr(c, k, None), str)), "gelu")
    eps = next((v for v in (getattr(norm, "eps", None), getattr(norm, "variance_epsilon", None),
                            getattr(c, "rms_norm_eps", None), getattr(c, "layer_norm_eps", None)) if v), 1e-6)
    positions = "rotary" if any(hasattr(c, k) for k in ("rope_theta", "rope_parameters", "rope_scaling")) else "absolute"
    return BlockSpec(pre_norm=order[:1] == ["norm"], norm="layernorm" if getattr(norm, "bias", None) is not None
                     else "rmsnorm", activation=act, gated="mlp.gate" in role, positions=positions, eps=float(eps),
                     bias=getattr(q, "bias", None) is not None)
