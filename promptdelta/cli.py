"""Command line: ``promptdelta run | predict | bench | info``.

``promptdelta run --config examples/configs/demo.yaml --shots 16 --seeds 13,21``: flags override the YAML.
``promptdelta run --nproc 2 ...`` runs the same command on 2 local data-parallel processes (torchrun).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from promptdelta.errors import ConfigError, PromptDeltaError
from promptdelta.train.distributed import env_is_main, env_world_size, launch, shutdown_distributed
from promptdelta.utils.proc import WATCH_ENV, die_with_parent


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, e.g. 13,21,42; got {text!r}")


def _columns(text: str) -> dict[str, str]:
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise argparse.ArgumentTypeError(f"--columns takes field=column pairs, e.g. text=sentence,label=y; "
                                         f"got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def _delta_names() -> list[str]:
    """The registered delta methods, for --help (the registry fills on importing promptdelta.deltas)."""
    from promptdelta.info import _deltas

    return _deltas()


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="few-shot prompt-based classification over seeds; writes runs/<name>/")
    p.add_argument("--config", help="YAML run config (see examples/configs/)")
    p.add_argument("--recipe", choices=["auto"], help="auto: try a bounded set of methods, keep the best on dev "
                                                      "(promptdelta/recipe.py)")
    p.add_argument("--name", help="run folder name under --output-dir (never overwritten)")
    p.add_argument("--backbone", help="preset (minilm), local HF folder, or hub id")
    p.add_argument("--data", help="data folder (train/dev/test.jsonl + labels.txt), CSV, or builtin:demo")
    p.add_argument("--columns", type=_columns,
                   help="your column names, e.g. text=sentence,label=y (fields: text, text_b, label)")
    p.add_argument("--template", help="template text or template file")
    p.add_argument("--template-choice", type=int, dest="template_choice")
    p.add_argument("--template-type", dest="template_type", choices=["manual", "mixed", "soft", "ptuning"])
    p.add_argument("--verbalizer", choices=["manual", "soft", "proto", "kpt"])
    p.add_argument("--label-words", dest="label_words", help="verbalizer file (OpenPrompt format)")
    p.add_argument("--delta", help=f"delta method ({', '.join(_delta_names())}), none (full fine-tuning) or "
                                   f"frozen (only the template / verbalizer train)")
    p.add_argument("--shots", type=int, help="k examples per class for train and for dev")
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds, e.g. 13,21,42,87,100")
    p.add_argument("--max-length", type=int, dest="max_length")
    p.add_argument("--output-dir", dest="output_dir")
    p.add_argument("--lr", type=float, dest="train.lr")
    p.add_argument("--head-lr", type=float, dest="train.head_lr",
                   help="lr of the template's and verbalizer's own parameters (default: --lr)")
    p.add_argument("--epochs", type=int, dest="train.epochs")
    p.add_argument("--max-steps", type=int, dest="train.max_steps")
    p.add_argument("--batch-size", type=int, dest="train.batch_size")
    p.add_argument("--device", dest="train.device")
    p.add_argument("--no-progress", action="store_false", dest="train.progress", default=None)
    g = p.add_argument_group("scale and faults")
    g.add_argument("--nproc", type=int, default=1,
                   help="local data-parallel processes (torchrun; gloo on CPU, NCCL on GPU); default 1")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], dest="train.precision",
                   help="fp32, bf16 autocast (CPU and GPU) or fp16 with loss scaling (GPU)")
    g.add_argument("--grad-accum", type=int, dest="train.grad_accum", help="micro-batches per optimizer step")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   dest="train.gradient_checkpointing", help="recompute layer activations in backward (less memory)")
    g.add_argument("--fsdp", action="store_true", default=None, dest="train.fsdp",
                   help="with --nproc N: shard every weight over the ranks, layer by layer (FSDP2); fp32/bf16 only")
    g.add_argument("--checkpoint-dir", dest="train.checkpoint_dir",
                   help="training checkpoints go to <dir>/seed<N>/ (atomic, the newest K kept)")
    g.add_argument("--checkpoint-every", type=int, dest="train.checkpoint_every",
                   help="also checkpoint every N optimizer steps (always at the end)")
    g.add_argument("--resume", action="store_true", default=None, dest="train.resume",
                   help="continue the run whose checkpoints are in --checkpoint-dir, in its own folder; refuses "
                        "when any setting that changes results differs; finished seeds are kept as they are")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run folder --name if it exists (default: write <name>-2, never overwrite)")


BENCHES = {
    "kernel": "frozen linear vs plain LoRA vs fused LoRA vs merged, side by side",
    "backbone": "native backbones vs transformers with the same weights, forward and forward+backward",
    "data": "template wrapping + tokenisation throughput",
    "deltas": "one training step per delta method: trainable params, step time, peak memory",
    "run": "run a suite of (task, method, shots, seed) few-shot runs, resumable; prints the summary table",
    "report": "summary table (markdown, CSV) and plots from a suite's results file",
    "train": "full fine-tuning with/without activation checkpointing; LoRA throughput on 1 vs N gloo processes",
    "predict": "predict (merged, unmerged) vs a transformers forward in input order; 4-delta mixed batch vs "
               "4 single-delta passes",
    "peers": "promptdelta vs PEFT, method by method: step and inference time, peak memory, one process per row",
}


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="label texts with a saved classifier (a seed folder of `promptdelta run`)")
    p.add_argument("--model", action="append", required=True,
                   help="classifier folder (clf.save_pretrained / runs/<name>/seed<N>); repeat for several "
                        "classifiers that share a backbone")
    p.add_argument("--input", required=True, help="JSONL, CSV or text file (one input per line), or - for stdin")
    p.add_argument("--output", help="output file, .jsonl or .csv (default: JSONL on stdout)")
    p.add_argument("--columns", help="field=column pairs, e.g. text=review,text_b=premise (default: text)")
    p.add_argument("--input-format", choices=["jsonl", "csv", "text"], help="default: from the suffix "
                   "(stdin: jsonl when it starts with '{', else text)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--top-k", type=int, help="keep the k most probable classes per row")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar on stderr")


def cmd_predict(args: argparse.Namespace) -> int:
    from promptdelta.predict import run_predict

    n = run_predict(args.model, args.input, args.output, columns=args.columns, batch_size=args.batch_size,
                    top_k=args.top_k, input_format=args.input_format, device=args.device,
                    overwrite=args.overwrite, progress=args.progress)
    if args.output and args.output != "-":
        print(f"wrote {n} predictions to {args.output}", file=sys.stderr)
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHES),
                       description="\n".join(f"{k}: {v}" for k, v in BENCHES.items()))
    p.add_argument("bench_cmd", choices=sorted(BENCHES), help="which benchmark")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="its own options (see --help of each)")


_RUN_KEYS = ["name", "backbone", "data", "columns", "template", "template_choice", "template_type", "verbalizer",
             "label_words", "shots", "seeds", "max_length", "output_dir", "train.lr", "train.head_lr", "train.epochs",
             "train.max_steps", "train.batch_size", "train.device", "train.progress", "train.precision",
             "train.grad_accum", "train.gradient_checkpointing", "train.fsdp", "train.checkpoint_dir",
             "train.checkpoint_every", "train.resume"]


def run_config_from_args(args: argparse.Namespace):
    """The RunConfig of ``promptdelta run``: the YAML (or the defaults), then every flag that was given."""
    from promptdelta.config import RunConfig

    config = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    overrides = {k: getattr(args, k) for k in _RUN_KEYS}
    if args.delta is not None:
        same = isinstance(config.delta, dict) and config.delta.get("method") == args.delta
        overrides["delta"] = config.delta if same else args.delta
    return config.with_overrides(**overrides)


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` less ``--nproc N`` / ``--nproc=N`` (or an abbreviation argparse accepted): the ranks do not need
    it, and torchrun's own parser would reject it as an ambiguous prefix of its ``--nproc-per-node``."""
    out, items = [], iter(argv)
    for arg in items:
        flag = arg.split("=", 1)[0]
        if len(flag) > 3 and "--nproc".startswith(flag):
            if "=" not in arg:
                next(items, None)
            continue
        out.append(arg)
    return out


