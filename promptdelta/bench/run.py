"""``promptdelta bench run --suite FILE [--results FILE] [--only PATTERN ...] [--workers N] [--dry-run]``.

Runs every unfinished (task, method, shots, seed) of a suite, appending one JSON line per finished run to
the results file (default ``bench_results/<suite name>.jsonl``); re-running resumes an interrupted suite.
Then prints the summary table (``promptdelta bench report RESULTS`` writes it with plots).

``--workers N`` checks the suite once, then starts N worker processes on the same results file, each with
``cores // N`` torch threads; a worker takes the next run no other process has claimed (a claim is a file
per run made with O_EXCL in ``.<results name>.claims/`` next to the results, holding pid and host; claims of
dead pids are taken over), so the load balances itself, and independent ``bench run`` commands on one
results file share the work too. Workers die
with the parent (:func:`promptdelta.utils.proc.die_with_parent`): killing ``bench run`` stops them all.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

from promptdelta.bench.harness import claims_dir, pending, preflight, read_results, run_suite
from promptdelta.bench.suite import Suite, load_suite
from promptdelta.errors import ConfigError, PromptDeltaError
from promptdelta.utils.proc import WATCH_ENV, die_with_parent


def default_results(suite_name: str) -> Path:
    return Path("bench_results") / f"{suite_name}.jsonl"


def _run_workers(s: Suite, suite: str, path: Path, only: Sequence[str] | None, device: str | None, workers: int,
                 threads: int | None) -> None:
    """Check suite ``s`` (loaded from the file ``suite``) in this process, then run it in ``workers`` child
    processes sharing a claims folder."""
    from promptdelta.backbones import load_backbone

    read_results(path, repair=True)
    todo, _ = pending(s, path, only)
    if not todo:
        return
    base, tokenizer = load_backbone(s.backbone)
    preflight(s, todo, base, tokenizer)
    del base, tokenizer
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    claims = str(claims_dir(path))                # shared with any other `bench run` on this results file
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           WATCH_ENV: str(os.getpid())}
    cmd = [sys.executable, "-m", "promptdelta.bench.run", "--suite", str(suite), "--results", str(path),
           "--claims", claims, "--threads", str(threads)]
    cmd += ["--device", device] if device else []
    cmd += ["--only", *only] if only else []
    print(f"{len(todo)} run(s) to do: {workers} workers of {threads} thread(s) each", flush=True)
    procs = [subprocess.Popen(cmd, env=env) for _ in range(workers)]
    try:
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
    failed = [i for i, c in enumerate(codes) if c != 0]
    if failed:
        raise PromptDeltaError(f"bench worker(s) {failed} exited with codes {[codes[i] for i in failed]}; the "
                               f"runs they finished are in {path}: re-run the same command to finish the rest.")


def run_run_bench(suite: str, results: str | None = None, only: Sequence[str] | None = None,
                  device: str | None = None, dry_run: bool = False, workers: int = 1,
                  threads: int | None = None, claims: str | None = None) -> str:
    """Run (or with ``dry_run`` list) the suite's unfinished runs; returns the summary table as text."""
    from promptdelta.bench.report import markdown_table, summarise

    if workers < 1:
        raise ConfigError(f"--workers {workers}: pass 1 or more worker processes.")
    s = load_suite(suite)
    if device:
        s.device = device
    path = Path(results) if results else default_results(s.name)
    if dry_run:
        todo, finished = pending(s, path, only)
        return "\n".join([f"{finished} run(s) finished in {path}; {len(todo)} to run:"]
                         + [f"  {spec.key}" for spec in todo])
    if workers > 1:
        _run_workers(s, suite, path, only, device, workers, threads)
    else:
        if threads:
            torch.set_num_threads(threads)
        run_suite(s, path, only=only, echo=lambda line: print(line, flush=True), claims=claims,
                  check=claims is None)
        if claims is not None:
            return ""                                                          # a worker: the parent reports
    rows = [r for r in read_results(path) if r.get("suite") == s.name]
    return markdown_table(summarise(rows)) if rows else "no finished runs"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="promptdelta bench run", description=__doc__.splitlines()[0])
    p.add_argument("--suite", required=True, help="suite YAML (see examples/bench/)")
    p.add_argument("--results", help="results JSONL (default bench_results/<suite name>.jsonl)")
    p.add_argument("--only", nargs="+", metavar="PATTERN",
                   help="run only tasks/methods matching: a name, task/method, or fnmatch wildcards")
    p.add_argument("--device", help="cpu or cuda (overrides the suite's device)")
    p.add_argument("--workers", type=int, default=1,
                   help="parallel worker processes sharing the results file (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: cores // workers)")
    p.add_argument("--claims", help=argparse.SUPPRESS)                        # set by the parent for workers
    p.add_argument("--dry-run", action="store_true", help="list the runs still to do and exit")
    args = p.parse_args(argv)
    if args.claims is not None:                  # a worker: never outlive the `bench run` that started it
        die_with_parent()
    out = run_run_bench(args.suite, args.results, args.only, args.device, args.dry_run, args.workers,
                        args.threads, args.claims)
    if out:
        print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
