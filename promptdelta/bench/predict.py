"""Serving benchmark: ``promptdelta bench predict``.

Two tables, each side by side in one run on the embedded MiniLM (or ``--backbone``) with LoRA deltas (r=8 on
q_proj/v_proj, random factors: timings do not depend on the values):

1. ``clf.predict`` over the SST-2 test texts (``<data root>/sst2/test.jsonl``; the root is $PROMPTDELTA_DATA,
   else ../shared/data; without it the built-in demo texts, said in the title), merged (the default) and
   unmerged (one delta name per row: served through ``route_rows``), against what a transformers
   ``pipeline`` does (batches of the same size in input order) on two references: a plain ``BertModel``
   holding the merged weights W + (alpha/r) B A (the strict one, the target is judged against it) and
   ``BertModel`` with peft's LoRA, unmerged. All tokenise with the classifier's template and read out with
   its readout (``--readout mask``, the default, or ``mean``) and verbalizer, so they compute the same
   predictions (the title says how close). With the mask readout predict computes the last layer at the
   mask row only (``keep_positions``); the mean readout reads every row, so nothing is pruned there.
2. One mixed batch of 4 task deltas (row i with delta i mod 4, through ``route_rows``) against 4
   sequential single-delta passes over the same rows (each delta attached to its own copy of the backbone,
   unmerged, fused LoRA, running its own rows); rows sorted by length in both, tokenised beforehand.

Variants are interleaved, rounds shuffled (``bench.kernel._time_interleaved``); the table gives median times
and the median of the per-round ratios with their IQR. Targets (issue 17): predict >= 2x the transformers
forward (ratio <= 0.5); the mixed batch <= 1.2x one single-delta pass per example.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptdelta.bench.kernel import _format, _quartiles, _time_interleaved
from promptdelta.data.examples import InputExample
from promptdelta.errors import ConfigError, DataError, DeltaError

logger = logging.getLogger(__name__)

TASKS = ("sst2", "agnews", "rte", "boolq")
RANK, ALPHA = 8, 16
MERGED_REF = "transformers BertModel, LoRA merged"          # the strict reference: no LoRA cost at all
PEFT_REF = "transformers+peft LoRA, unmerged"
READOUTS = ("mask", "mean")
TEMPLATE = '{"placeholder":"text_a"} It was {"mask"}.'


def _texts(data: str | None, rows: int) -> tuple[list[str], str]:
    """``rows`` SST-2 test texts (repeated if fewer) and where they came from."""
    from promptdelta.data.loaders import builtin_path

    root = os.environ.get("PROMPTDELTA_DATA") or os.path.join("..", "shared", "data")
    path = Path(data) if data else Path(root) / "sst2" / "test.jsonl"
    source = f"SST-2 test texts ({path})"
    if not path.is_file():
        if data:
            raise DataError(f"--data {data} does not exist; give a JSONL file with a \"text\" field per line, or "
                            f"no --data (SST-2 test texts from $PROMPTDELTA_DATA, else the built-in demo texts)")
        path, source = builtin_path("demo") / "test.jsonl", "built-in demo texts (no SST-2 data found)"
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise DataError(f"{path} holds no texts; give a JSONL file of {{\"text\": ...}} lines")
    return [texts[i % len(texts)] for i in range(rows)], source


def _randomise(handle: Any, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _classifier(backbone: str, readout: str) -> tuple[nn.Module, Any, str]:
    """MiniLM (or ``backbone``) + a manual template + a soft verbalizer, LoRA "sst2" attached. ``readout``:
    "mask" (the classifier's default: the state at [MASK]; predict prunes the last layer to it) or "mean"
    (every position: nothing to prune)."""
    import promptdelta as pd

    model, tok = pd.load_backbone(backbone)
    model.eval()
    handle = pd.attach(model, "lora", name="sst2", targets=["q_proj", "v_proj"], r=RANK, alpha=ALPHA)
    _randomise(handle, 0)
    template = pd.ManualTemplate(TEMPLATE, tokenizer=tok)
    verbalizer = pd.SoftVerbalizer(tok, ["negative", "positive"], [["bad"], ["good"]], model)
    clf = pd.PromptForClassification(model, template, verbalizer, max_length=128, readout=readout).eval()
    return clf, tok, handle


def _lora_factors(clf: nn.Module) -> dict[tuple[int, str, str], torch.Tensor]:
    """(layer, query|value, A|B) -> the classifier's LoRA factor, under transformers' module names."""
    import promptdelta as pd

    factors = {}
    for key, t in pd.deltas_of(clf.backbone)["sst2"].state_dict().items():   # layers.{i}.attn.{q|v}_proj.lora_{A|B}
        layer, proj = key.split(".")[1], key.split(".")[3]
        factors[(int(layer), {"q_proj": "query", "v_proj": "value"}[proj], key[-1])] = t
    return factors


def _hf_models(clf: nn.Module, folder: Path) -> dict[str, nn.Module]:
    """The references, by label: a plain transformers BertModel holding the merged weights (W + s B A: the
    strict reference, what a pipeline on a merged export runs) and, where peft is installed, BertModel with
    peft's LoRA unmerged."""
    import transformers

    factors = _lora_factors(clf)
    merged = transformers.BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    with torch.no_grad():
        for (i, proj, ab), t in factors.items():
            if ab == "A":
                getattr(merged.encoder.layer[i].attention.self, proj).weight += \
                    (ALPHA / RANK) * factors[(i, proj, "B")] @ t                # (H, r) @ (r, H)
    out = {MERGED_REF: merged}
    try:
        import peft
    except ImportError:
        logger.info("peft is not installed: no transformers+peft column")
        return out
    hf = transformers.BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["query", "value"])).eval()
    with torch.no_grad():
        for (i, proj, ab), t in factors.items():
            lin = getattr(hf.base_model.model.encoder.layer[i].attention.self, proj)
            getattr(lin, f"lora_{ab}")["default"].weight.copy_(t)
    out[PEFT_REF] = hf
    return out


