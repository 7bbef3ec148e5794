"""``promptdelta run`` flags map onto RunConfig; --nproc launches ranks through train.distributed.launch."""

import pytest

from promptdelta import cli
from promptdelta.errors import ConfigError


def config_of(*flags: str, yaml_text: str | None = None, tmp_path=None):
    argv = ["run", *flags]
    if yaml_text is not None:
        path = tmp_path / "run.yaml"
        path.write_text(yaml_text)
        argv += ["--config", str(path)]
    return cli.run_config_from_args(cli.build_parser().parse_args(argv))


def test_training_flags_map_onto_train_config():
    cfg = config_of("--precision", "bf16", "--grad-accum", "4", "--gradient-checkpointing",
                    "--checkpoint-dir", "ckpts", "--checkpoint-every", "50", "--resume", "--seeds", "1,2")
    t = cfg.train
    assert (t.precision, t.grad_accum, t.gradient_checkpointing) == ("bf16", 4, True)
    assert (t.checkpoint_dir, t.checkpoint_every, t.resume) == ("ckpts", 50, True)
    assert cfg.seeds == [1, 2]


def test_every_run_flag_reaches_the_config():
    """Each flag's dest must be in cli._RUN_KEYS, or the flag parses and is silently dropped."""
    parser = cli.build_parser()
    run = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["run"]
    dests = {a.dest for a in run._actions if a.dest.startswith("train.")}
    assert dests and dests <= set(cli._RUN_KEYS), dests - set(cli._RUN_KEYS)
    assert config_of("--head-lr", "0.01", "--lr", "0.001").train.head_lr == 0.01


def test_absent_flags_keep_the_yaml_values(tmp_path):
    cfg = config_of(yaml_text="train: {precision: bf16, grad_accum: 2, gradient_checkpointing: true, "
                              "checkpoint_dir: c, resume: true}\n", tmp_path=tmp_path)
    t = cfg.train
    assert (t.precision, t.grad_accum, t.gradient_checkpointing, t.checkpoint_dir, t.resume) == \
        ("bf16", 2, True, "c", True)
    defaults = config_of().train
    assert (defaults.precision, defaults.grad_accum, defaults.gradient_checkpointing, defaults.resume) == \
        ("fp32", 1, False, False)


def test_fsdp_flag_and_yaml_key(tmp_path):
    assert config_of("--fsdp", "--precision", "bf16").train.fsdp is True
    assert config_of(yaml_text="train: {fsdp: true}\n", tmp_path=tmp_path).train.fsdp is True
    assert config_of().train.fsdp is False


@pytest.mark.parametrize("flags, match", [
    (["--resume"], "resume=true needs train.checkpoint_dir"),
    (["--checkpoint-every", "5"], "checkpoint_every=5 needs train.checkpoint_dir"),
    (["--grad-accum", "0"], "grad_accum"),
    (["--precision", "fp16"], "fp16.*needs a CUDA device"),
    (["--fsdp", "--precision", "fp16", "--device", "cuda"], "fsdp=true does not work with precision='fp16'"),
])
def test_bad_combinations_are_config_errors(flags, match):
    with pytest.raises(ConfigError, match=match):
        config_of(*flags)


def test_bad_precision_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--precision", "fp8"])
    assert "invalid choice" in capsys.readouterr().err


def test_nproc_relaunches_the_same_command_line(monkeypatch, capsys):
    calls = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli, "launch", lambda n, argv: calls.append((n, argv)) or 0)
    argv = ["-v", "run", "--nproc", "2", "--seeds", "13", "--max-steps", "2", "--npro=2"]
    assert cli.main(argv) == 0
    assert calls == [(2, ["-v", "run", "--seeds", "13", "--max-steps", "2"])]   # torchrun rejects --nproc
    assert "launching 2 data-parallel processes" in capsys.readouterr().out


def test_failed_rank_and_bad_nproc_are_reported(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli, "launch", lambda n, argv: 1)
    assert cli.main(["run", "--nproc", "2"]) == 1
    assert "a rank of the 2-process run failed" in capsys.readouterr().err
    assert cli.main(["run", "--nproc", "0"]) == 2
    assert "--nproc 0 must be >= 1" in capsys.readouterr().err


def test_train_bench_is_listed():
    assert "train" in cli.BENCHES
