"""``promptdelta bench report RESULTS [--out DIR] [--suite FILE]``: a results file -> markdown + CSV table and PNG plots.

Per task, shots and method: mean +- sample std over seeds of accuracy and macro-F1, plus trainable
parameters, train time, step time, eval throughput and peak memory (means). The best method per task
(highest mean accuracy) is marked. Plots (matplotlib, Agg backend, imported only here): accuracy against
trainable parameters (log scale) per task, a bar chart of methods with error bars, accuracy against
training time.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import statistics
from pathlib import Path
from typing import Any, Sequence

from promptdelta.bench.harness import latest_rows, read_results
from promptdelta.errors import ConfigError, DataError, MissingFileError
from promptdelta.utils.io import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

CSV_FIELDS = ["task", "shots", "method", "kind", "seeds", "dev_score_mean", "accuracy_mean", "accuracy_std", "macro_f1_mean",
              "macro_f1_std", "trainable_params", "trainable_pct", "train_time_s_mean", "step_time_s_mean",
              "eval_examples_per_s_mean", "train_mem_mb_mean", "peak_mem_mb_mean", "best"]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _mean_of_known(values: Sequence[Any]) -> float | None:
    """Mean of the values that are not None (rows written before a field existed lack it), else None."""
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def _mean_or_none(values: Sequence[Any]) -> float | None:
    return statistics.fmean(values) if values and all(v is not None for v in values) else None


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per (task, shots, method), in first-seen order; ``best`` marks the top mean accuracy
    of each (task, shots) (ties: all of them)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in latest_rows(rows):
        groups.setdefault((r["task"], r["shots"], r["method"]), []).append(r)
    out = []
    for (task, shots, method), rs in groups.items():
        acc, f1 = _mean_std([r["accuracy"] for r in rs]), _mean_std([r["macro_f1"] for r in rs])
        out.append({"task": task, "shots": shots, "method": method, "kind": rs[0].get("kind", ""),
                    "seeds": len(rs), "dev_score_mean": _mean_or_none([r.get("dev_score") for r in rs]),
                    "accuracy_mean": acc[0], "accuracy_std": acc[1], "macro_f1_mean": f1[0],
                    "macro_f1_std": f1[1], "trainable_params": max(r["trainable_params"] for r in rs),
                    "trainable_pct": max(r.get("trainable_pct", 0.0) for r in rs),
                    "train_time_s_mean": _mean_or_none([r.get("train_time_s") for r in rs]),
                    "step_time_s_mean": _mean_or_none([r.get("step_time_s") for r in rs]),
                    "eval_examples_per_s_mean": _mean_or_none([r.get("eval_examples_per_s") for r in rs]),
                    "train_mem_mb_mean": _mean_of_known([r.get("train_mem_mb") for r in rs]),
                    "peak_mem_mb_mean": _mean_or_none([r.get("peak_mem_mb") for r in rs]), "best": False})
    for s in out:
        peers = [o["accuracy_mean"] for o in out if (o["task"], o["shots"]) == (s["task"], s["shots"])]
        s["best"] = s["accuracy_mean"] == max(peers)
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """Markdown table; accuracy / macro-F1 in % as mean +- std; the best method per task in bold."""
    head = ("| task | shots | method | seeds | dev (%) | accuracy (%) | macro-F1 (%) | trainable | % of model | "
            "train (s) | step (ms) | eval ex/s | train mem (MiB) | RSS peak (MiB) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        acc = f"{100 * s['accuracy_mean']:.2f} ± {100 * s['accuracy_std']:.2f}"
        name = f"**{s['method']}** (best)" if s["best"] else s["method"]
        acc = f"**{acc}**" if s["best"] else acc
        step = None if s["step_time_s_mean"] is None else 1000 * s["step_time_s_mean"]
        dev = None if s.get("dev_score_mean") is None else 100 * s["dev_score_mean"]
        lines.append(f"| {s['task']} | {s['shots']} | {name} | {s['seeds']} | {_fmt(dev, '.2f')} | {acc} | "
                     f"{100 * s['macro_f1_mean']:.2f} ± {100 * s['macro_f1_std']:.2f} | "
                     f"{s['trainable_params']:,} | {s['trainable_pct']:.3f} | {_fmt(s['train_time_s_mean'], '.1f')} | "
                     f"{_fmt(step, '.1f')} | {_fmt(s['eval_examples_per_s_mean'], ',.0f')} | "
                     f"{_fmt(s['train_mem_mb_mean'], '.0f')} | {_fmt(s['peak_mem_mb_mean'], '.0f')} |")
    return "\n".join(lines)


def csv_text(summary: Sequence[dict[str, Any]]) -> str:
    """CSV of the summary (full-precision floats, as ``repr``), header ``CSV_FIELDS``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for s in summary:
        writer.writerow({k: ("" if s[k] is None else repr(s[k]) if isinstance(s[k], float) else s[k])
                         for k in CSV_FIELDS})
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ plots