def _hf_predict(clf: nn.Module, hf: nn.Module, texts: list[str], batch_size: int) -> torch.Tensor:
    """What a pipeline does: batches in input order, template tokenisation, full forward, the same readout."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = clf.template.tokenize([InputExample(t) for t in texts[i:i + batch_size]], clf.max_length)
            mask = batch["attention_mask"]
            hidden = hf(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state   # (B, T, H)
            if clf.readout == "mask":
                pooled = hidden[torch.arange(len(hidden)), batch["mask_pos"][:, 0]]             # (B, H)
            else:
                keep = mask[..., None].to(hidden.dtype)
                pooled = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)                      # (B, H)
            out.append(clf.verbalizer.process(pooled, None, clf.backbone).float())
    return torch.cat(out)


def _padding_ratio(clf: nn.Module, texts: list[str], batch_size: int) -> float:
    """Tokens the backbone runs (padding included) with rows sorted by length over those in input order: where
    most of predict's gain comes from (attention grows faster than linearly, the rest of the model linearly)."""
    lengths = clf.template.tokenize([InputExample(t) for t in texts], clf.max_length)["attention_mask"].sum(1)

    def padded(ls: list[int]) -> int:
        return sum(len(ls[i:i + batch_size]) * max(ls[i:i + batch_size]) for i in range(0, len(ls), batch_size))

    return padded(sorted(lengths.tolist(), reverse=True)) / padded(lengths.tolist())


def _predict_lines(backbone: str, folder: Path, texts: list[str], source: str, batch_size: int,
                   rounds: int, readout: str) -> list[str]:
    clf, _, _ = _classifier(backbone, readout)
    refs = _hf_models(clf, folder)
    names = ["sst2"] * len(texts)
    fns: dict[str, tuple[Callable[[], object], str]] = {
        f"{label}, input order": (lambda hf=hf: _hf_predict(clf, hf, texts, batch_size), f"{label}, input order")
        for label, hf in refs.items()}
    fns["predict, merged"] = (lambda: clf.predict(texts, batch_size=batch_size), "")
    fns["predict, unmerged (per-row delta)"] = (lambda: clf.predict(texts, batch_size=batch_size, delta=names), "")
    ref = _hf_predict(clf, refs[MERGED_REF], texts, batch_size).softmax(-1)
    diffs = {}
    for n, kw in (("merged", {}), ("unmerged", {"delta": names})):
        try:
            diffs[n] = f"{float((clf.predict(texts, batch_size=batch_size, **kw).probs - ref).abs().max()):.1e}"
        except DeltaError as e:                   # the row says why instead of the whole table failing
            diffs[n] = f"FAILED ({e})"
            del fns[f"predict, {n}" + (" (per-row delta)" if n == "unmerged" else "")]
    with torch.no_grad():
        pruned = clf.pruned_positions(clf.collate([InputExample(texts[0])])) is not None
    title = (f"predict vs transformers: {len(texts)} {source}, batch {batch_size}, {rounds} rounds, readout "
             f"{readout} (predict's last layer {'pruned to the mask row' if pruned else 'not pruned'}; max |probs - "
             f"merged BertModel's|: merged {diffs['merged']}, unmerged {diffs['unmerged']}; "
             f"padded tokens sorted / input order: {_padding_ratio(clf, texts, batch_size):.2f})")
    timings = _time_interleaved({k: (fn, k) for k, (fn, _) in fns.items()}, rounds, 0.0)
    return _two_refs(title, timings, [f"{label}, input order" for label in refs])


def _two_refs(title: str, timings: list[Any], bases: list[str]) -> list[str]:
    """Median ms per variant and the median (IQR) of its per-round time ratio to each reference."""
    by_name = {t.name: t for t in timings}
    heads = [f"{'/ ' + ('BertModel merged' if b.startswith(MERGED_REF) else 'peft unmerged'):>24s}" for b in bases]
    lines = [title, f"  {'variant':50s} {'median ms':>10s} " + " ".join(heads) + "  (ratio, IQR)"]
    for t in timings:
        cells = []
        for b in bases:
            q1, q2, q3 = _quartiles([a / r for a, r in zip(t.times, by_name[b].times)])
            cells.append(f"{q2:7.3f} ({q1:.3f}-{q3:.3f})".rjust(24))
        lines.append(f"  {t.name:50s} {statistics.median(t.times) * 1e3:10.1f} " + " ".join(cells))
    lines.append("  target (issue 17): predict / BertModel merged <= 0.5 (>= 2x)")
    return lines


