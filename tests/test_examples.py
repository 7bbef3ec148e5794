"""Smoke tests: both examples and the CLI run end to end at tiny size."""

import json
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_example(name: str, argv: list[str]):
    mod = runpy.run_path(str(ROOT / "examples" / name))
    return mod["main"](argv)


def test_fewshot_example_tiny(tiny_bert_nohead_dir, tmp_path):
    result = _run_example("fewshot_classification.py",
                          ["--backbone", str(tiny_bert_nohead_dir), "--shots", "4", "--epochs", "1",
                           "--out", str(tmp_path)])
    assert 0.0 <= result["accuracy"] <= 1.0
    assert (tmp_path / "delta" / "delta.safetensors").is_file()


def test_attach_delta_example_tiny():
    result = _run_example("attach_delta.py", ["--tiny", "--steps", "3"])
    assert result["restored"] is True
    assert Path(result["path"], "delta.json").is_file()


def test_cli_run_writes_run_folder_and_never_overwrites(tiny_bert_dir, tmp_path, capsys):
    from promptdelta.cli import main

    argv = ["run", "--backbone", str(tiny_bert_dir), "--data", "builtin:demo", "--shots", "4",
            "--seeds", "13,21", "--epochs", "1", "--output-dir", str(tmp_path), "--name", "smoke",
            "--no-progress", "--verbalizer", "manual"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "mean" in out
    metrics = json.loads((tmp_path / "smoke" / "metrics.json").read_text())
    assert [r["seed"] for r in metrics["rows"]] == [13, 21]
    assert (tmp_path / "smoke" / "config.yaml").is_file()
    assert (tmp_path / "smoke" / "seed13" / "delta" / "delta.json").is_file()
    assert main(argv) == 0                      # second run goes to smoke-2, the first is untouched
    assert (tmp_path / "smoke-2" / "metrics.json").is_file()
    assert json.loads((tmp_path / "smoke" / "metrics.json").read_text()) == metrics


def test_cli_reports_bad_config_key(tmp_path, capsys):
    from promptdelta.cli import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("shotz: 4\n")
    assert main(["run", "--config", str(cfg)]) == 2
    assert "unknown config key" in capsys.readouterr().err
