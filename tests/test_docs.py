"""Documentation tests: `promptdelta info`, every documented command, the docs build.

The command test extracts each ```bash / ```python block of README.md and docs/**/*.md (new guide pages are
picked up automatically) and runs it in a fresh clone's layout. A block preceded by
``<!-- no-test: <reason> -->`` is skipped, visibly: the test lists it with its reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from promptdelta.cli import main

ROOT = Path(__file__).resolve().parents[1]
RUN_LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "console": "bash", "python": "python", "py": "python"}
FENCE = re.compile(r"^```([A-Za-z]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*(no-test|slow)\s*:?\s*(.*?)\s*-->\s*$")
BLOCK_TIMEOUT_S = {"fast": 300, "slow": 1200}


@dataclass
class Block:
    path: str     # relative to the repository root
    line: int     # of the opening fence
    lang: str     # "bash" or "python"
    code: str
    mark: str     # "fast", "slow" or "no-test"
    reason: str

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every page under docs/ (new guide pages are picked up as they appear)."""
    return [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


def extract_blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """The bash / python blocks of a markdown file, each with the marker on the line right above its fence."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for m in FENCE.finditer(text):
        lang = RUN_LANGS.get(m.group(1).lower())
        if lang is None:
            continue
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        mark, reason = (marker.group(1), marker.group(2)) if marker else ("fast", "")
        blocks.append(Block(str(path.relative_to(root)), text.count("\n", 0, m.start()) + 1, lang, m.group(2),
                            mark, reason))
    return blocks


ALL_BLOCKS = [b for f in doc_files() for b in extract_blocks(f)]


def _params():
    for b in ALL_BLOCKS:
        marks = [pytest.mark.slow] if b.mark == "slow" else []
        yield pytest.param(b, id=b.id, marks=marks)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The repository's files as a fresh clone has them (tracked + new, not ignored): no runs/, no ../shared."""
    dest = tmp_path_factory.mktemp("clone") / "promptdelta"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _env(clone: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(clone), TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # promptdelta, python, mkdocs
    env.pop("PROMPTDELTA_DATA", None)
    return env


def _fake_venv(clone: Path) -> None:
    """The clone's .venv: this interpreter's bin/ and a fresh install stamp, so `make` installs nothing."""
    venv = clone / ".venv"
    if not venv.exists():
        venv.mkdir()
        (venv / "bin").symlink_to(Path(sys.executable).parent)
        (venv / ".installed").touch()
    # a stamp newer than any file, so `make` never reinstalls (a reinstall from the clone would repoint the
    # shared editable install at this temporary folder)
    future = time.time() + 10 * 365 * 86400
    os.utime(venv / ".installed", (future, future))


@pytest.mark.parametrize("block", _params())
def test_documented_block_runs_on_a_fresh_clone(block: Block, clone: Path):
    if block.mark == "no-test":
        pytest.skip(f"<!-- no-test --> in {block.id}: {block.reason}")
    if block.lang == "python":
        cmd = [sys.executable, "-"]
    else:  # the README's `make` targets use the clone's .venv
        cmd = ["bash", "-euo", "pipefail", "-s"]
        _fake_venv(clone)
    out = subprocess.run(cmd, input=block.code, cwd=clone, env=_env(clone), capture_output=True, text=True,
                         timeout=BLOCK_TIMEOUT_S[block.mark])
    assert out.returncode == 0, f"{block.id} failed (exit {out.returncode}):\n{block.code}\n--- stdout\n" \
                                f"{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}"


def test_skip_markers_are_listed_and_have_a_reason(capsys):
    skipped = [b for b in ALL_BLOCKS if b.mark == "no-test"]
    with capsys.disabled():
        for b in skipped:
            print(f"\n  not run: {b.id} ({b.lang}): {b.reason}")
    assert all(b.reason for b in skipped), [b.id for b in skipped if not b.reason]
    assert any(b.mark != "no-test" for b in ALL_BLOCKS)


def test_extraction_reads_markers_and_new_pages(tmp_path):
    (tmp_path / "docs" / "guide").mkdir(parents=True)
    (tmp_path / "README.md").write_text("# x\n\n```bash\necho hi\n```\n")
    (tmp_path / "docs" / "guide" / "new.md").write_text(
        "text\n\n<!-- no-test: needs a GPU -->\n```python\nimport torch\n```\n\n<!-- slow -->\n```sh\nls\n```\n"
        "\n```yaml\na: 1\n```\n```text\nout\n```\n")
    blocks = [b for f in doc_files(tmp_path) for b in extract_blocks(f, tmp_path)]
    assert [(b.path, b.lang, b.mark, b.reason, b.code) for b in blocks] == [
        ("README.md", "bash", "fast", "", "echo hi\n"),
        ("docs/guide/new.md", "python", "no-test", "needs a GPU", "import torch\n"),
        ("docs/guide/new.md", "bash", "slow", "", "ls\n")]


def test_docs_build_strict_without_warnings(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "promptdelta run" in cli and "--columns" in cli and "promptdelta bench report" in cli


def test_info_prints_versions_kernels_registries_and_gpu(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"] and info["versions"]["promptdelta"]
    assert {"lora", "bitfit"} <= set(info["deltas"])
    assert "status" in info["native_cpu_kernels"]
    assert isinstance(info["gpu"]["cuda"], bool) and "triton" in info["gpu"]
    assert "templates" in info and "verbalizers" in info
    assert not any(str(v).startswith("error:") for v in info.values()), info


def test_run_help_lists_every_registered_delta(capsys):
    from promptdelta.info import _deltas

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in _deltas():
        assert name in help_text
