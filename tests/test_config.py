"""RunConfig: YAML and overrides map onto one validated dataclass; bad keys and values are named."""

import pytest

from promptdelta.config import RunConfig
from promptdelta.errors import ConfigError, MissingFileError


def test_defaults_and_yaml_round_trip(tmp_path):
    cfg = RunConfig()
    assert cfg.delta["method"] == "lora" and cfg.verbalizer == "soft" and cfg.seeds == [13, 21, 42, 87, 100]
    path = tmp_path / "c.yaml"
    path.write_text("backbone: minilm\nshots: 4\nseeds: [1, 2]\ntrain: {lr: 0.01, epochs: 2}\ndelta: bitfit\n")
    cfg = RunConfig.from_yaml(path)
    assert cfg.shots == 4 and cfg.seeds == [1, 2] and cfg.train.lr == 0.01 and cfg.delta == {"method": "bitfit"}


def test_overrides_including_train_keys():
    cfg = RunConfig().with_overrides(shots=8, **{"train.lr": 0.5, "train.epochs": None})
    assert cfg.shots == 8 and cfg.train.lr == 0.5 and cfg.train.epochs == RunConfig().train.epochs
    assert RunConfig().with_overrides(delta="none").delta is None


@pytest.mark.parametrize("bad, match", [
    ({"lerning_rate": 1}, "unknown config key"),
    ({"train": {"epochz": 1}}, "unknown train config key"),
    ({"verbalizer": "magic"}, "verbalizer"),
    ({"shots": 0}, "shots"),
    ({"delta": {"r": 8}}, "method"),
    ({"seeds": []}, "seeds"),
])
def test_bad_keys_and_values_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(bad)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        RunConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("shots: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(bad)


def test_every_shipped_config_and_suite_loads():
    """examples/configs/*.yaml are valid RunConfigs and examples/bench/*.yaml valid suites (no data needed)."""
    from pathlib import Path

    import yaml

    from promptdelta.bench.suite import suite_from_dict

    root = Path(__file__).resolve().parents[1] / "examples"
    configs = sorted((root / "configs").glob("*.yaml"))
    suites = sorted((root / "bench").glob("*.yaml"))
    assert configs and suites
    for path in configs:
        RunConfig.from_yaml(path)
    for path in suites:  # ../shared/data is not in CI: data paths kept as written (the same-data rule reads them)
        raw = yaml.safe_load(path.read_text())
        suite_from_dict(raw, str(path), path.parent, check_data=False)