def _panels(summary: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    panels: dict[str, list[dict[str, Any]]] = {}
    for s in summary:
        panels.setdefault(f"{s['task']} ({s['shots']}-shot)", []).append(s)
    return panels


def _figure(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _scatter(summary: Sequence[dict[str, Any]], x_key: str, x_label: str, path: Path) -> Path:
    panels = _panels(summary)
    plt, fig, axes = _figure(len(panels))
    for ax, (title, items) in zip(axes, panels.items()):
        for s in items:
            x = s[x_key] or 1e-3
            ax.errorbar(x, 100 * s["accuracy_mean"], yerr=100 * s["accuracy_std"], fmt="o", capsize=3)
            ax.annotate(s["method"], (x, 100 * s["accuracy_mean"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set(title=title, xlabel=x_label, ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def _bars(summary: Sequence[dict[str, Any]], path: Path) -> Path:
    panels = _panels(summary)
    plt, fig, axes = _figure(len(panels))
    for ax, (title, items) in zip(axes, panels.items()):
        xs = range(len(items))
        colors = ["tab:orange" if s["best"] else "tab:blue" for s in items]
        ax.bar(xs, [100 * s["accuracy_mean"] for s in items], yerr=[100 * s["accuracy_std"] for s in items],
               capsize=3, color=colors)
        ax.set_xticks(list(xs), [s["method"] for s in items], rotation=45, ha="right", fontsize=7)
        ax.set(title=title, ylabel="test accuracy (%), mean ± std over seeds")
        ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plots(summary: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """The three PNG plots; [] (with a warning) when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    out = Path(out_dir)
    return [_scatter(summary, "trainable_params", "trainable parameters (log scale)", out / "accuracy_vs_params.png"),
            _bars(summary, out / "accuracy_bars.png"),
            _scatter(summary, "train_time_s_mean", "train time per run, s (log scale)", out / "accuracy_vs_time.png")]


# ----------------------------------------------------------------------------------------- entry points


REPORT_FILES = ("report.md", "report.csv", "accuracy_vs_params.png", "accuracy_bars.png", "accuracy_vs_time.png")


def current_rows(rows: Sequence[dict[str, Any]], suite: str | Path) -> list[dict[str, Any]]:
    """The rows of runs in ``suite`` as it is now: same key and config hash. A row superseded by a config
    change and then brought back (an lr tried and reverted) no longer hides the current one."""
    from promptdelta.bench.suite import load_suite

    wanted = {(spec.key, spec.config_hash) for spec in load_suite(suite).expand()}
    first: dict[str, int] = {}
    for i, r in enumerate(rows):
        first.setdefault(r.get("key"), i)
    kept = sorted((r for r in rows if (r.get("key"), r.get("config_hash")) in wanted),
                  key=lambda r: first[r.get("key")])                 # each run at its first row's place
    if not kept:
        raise DataError(f"no row of the results file matches the current configuration of suite {suite}; "
                        "run it with `promptdelta bench run --suite ...` or report without --suite")
    return kept


def report(results: str | Path, out_dir: str | Path | None = None, with_plots: bool = True,
           overwrite: bool = False, suite: str | Path | None = None) -> dict[str, Any]:
    """Write ``report.md``, ``report.csv`` and the plots to ``out_dir`` (default ``<results stem>_report``
    next to the results file); returns ``{"markdown", "summary", "files"}``. An existing report there is
    replaced only with ``overwrite``. With ``suite``, only rows of that suite's current configuration count
    (``current_rows``); without it, the last row written for each run."""
    results = Path(results)
    if not results.is_file():
        raise MissingFileError(f"results file {results} does not exist; run `promptdelta bench run --suite FILE "
                               f"--results {results}` first")
    rows = read_results(results)
    if not rows:
        raise DataError(f"results file {results} holds no finished runs; run the suite first")
    if suite is not None:
        rows = current_rows(rows, suite)
    out = Path(out_dir) if out_dir else results.with_name(results.stem + "_report")
    existing = [n for n in REPORT_FILES if (out / n).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{out} already holds a report ({', '.join(existing)}); pass --overwrite to replace it "
                          "(the results file is never changed) or choose another --out folder")
    summary = summarise(rows)
    md = markdown_table(summary)
    files = [atomic_write_text(out / "report.md", f"# Benchmark report: {results.name}\n\n{md}\n\n"
                                                  "Best mean accuracy per task in bold; ± is the sample std "
                                                  "over seeds.\n"),
             atomic_write_text(out / "report.csv", csv_text(summary))]
    if with_plots:
        files += plots(summary, out)
    return {"markdown": md, "summary": summary, "files": [str(f) for f in files]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="promptdelta bench report", description=__doc__.splitlines()[0])
    p.add_argument("results", help="results JSONL written by `promptdelta bench run`")
    p.add_argument("--out", help="output folder (default: <results stem>_report next to the results file)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in the output folder")
    p.add_argument("--suite", help="count only rows of this suite file's current configuration (runs "
                                   "re-run with another config and then reverted show their current rows)")
    args = p.parse_args(argv)
    result = report(args.results, args.out, with_plots=not args.no_plots, overwrite=args.overwrite,
                    suite=args.suite)
    print(result["markdown"])
    print("\nwrote " + ", ".join(result["files"]))
    return 0
