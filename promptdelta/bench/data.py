"""Data-pipeline benchmark: ``promptdelta bench data``.

Times wrapping + tokenising N AG News texts (default 10,000) with a ManualTemplate and the MiniLM fast
tokenizer, three ways side by side: ``template.tokenize`` on batches (one tokenizer call per batch), the
same call once per example (the loop a naive data pipeline runs), and the bare fast tokenizer on the raw
texts (no template, but with the per-string BatchEncoding bookkeeping of ``tokenizer(...)``, which the
template skips, so the batched template can match it). The paths are interleaved over ``repeats`` rounds
(each round runs each path once), so load from other processes hits them alike: examples/s comes from a
path's best round, the speed-up over the loop is the median of the per-round ratios. The Rust backend runs
a batch on several threads unless TOKENIZERS_PARALLELISM=false, which matters on a busy machine, so the
header says how it was set. Texts come from ``<data root>/agnews/train.jsonl`` when present (the data root is
``$PROMPTDELTA_DATA``, else ``../shared/data`` relative to the working directory), else are synthesised;
either way they are repeated to N.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from promptdelta.data.examples import InputExample
from promptdelta.errors import ConfigError, DataError
from promptdelta.prompts.template import ManualTemplate

logger = logging.getLogger(__name__)

DATA_ROOT_ENV = "PROMPTDELTA_DATA"


def default_data() -> str:
    """``<data root>/agnews/train.jsonl``: the root is $PROMPTDELTA_DATA, else ../shared/data from the cwd."""
    root = os.environ.get(DATA_ROOT_ENV) or os.path.join("..", "shared", "data")
    return os.path.join(root, "agnews", "train.jsonl")


DEFAULT_DATA = None  # resolved by default_data() at call time, so the env var set after import still counts
DEFAULT_TEMPLATE = '{"placeholder":"text_a"} This article is about {"mask"}.'
_WORDS = ("market shares rose after the company reported strong quarterly earnings while rivals struggled "
          "team won the championship game in overtime as fans celebrated downtown scientists unveiled a new "
          "chip that promises faster wireless networks government officials met to discuss the peace talks "
          "oil prices fell sharply on monday amid concerns over supply").split()


def run_data_bench(n: int = 10_000, data: str | Path | None = DEFAULT_DATA, tokenizer: Any = "minilm",
                   batch_size: int = 1000, max_length: int = 128, repeats: int = 3,
                   template: str = DEFAULT_TEMPLATE) -> str:
    """Run the benchmark and return the table as text (also logged)."""
    _check_options(n, batch_size, max_length, repeats)
    texts, source = load_texts(default_data() if data is None else data, n)
    tok = _load_tokenizer(tokenizer)
    tmpl = ManualTemplate(template, tok)
    examples = [InputExample(t) for t in texts]
    chunks = [examples[i:i + batch_size] for i in range(0, n, batch_size)]
    raw = [texts[i:i + batch_size] for i in range(0, n, batch_size)]
    paths = {
        "template.tokenize, batched": (batch_size, lambda: [tmpl.tokenize(c, max_length) for c in chunks]),
        "template.tokenize, per-example loop": (1, lambda: [tmpl.tokenize([e], max_length) for e in examples]),
        "fast tokenizer only, no template": (batch_size, lambda: [tok(r, truncation=True, max_length=max_length)
                                                                  for r in raw]),
    }
    rounds = _interleaved({name: fn for name, (_, fn) in paths.items()}, repeats)
    rows = [(name, batch, rounds[name]) for name, (batch, _) in paths.items()]
    same = _same_rows(tmpl, examples[:200], max_length)
    table = _format(rows, n, source, tmpl.text, max_length, repeats, same)
    return table


def load_texts(data: str | Path | None, n: int) -> tuple[list[str], str]:
    """n texts (the file's "text" fields, repeated) and a description of where they came from."""
    path = Path(data) if data else None
    if path is None or not path.is_file():
        logger.info("no data file at %s: synthesising texts", data)
        return _repeat(_synthetic_texts(min(n, 1000)), n), "synthetic texts"
    texts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append(str(row["text"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{i} is not a JSON object with a \"text\" field; give a JSONL file of "
                            f'{{"text": ...}} lines (or no --data, to synthesise texts)') from None
        if len(texts) >= n:
            break
    if not texts:
        raise DataError(f"{path} holds no texts; give a JSONL file of {{\"text\": ...}} lines")
    return _repeat(texts, n), f"{path} ({len(texts)} distinct texts)"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``promptdelta bench data [--n N] [--data FILE] [--batch-size B] [--max-length L] ...``."""
    parser = argparse.ArgumentParser(prog="promptdelta bench data", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of examples (texts are repeated)")
    parser.add_argument("--data", default=None, help="JSONL file with a \"text\" field per line (default: "
                        f"$PROMPTDELTA_DATA/agnews/train.jsonl, else ../shared/data/agnews/train.jsonl)")
    parser.add_argument("--tokenizer", default="minilm", help="preset (minilm) or a tokenizer folder")
    parser.add_argument("--batch-size", type=int, default=1000, dest="batch_size")
    parser.add_argument("--max-length", type=int, default=128, dest="max_length")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (the best is kept)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="template text")
    args = parser.parse_args(argv)
    print(run_data_bench(args.n, args.data, args.tokenizer, args.batch_size, args.max_length, args.repeats,
                         args.template))
    return 0


def _check_options(n: int, batch_size: int, max_length: int, repeats: int) -> None:
    given = {"n": n, "batch_size": batch_size, "max_length": max_length, "repeats": repeats}
    defaults = {"n": 10_000, "batch_size": 1000, "max_length": 128, "repeats": 3}
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}; pass e.g. "
                              f"--{name.replace('_', '-')} {defaults[name]}")


def _load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as is; "minilm" (the preset) or a folder -> the HF fast tokenizer."""
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    import transformers

    from promptdelta.backbones.loading import PRESETS

    folder = PRESETS[tokenizer]() if tokenizer in PRESETS else Path(tokenizer)
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def _synthetic_texts(k: int) -> list[str]:
    """k news-like texts of 20-60 words, the same on every run."""
    rng = random.Random(0)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(20, 60))).capitalize() + "."
            for _ in range(k)]