def _mixed_lines(backbone: str, texts: list[str], batch_size: int, rounds: int) -> list[str]:
    """4 task deltas: one mixed batch through route_rows vs 4 single-delta passes over the same rows."""
    import promptdelta as pd
    from promptdelta.deltas.mixed import add_delta, route_rows

    model, tok = pd.load_backbone(backbone)
    model.eval()
    copies = []
    for i, task in enumerate(TASKS):
        copy_ = copy.deepcopy(model)
        _randomise(pd.attach(copy_, "lora", name=task, targets=["q_proj", "v_proj"], r=8, alpha=16), i)
        copies.append(copy_)
        h = pd.attach(model, "lora", name=task, targets=["q_proj", "v_proj"], r=8, alpha=16)
        h.load_state_dict(pd.deltas_of(copy_)[task].state_dict())          # the same delta, banked
        add_delta(model, h)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))          # longest first, as predict does

    def batches(rows: list[int]) -> list[tuple[list[int], dict]]:
        out = []
        for s in range(0, len(rows), batch_size):
            idx = rows[s:s + batch_size]
            out.append((idx, dict(tok([texts[i] for i in idx], padding=True, truncation=True, max_length=128,
                                      return_tensors="pt"))))
        return out

    mixed = batches(order)
    single = [batches([i for i in order if i % len(TASKS) == t]) for t in range(len(TASKS))]

    def run_mixed() -> list[torch.Tensor]:
        with torch.inference_mode():
            outs = []
            for idx, enc in mixed:
                with route_rows(model, [TASKS[i % len(TASKS)] for i in idx]):
                    outs.append(model(**enc).last_hidden_state[:, 0])
            return outs

    def run_single() -> list[torch.Tensor]:
        with torch.inference_mode():
            return [copies[t](**enc).last_hidden_state[:, 0] for t in range(len(TASKS)) for _, enc in single[t]]

    got = dict(zip([i for idx, _ in mixed for i in idx], torch.cat(run_mixed())))
    want = dict(zip([i for t in range(len(TASKS)) for idx, _ in single[t] for i in idx], torch.cat(run_single())))
    diff = max(float((got[i] - want[i]).abs().max()) for i in got)
    base = "4 single-delta passes"
    fns = {base: (run_single, base), "mixed batch, 4 deltas": (run_mixed, base)}
    title = (f"mixed batch vs per-delta passes: {len(texts)} rows, 4 LoRA deltas, batch {batch_size}, "
             f"{rounds} rounds; same rows, so the ratio is per example (max |CLS state difference|: {diff:.1e})")
    return _format(title, _time_interleaved(fns, rounds, 0.0))


def run_predict_bench(rows: int = 256, rounds: int = 5, batch_size: int = 32, backbone: str = "minilm",
                      data: str | None = None, readout: str = "mask") -> str:
    """Run both tables and return them as text."""
    if readout not in READOUTS:
        raise ConfigError(f"readout={readout!r} is unknown; pass --readout mask or --readout mean")
    for name, value in (("rows", rows), ("rounds", rounds), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}; pass e.g. --{name.replace('_', '-')} 32")
    from promptdelta.backbones.loading import PRESETS

    folder = PRESETS[backbone]() if backbone in PRESETS else Path(backbone)
    texts, source = _texts(data, rows)
    lines = [f"promptdelta bench predict on {backbone} ({torch.get_num_threads()} threads)"]
    lines += _predict_lines(backbone, folder, texts, source, batch_size, rounds, readout)
    lines += _mixed_lines(backbone, texts, batch_size, rounds)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``promptdelta bench predict [--rows N] [--rounds R] [--batch-size B] [--backbone B] [--data F]
    [--readout mask|mean]``."""
    parser = argparse.ArgumentParser(prog="promptdelta bench predict", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="texts to classify (repeated if the file has fewer)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians over them)")
    parser.add_argument("--batch-size", type=int, default=32, dest="batch_size")
    parser.add_argument("--backbone", default="minilm", help="preset (minilm) or a local BERT checkpoint folder")
    parser.add_argument("--data", default=None, help="JSONL file with a \"text\" field per line (default: "
                        "$PROMPTDELTA_DATA/sst2/test.jsonl, else ../shared/data/sst2/test.jsonl, else demo texts)")
    parser.add_argument("--readout", choices=READOUTS, default="mask", help="mask (default; predict prunes the "
                        "last layer to the mask row) or mean (every position is read: nothing to prune)")
    args = parser.parse_args(argv)
    print(run_predict_bench(args.rows, args.rounds, args.batch_size, args.backbone, args.data, args.readout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
