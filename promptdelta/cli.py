"""Command line: ``promptdelta run | bench | info``.

``promptdelta run --config examples/configs/demo.yaml --shots 16 --seeds 13,21``: flags override the YAML.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from promptdelta.errors import PromptDeltaError


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, e.g. 13,21,42; got {text!r}")


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="few-shot prompt-based classification over seeds; writes runs/<name>/")
    p.add_argument("--config", help="YAML run config (see examples/configs/)")
    p.add_argument("--name", help="run folder name under --output-dir (never overwritten)")
    p.add_argument("--backbone", help="preset (minilm), local HF folder, or hub id")
    p.add_argument("--data", help="data folder (train/dev/test.jsonl + labels.txt), CSV, or builtin:demo")
    p.add_argument("--template", help="template text or template file")
    p.add_argument("--template-choice", type=int, dest="template_choice")
    p.add_argument("--template-type", dest="template_type", choices=["manual", "mixed", "soft", "ptuning"])
    p.add_argument("--verbalizer", choices=["manual", "soft", "proto", "kpt"])
    p.add_argument("--label-words", dest="label_words", help="verbalizer file (OpenPrompt format)")
    p.add_argument("--delta", help="delta method (lora, bitfit) or none (full fine-tuning)")
    p.add_argument("--shots", type=int, help="k examples per class for train and for dev")
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds, e.g. 13,21,42,87,100")
    p.add_argument("--max-length", type=int, dest="max_length")
    p.add_argument("--output-dir", dest="output_dir")
    p.add_argument("--lr", type=float, dest="train.lr")
    p.add_argument("--epochs", type=int, dest="train.epochs")
    p.add_argument("--max-steps", type=int, dest="train.max_steps")
    p.add_argument("--batch-size", type=int, dest="train.batch_size")
    p.add_argument("--device", dest="train.device")
    p.add_argument("--no-progress", action="store_false", dest="train.progress", default=None)


BENCHES = {
    "kernel": "frozen linear vs plain LoRA vs fused LoRA vs merged, side by side",
    "backbone": "native backbones vs transformers with the same weights, forward and forward+backward",
    "data": "template wrapping + tokenisation throughput",
    "deltas": "one training step per delta method: trainable params, step time, peak memory",
    "run": "run a suite of (task, method, shots, seed) few-shot runs, resumable; prints the summary table",
    "report": "summary table (markdown, CSV) and plots from a suite's results file",
}


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHES),
                       description="\n".join(f"{k}: {v}" for k, v in BENCHES.items()))
    p.add_argument("bench_cmd", choices=sorted(BENCHES), help="which benchmark")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="its own options (see --help of each)")


def cmd_run(args: argparse.Namespace) -> int:
    from promptdelta.config import RunConfig
    from promptdelta.run import run

    config = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    keys = ["name", "backbone", "data", "template", "template_choice", "template_type", "verbalizer", "label_words", "shots",
            "seeds", "max_length", "output_dir", "train.lr", "train.epochs", "train.max_steps",
            "train.batch_size", "train.device", "train.progress"]
    overrides = {k: getattr(args, k) for k in keys}
    if args.delta is not None:
        same = isinstance(config.delta, dict) and config.delta.get("method") == args.delta
        overrides["delta"] = config.delta if same else args.delta
    config = config.with_overrides(**overrides)
    print(f"promptdelta run: backbone={config.backbone} data={config.data} verbalizer={config.verbalizer} "
          f"delta={config.delta} shots={config.shots} seeds={config.seeds}", flush=True)
    result = run(config, echo=lambda s: print(s, flush=True))
    print()
    print(result["table"])
    if result["run_dir"]:
        print(f"\nwrote {result['run_dir']}/ (config.yaml, metrics.json, per-seed delta checkpoints)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    try:
        module = importlib.import_module(f"promptdelta.bench.{args.bench_cmd}")
    except ModuleNotFoundError as e:
        if e.name != f"promptdelta.bench.{args.bench_cmd}":
            raise
        print(f"error: the {args.bench_cmd} benchmark is not part of this version of promptdelta",
              file=sys.stderr)
        return 2
    return int(module.main(args.bench_args) or 0)


def cmd_info(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import promptdelta
    from promptdelta.deltas.base import registered_deltas

    info = {"promptdelta": promptdelta.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
            "deltas": sorted(registered_deltas())}
    print(json.dumps(info, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="promptdelta", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_run(sub)
    _add_bench(sub)
    sub.add_parser("info", help="versions and registered methods")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    handlers = {"run": cmd_run, "bench": cmd_bench, "info": cmd_info}
    try:
        return handlers[args.cmd](args)
    except PromptDeltaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
