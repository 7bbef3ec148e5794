"""``promptdelta bench run --suite FILE [--results FILE] [--only PATTERN ...] [--dry-run]``.

Runs every unfinished (task, method, shots, seed) of a suite, appending one JSON line per finished run to
the results file (default ``bench_results/<suite name>.jsonl``); re-running resumes an interrupted suite.
Then prints the summary table (``promptdelta bench report RESULTS`` writes it with plots).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from promptdelta.bench.harness import pending, run_suite
from promptdelta.bench.suite import load_suite


def default_results(suite_name: str) -> Path:
    return Path("bench_results") / f"{suite_name}.jsonl"


def run_run_bench(suite: str, results: str | None = None, only: Sequence[str] | None = None,
                  device: str | None = None, dry_run: bool = False) -> str:
    """Run (or with ``dry_run`` list) the suite's unfinished runs; returns the summary table as text."""
    from promptdelta.bench.report import markdown_table, summarise
    from promptdelta.bench.harness import read_results

    s = load_suite(suite)
    if device:
        s.device = device
    path = Path(results) if results else default_results(s.name)
    if dry_run:
        todo, finished = pending(s, path, only)
        return "\n".join([f"{finished} run(s) finished in {path}; {len(todo)} to run:"]
                         + [f"  {spec.key}" for spec in todo])
    run_suite(s, path, only=only, echo=lambda line: print(line, flush=True))
    rows = [r for r in read_results(path) if r.get("suite") == s.name]
    return markdown_table(summarise(rows)) if rows else "no finished runs"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="promptdelta bench run", description=__doc__.splitlines()[0])
    p.add_argument("--suite", required=True, help="suite YAML (see examples/bench/)")
    p.add_argument("--results", help="results JSONL (default bench_results/<suite name>.jsonl)")
    p.add_argument("--only", nargs="+", metavar="PATTERN",
                   help="run only tasks/methods matching: a name, task/method, or fnmatch wildcards")
    p.add_argument("--device", help="cpu or cuda (overrides the suite's device)")
    p.add_argument("--dry-run", action="store_true", help="list the runs still to do and exit")
    args = p.parse_args(argv)
    print(run_run_bench(args.suite, args.results, args.only, args.device, args.dry_run))
    return 0