def _repeat(texts: list[str], n: int) -> list[str]:
    return [texts[i % len(texts)] for i in range(n)]


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per round of every path; each round runs each path once (after a GC), so load from other
    processes hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _same_rows(tmpl: ManualTemplate, examples: list[InputExample], max_length: int) -> bool:
    """Whether the batched path gives each example exactly the ids of the per-example path."""
    batch = tmpl.tokenize(examples, max_length)
    for i, ex in enumerate(examples):
        one = tmpl.tokenize([ex], max_length)["input_ids"][0]
        if not torch.equal(batch["input_ids"][i, :int(batch["attention_mask"][i].sum())], one):
            return False
    return True


def _format(rows: list[tuple[str, int, list[float]]], n: int, source: str, template: str, max_length: int,
            repeats: int, same: bool) -> str:
    """examples/s from the best round; speed-up = median over rounds of (loop time / path time)."""
    loop = rows[1][2]
    lines = [f"Data pipeline: wrap + tokenise {n:,} texts from {source}",
             f"template {template}  max_length {max_length}  {repeats} interleaved rounds  "
             f"({torch.get_num_threads()} torch threads, TOKENIZERS_PARALLELISM="
             f"{os.environ.get('TOKENIZERS_PARALLELISM', 'unset')})",
             f"{'path':<38}{'batch':>7}{'best s':>9}{'examples/s':>13}{'vs loop':>9}"]
    for name, batch, secs in rows:
        speedup = statistics.median(lo / t for lo, t in zip(loop, secs))
        lines.append(f"{name:<38}{batch:>7}{min(secs):>9.3f}{n / min(secs):>13,.0f}{speedup:>8.1f}x")
    lines.append(f"batched rows identical to per-example rows: {'yes' if same else 'NO'} (first 200 examples)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
