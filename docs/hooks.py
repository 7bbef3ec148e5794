"""mkdocs hooks: keep only nav entries whose page exists; write the CLI reference from the argparse parsers.

The CLI page is generated on every build (``reference/cli.md``, not committed), so it cannot drift from the
parser: ``promptdelta --help``, each subcommand's ``--help``, and each ``promptdelta bench <name> --help``.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from mkdocs.structure.files import File

CLI_PAGE = "reference/cli.md"


def _keep_existing(items: list, docs_dir: Path) -> list:
    out = []
    for item in items:
        if isinstance(item, dict):
            (title, value), = item.items()
            if isinstance(value, list):
                kept = _keep_existing(value, docs_dir)
                if kept:
                    out.append({title: kept})
            elif value == CLI_PAGE or (docs_dir / value).is_file():
                out.append(item)
        elif isinstance(item, str) and (item == CLI_PAGE or (docs_dir / item).is_file()):
            out.append(item)
    return out


def on_config(config, **kwargs):
    config["nav"] = _keep_existing(config["nav"] or [], Path(config["docs_dir"]))
    return config


def _help(argv: list[str]) -> str:
    from promptdelta.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(argv + ["--help"])
    return out.getvalue().rstrip()


def cli_reference() -> str:
    """The markdown of the CLI reference: every parser's --help text, in parser order."""
    os.environ["COLUMNS"] = "100"  # argparse wraps at $COLUMNS: the same page on every terminal
    from promptdelta.cli import BENCHES, build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    parts = ["# Command line reference", "",
             "Generated from the argument parsers by `docs/hooks.py` on every docs build.", "",
             "## promptdelta", "", "```text", _help([]), "```"]
    for name in subs.choices:
        parts += ["", f"## promptdelta {name}", "", "```text", _help([name]), "```"]
        if name == "bench":
            for bench in BENCHES:
                parts += ["", f"### promptdelta bench {bench}", "", "```text", _help(["bench", bench]), "```"]
    return "\n".join(parts) + "\n"


def on_files(files, config, **kwargs):
    files.append(File.generated(config, CLI_PAGE, content=cli_reference()))
    return files
