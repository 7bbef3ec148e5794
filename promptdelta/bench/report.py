"""``promptdelta bench report RESULTS... [--out DIR] [--suite FILE]``: results -> markdown + CSV table and PNG plots.

Per task, shots and method: mean +- sample std over seeds of accuracy and macro-F1, plus trainable
parameters, train time, step time, eval throughput and peak memory (means). The best method per task is the
highest mean **dev** score (selection on test would be selection on the test set); its test score is beside
it. Only each method's current configuration counts: the suite's (``--suite``, or ``examples/bench/<name>.yaml``
found from the rows' suite name), else the configuration of each method's newest row; older rows are left
out with a warning. Several results files combine into one report. Plots (matplotlib, Agg backend, imported
only here): accuracy against trainable parameters and against training time (log axes; methods with zero
parameters or zero training time sit in their own strip at 0), and bars per task; one method order and one
colour per method across every panel, a chance line (1 / classes) per task, a shared legend.
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
SUITE_DIRS = (Path("examples") / "bench", Path(__file__).resolve().parents[2] / "examples" / "bench")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _mean_of_known(values: Sequence[Any]) -> float | None:
    """Mean of the values that are not None (rows written before a field existed lack it), else None."""
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def _mean_or_none(values: Sequence[Any]) -> float | None:
    return statistics.fmean(values) if values and all(v is not None for v in values) else None


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per (task, shots, method), in first-seen order; ``best`` marks the top mean dev score
    of each (task, shots) (ties: all of them; methods without a dev score are not candidates)."""
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
        peers = [o["dev_score_mean"] for o in out if (o["task"], o["shots"]) == (s["task"], s["shots"])
                 and o["dev_score_mean"] is not None]
        s["best"] = s["dev_score_mean"] is not None and s["dev_score_mean"] == max(peers)
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """Markdown table; accuracy / macro-F1 in % as mean +- std; the best method per task (on dev) in bold."""
    head = ("| task | shots | method | seeds | dev (%) | accuracy (%) | macro-F1 (%) | trainable | % of model | "
            "train (s) | step (ms) | eval ex/s | train mem (MiB) | RSS peak (MiB) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        acc = f"{100 * s['accuracy_mean']:.2f} ± {100 * s['accuracy_std']:.2f}"
        name = f"**{s['method']}** (best on dev)" if s["best"] else s["method"]
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

MARKERS = "osD^vP*Xhp<>"


def _panels(summary: Sequence[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    panels: dict[tuple, list[dict[str, Any]]] = {}
    for s in summary:
        panels.setdefault((s["task"], s["shots"]), []).append(s)
    return panels


def _styles(summary: Sequence[dict[str, Any]]) -> dict[str, tuple[Any, str]]:
    """One (colour, marker) per method, in summary order, the same in every panel and plot."""
    import matplotlib

    methods = list(dict.fromkeys(s["method"] for s in summary))
    palette = matplotlib.colormaps["tab20"].colors if len(methods) > 10 else matplotlib.colormaps["tab10"].colors
    return {m: (palette[i % len(palette)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(methods)}


LEGEND_COLS = 4


def _figure(n: int, n_methods: int):
    """Panels, 2 per row, plus room below for a legend of ``n_methods`` entries (README width: ~10 in)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    legend_in = 0.45 + 0.19 * -(-n_methods // LEGEND_COLS)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows + legend_in), squeeze=False)
    fig.legend_in = legend_in
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _chance(ax, chance: float | None) -> None:
    if chance:
        ax.axhline(100 * chance, color="0.2", linestyle=":", linewidth=1.3, zorder=3)


def _title(task: str, shots: Any) -> str:
    return f"{task} ({shots}-shot)"


def _scatter(summary: Sequence[dict[str, Any]], x_key: str, x_label: str, zero_label: str, path: Path,
             chance: dict[str, float]) -> Path:
    """Accuracy against a log-scaled x; x == 0 (no parameters / no training) goes to a strip left of the axis
    break, labelled ``zero_label``, instead of being faked onto the log axis."""
    styles, panels = _styles(summary), _panels(summary)
    plt, fig, axes = _figure(len(panels), len(styles))
    def real(v: float | None) -> bool:  # a zero-shot row's "training" takes microseconds: that is none
        return v is not None and v >= 1e-3

    positive = [s[x_key] for s in summary if real(s[x_key])]
    lo, hi = (min(positive), max(positive)) if positive else (1.0, 10.0)
    zero_x = lo / 12           # the zero strip: one decade and a bit left of the smallest real value
    for ax, ((task, shots), items) in zip(axes, panels.items()):
        for s in items:
            if s[x_key] is None:
                continue
            color, marker = styles[s["method"]]
            x = s[x_key] if real(s[x_key]) else zero_x
            ax.errorbar(x, 100 * s["accuracy_mean"], yerr=100 * s["accuracy_std"], fmt=marker, color=color,
                        markersize=6, capsize=2, elinewidth=0.8, markeredgecolor="black" if s["best"] else color,
                        markeredgewidth=1.4 if s["best"] else 0.5)
        ax.set_xscale("log")
        ax.set_xlim(zero_x / 2.5, hi * 2.5)
        ax.axvline((zero_x * lo) ** 0.5, color="0.6", linewidth=0.8, linestyle="--")
        ticks = [t for t in ax.get_xticks() if lo / 1.01 <= t <= hi * 2.5]
        ax.set_xticks([zero_x] + ticks, [zero_label] + [f"$10^{{{round(__import__('math').log10(t))}}}$"
                                                        for t in ticks])
        ax.minorticks_off()
        _chance(ax, chance.get(task))
        ax.set_title(_title(task, shots), fontsize=10)
        ax.set_xlabel(x_label, fontsize=9)
        ax.set_ylabel("test accuracy (%)", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    _legend(fig, styles, "black edge: best on dev; error bars: std over seeds; dotted: chance (1 / classes)")
    return _save(plt, fig, path)


def _bars(summary: Sequence[dict[str, Any]], path: Path, chance: dict[str, float]) -> Path:
    styles, panels = _styles(summary), _panels(summary)
    plt, fig, axes = _figure(len(panels), len(styles))
    order = list(styles)
    for ax, ((task, shots), items) in zip(axes, panels.items()):
        by_method = {s["method"]: s for s in items}
        xs = [i for i, m in enumerate(order) if m in by_method]
        cells = [by_method[order[i]] for i in xs]
        ax.bar(xs, [100 * s["accuracy_mean"] for s in cells], yerr=[100 * s["accuracy_std"] for s in cells],
               capsize=1.5, error_kw={"elinewidth": 0.7}, color=[styles[s["method"]][0] for s in cells],
               edgecolor=["black" if s["best"] else "none" for s in cells], linewidth=1.6)
        _chance(ax, chance.get(task))
        ax.set_xticks(range(len(order)), [str(i + 1) for i in range(len(order))], fontsize=7)
        ax.set_xlim(-0.7, len(order) - 0.3)
        ax.set_title(_title(task, shots), fontsize=10)
        ax.set_ylabel("test accuracy (%)", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    _legend(fig, styles, "mean test accuracy over seeds (± std); black edge: best on dev; dotted: chance",
            numbered=True)
    return _save(plt, fig, path)


def _legend(fig, styles: dict[str, tuple[Any, str]], note: str, numbered: bool = False) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker=m, linestyle="", markersize=6) for c, m in styles.values()]
    labels = [f"{i + 1} {m}" if numbered else m for i, m in enumerate(styles)]
    fig.legend(handles, labels, loc="lower center", ncol=min(LEGEND_COLS, len(labels)), fontsize=8, frameon=False,
               title=note, title_fontsize=8, borderaxespad=0.2, handletextpad=0.3, columnspacing=1.2)
    fig.tight_layout(rect=(0, fig.legend_in / fig.get_figheight(), 1, 1))


def _save(plt, fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})  # no version stamp: same bytes
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plots(summary: Sequence[dict[str, Any]], out_dir: str | Path, chance: dict[str, float] | None = None
          ) -> list[Path]:
    """The three PNG plots; [] (with a warning) when matplotlib is not installed. ``chance``: task -> the
    accuracy of guessing (1 / classes), drawn as a dotted line."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    out, chance = Path(out_dir), chance or {}
    return [_scatter(summary, "trainable_params", "trainable parameters (log scale)", "0", out /
                     "accuracy_vs_params.png", chance),
            _bars(summary, out / "accuracy_bars.png", chance),
            _scatter(summary, "train_time_s_mean", "train time per run, s (log scale)", "none",
                     out / "accuracy_vs_time.png", chance)]


# ----------------------------------------------------------------------------------------- entry points


REPORT_FILES = ("report.md", "report.csv", "accuracy_vs_params.png", "accuracy_bars.png", "accuracy_vs_time.png")


def current_rows(rows: Sequence[dict[str, Any]], suite: Any) -> list[dict[str, Any]]:
    """The rows of runs in ``suite`` (a path or a loaded Suite) as it is now: same key and config hash, each
    run at its first row's place. The suite's data need not exist here (its path is part of the hash as
    written, not as resolved)."""
    from promptdelta.bench.suite import load_suite

    loaded = load_suite(suite, check_data=False) if isinstance(suite, (str, Path)) else suite
    wanted = {(spec.key, spec.config_hash) for spec in loaded.expand()}
    first: dict[str, int] = {}
    for i, r in enumerate(rows):
        first.setdefault(r.get("key"), i)
    kept = sorted((r for r in rows if (r.get("key"), r.get("config_hash")) in wanted),
                  key=lambda r: first[r.get("key")])                 # each run at its first row's place
    if not kept:
        raise DataError(f"no row of the results file matches the current configuration of suite {suite}; "
                        "run it with `promptdelta bench run --suite ...` or report without --suite")
    return kept


def newest_config_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Without a suite: per (task, shots, method), only rows of the configuration of its newest row."""
    newest = {(r["task"], r["shots"], r["method"]): r.get("config_hash") for r in rows}
    return [r for r in rows if r.get("config_hash") == newest[(r["task"], r["shots"], r["method"])]]


def find_suite(rows: Sequence[dict[str, Any]]) -> Path | None:
    """``examples/bench/<suite name>.yaml`` (from the cwd, then the repository) when the rows name one suite."""
    names = {r.get("suite") for r in rows}
    if len(names) != 1 or not isinstance(next(iter(names)), str):
        return None
    name = next(iter(names))
    return next((d / f"{name}.yaml" for d in SUITE_DIRS if (d / f"{name}.yaml").is_file()), None)


def _order(summary: list[dict[str, Any]], suite: Any) -> list[dict[str, Any]]:
    """Tasks and methods in the suite's order (first-seen order for anything the suite lacks)."""
    tasks, methods = list(suite.tasks), list(suite.methods)
    def rank(s: dict[str, Any]) -> tuple:
        return (tasks.index(s["task"]) if s["task"] in tasks else len(tasks), s["shots"],
                methods.index(s["method"]) if s["method"] in methods else len(methods))
    return sorted(summary, key=rank)  # stable: first-seen order among equals


def chance_levels(suite: Any) -> dict[str, float]:
    """task -> 1 / number of classes, from the suite's label words or classes (where it lists them)."""
    out = {}
    for name, task in (suite.tasks.items() if suite is not None else ()):
        per_class = task.get("classes") or task.get("label_words")
        if isinstance(per_class, (dict, list)) and per_class:
            out[name] = 1.0 / len(per_class)
    return out


def _select(rows: list[dict[str, Any]], suite: str | Path | None) -> tuple[list[dict[str, Any]], Any]:
    from promptdelta.bench.suite import load_suite

    path = Path(suite) if suite is not None else find_suite(rows)
    loaded = load_suite(path, check_data=False) if path is not None else None
    kept = current_rows(rows, loaded) if loaded is not None else newest_config_rows(rows)
    older = len(rows) - len(kept)
    if older:
        basis = f"suite {path}" if path is not None else "each method's newest row"
        logger.warning("%d of %d rows are of older configurations (or not in %s) and are left out; the report "
                       "shows the current configuration per method", older, len(rows), basis)
    return kept, loaded


def report(results: str | Path | Sequence[str | Path], out_dir: str | Path | None = None, with_plots: bool = True,
           overwrite: bool = False, suite: str | Path | None = None) -> dict[str, Any]:
    """Write ``report.md``, ``report.csv`` and the plots to ``out_dir`` (default ``<first results stem>_report``
    next to it); returns ``{"markdown", "summary", "files"}``. An existing report there is replaced only with
    ``overwrite``. ``results``: one results file or several (their rows combine, in the order given). Rows
    count only for each method's current configuration: ``suite``'s, or the suite file the rows name (found
    in examples/bench/), else each method's newest configuration."""
    paths = [Path(results)] if isinstance(results, (str, Path)) else [Path(r) for r in results]
    if not paths:
        raise ConfigError("no results file given; pass one or more results JSONL files")
    rows: list[dict[str, Any]] = []
    for path in paths:
        if not path.is_file():
            raise MissingFileError(f"results file {path} does not exist; run `promptdelta bench run --suite FILE "
                                   f"--results {path}` first")
        rows += read_results(path)
    if not rows:
        raise DataError(f"results file(s) {', '.join(map(str, paths))} hold no finished runs; run the suite first")
    rows, loaded = _select(rows, suite)
    out = Path(out_dir) if out_dir else paths[0].with_name(paths[0].stem + "_report")
    existing = [n for n in REPORT_FILES if (out / n).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{out} already holds a report ({', '.join(existing)}); pass --overwrite to replace it "
                          "(the results file is never changed) or choose another --out folder")
    summary = summarise(rows)
    if loaded is not None:
        summary = _order(summary, loaded)
    md = markdown_table(summary)
    names = " + ".join(p.name for p in paths)
    files = [atomic_write_text(out / "report.md", f"# Benchmark report: {names}\n\n{md}\n\n"
                                                  "Best mean dev score per task in bold (its test accuracy "
                                                  "beside it); ± is the sample std over seeds.\n"),
             atomic_write_text(out / "report.csv", csv_text(summary))]
    if with_plots:
        files += plots(summary, out, chance_levels(loaded))
    return {"markdown": md, "summary": summary, "files": [str(f) for f in files]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="promptdelta bench report", description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="results JSONL file(s) written by `promptdelta bench run`")
    p.add_argument("--out", help="output folder (default: <results stem>_report next to the first results file)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in the output folder")
    p.add_argument("--suite", help="count only rows of this suite file's current configuration, in its order "
                                   "(default: examples/bench/<suite name of the rows>.yaml when it exists, "
                                   "else each method's newest configuration); its data need not exist")
    args = p.parse_args(argv)
    result = report(args.results, args.out, with_plots=not args.no_plots, overwrite=args.overwrite,
                    suite=args.suite)
    print(result["markdown"])
    print("\nwrote " + ", ".join(result["files"]))
    return 0