def _launch_ranks(args: argparse.Namespace, config) -> int:
    """Re-run this command line on ``--nproc`` local ranks (inside them WORLD_SIZE > 1, so no relaunch)."""
    if config.train.device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < args.nproc:
            raise ConfigError(f"--nproc {args.nproc} with device=cuda needs {args.nproc} GPUs, found "
                              f"{torch.cuda.device_count()}; lower --nproc or use --device cpu (gloo)")
    print(f"promptdelta run: launching {args.nproc} data-parallel processes", flush=True)
    os.environ[WATCH_ENV] = str(os.getpid())     # the ranks inherit it: they die with this command
    rc = launch(args.nproc, _without_nproc(args.argv))
    if rc != 0:
        print(f"error: a rank of the {args.nproc}-process run failed (exit code {rc}); see its output above",
              file=sys.stderr)
    return rc


def cmd_run(args: argparse.Namespace) -> int:
    from promptdelta.run import run

    config = run_config_from_args(args)
    if getattr(args, "recipe", None) == "auto":             # the automatic recipe, chosen on dev (recipe.py)
        from promptdelta.recipe import run_recipe

        result = run_recipe(config, echo=lambda s: print(s, flush=True), overwrite=args.overwrite)
        best = max(result["seeds"], key=lambda r: r["dev"])["seed"]     # chosen on dev; ties: the first seed
        print(f"\nwrote {result['run_dir']}/ (config.yaml, metrics.json, one folder per seed: the recipe's choice); "
              f"best seed on dev: seed{best}; predict with: promptdelta predict --model {result['run_dir']}/seed{best} "
              f"--input FILE")
        return 0
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc} must be >= 1 (the number of local processes)")
    if args.nproc > 1 and env_world_size() == 1:
        return _launch_ranks(args, config)
    if env_world_size() > 1:                     # a torchrun rank: never outlive the agent or the command
        die_with_parent()
    is_main = env_is_main()
    if is_main:
        print(f"promptdelta run: backbone={config.backbone} data={config.data} verbalizer={config.verbalizer} "
              f"delta={config.delta} shots={config.shots} seeds={config.seeds}", flush=True)
    try:
        result = run(config, echo=lambda s: print(s, flush=True), overwrite=args.overwrite)
    except BaseException:
        shutdown_distributed(wait=False)
        raise
    shutdown_distributed()
    if is_main:
        print()
        print(result["table"])
    if result["run_dir"]:
        best = result["summary"].get("best_seed_dir")
        print(f"\nwrote {result['run_dir']}/ (config.yaml, metrics.json, one classifier folder per seed)")
        if best:
            print(f"best seed on dev: {best}; predict with: promptdelta predict --model {result['run_dir']}/{best} "
                  f"--input FILE")
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
    from promptdelta.info import collect_info, format_info

    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptdelta", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_run(sub)
    _add_predict(sub)
    _add_bench(sub)
    info = sub.add_parser("info", help="versions, native-kernel status, registered deltas / templates / "
                                       "verbalizers, GPU and Triton")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level if env_is_main() else max(level, logging.WARNING),  # ranks > 0: warnings only
                        format="%(levelname)s %(name)s: %(message)s")
    handlers = {"run": cmd_run, "predict": cmd_predict, "bench": cmd_bench, "info": cmd_info}
    try:
        return handlers[args.cmd](args)
    except PromptDeltaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
