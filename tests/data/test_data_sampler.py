"""Few-shot sampler and hold-out: exact counts, no overlap, seeded determinism (also across hash seeds)."""

import os
import subprocess
import sys
from collections import Counter

import pytest

from promptdelta.data import ExampleSet, InputExample, few_shot, few_shot_split, stratified_holdout
from promptdelta.errors import ConfigError, DataError


def _pool(counts=(30, 20, 12)) -> ExampleSet:
    examples = [InputExample(text=f"c{c} example {i}", label=c, guid=f"g{c}-{i}")
                for c, n in enumerate(counts) for i in range(n)]
    return ExampleSet(examples, classes=[f"class{c}" for c in range(len(counts))], name="pool")


def _guids(examples):
    return [ex.guid for ex in examples]


@pytest.mark.parametrize("k,dev_k", [(1, None), (4, None), (5, 2), (3, 7)])
def test_exact_k_per_class_and_no_overlap(k, dev_k):
    train, dev = few_shot_split(_pool(), k, seed=13, dev_k=dev_k)
    assert Counter(ex.label for ex in train) == {0: k, 1: k, 2: k}
    assert Counter(ex.label for ex in dev) == {c: dev_k or k for c in range(3)}
    assert not set(_guids(train)) & set(_guids(dev))
    assert train.classes == dev.classes == ["class0", "class1", "class2"]


def test_deterministic_per_seed_and_different_across_seeds():
    pool = _pool()
    a, b = few_shot_split(pool, 4, seed=13), few_shot_split(pool, 4, seed=13)
    assert _guids(a[0]) == _guids(b[0]) and _guids(a[1]) == _guids(b[1])
    draws = {tuple(sorted(_guids(few_shot_split(pool, 4, seed=s)[0]))) for s in (13, 21, 42, 87, 100)}
    assert len(draws) == 5


def test_few_shot_is_the_train_half_and_does_not_depend_on_dev_k():
    pool = _pool()
    assert _guids(few_shot(pool, 3, seed=21)) == _guids(few_shot_split(pool, 3, seed=21)[0])
    assert _guids(few_shot_split(pool, 3, seed=21, dev_k=1)[0]) == _guids(few_shot_split(pool, 3, seed=21, dev_k=6)[0])


def test_sample_mixes_classes_and_does_not_mutate_pool():
    pool = _pool()
    before = _guids(pool)
    train = few_shot(pool, 5, seed=13)
    assert _guids(pool) == before
    assert [ex.label for ex in train] != sorted(ex.label for ex in train)  # not grouped by class


def test_same_draw_under_different_python_hash_seeds():
    code = ("from promptdelta.data import load; t, d, _ = load('builtin:demo', shots=4, seed=5); "
            "print(','.join(e.guid for e in t + d))")
    outs = []
    for hash_seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, HF_HUB_OFFLINE="1")
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout.strip())
    assert outs[0] == outs[1] and outs[0].count(",") == 15


def test_class_with_too_few_examples_names_class_and_counts():
    with pytest.raises(DataError) as err:
        few_shot_split(_pool((30, 20, 12)), 7, seed=1)  # needs 14 per class, class2 has 12
    msg = str(err.value)
    assert "'class2' has 12" in msg and "14" in msg and "lower shots" in msg
    assert "class1" not in msg.split("(counts")[0]


def test_class_absent_from_pool_is_reported():
    pool = _pool((10, 10))
    pool.classes.append("ghost")
    with pytest.raises(DataError, match="'ghost' has 0"):
        few_shot(pool, 2, seed=1)


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_bad_k_is_a_config_error(k):
    with pytest.raises(ConfigError, match="positive integer"):
        few_shot(_pool(), k, seed=1)


def test_unlabelled_or_out_of_range_pool_examples():
    pool = _pool((5, 5))
    pool.append(InputExample("no label", guid="nolab"))
    with pytest.raises(DataError, match="nolab.*give every train example a label"):
        few_shot(pool, 1, seed=1)
    pool[-1] = InputExample("bad label", label=9, guid="bad")
    with pytest.raises(DataError, match="outside 0..1.*bad"):
        few_shot(pool, 1, seed=1)


def test_pool_without_classes():
    with pytest.raises(DataError, match="classes="):
        few_shot(ExampleSet([InputExample("x", label=0)]), 1, seed=1)


def test_stratified_holdout_keeps_every_class_and_is_seeded():
    pool = _pool((40, 20, 1))
    rest, dev = stratified_holdout(pool, 0.1, seed=3)
    assert Counter(ex.label for ex in dev) == {0: 4, 1: 2}  # a single-example class stays in train
    assert len(rest) + len(dev) == len(pool) and not set(_guids(rest)) & set(_guids(dev))
    assert _guids(dev) == _guids(stratified_holdout(pool, 0.1, seed=3)[1])
    assert _guids(dev) != _guids(stratified_holdout(pool, 0.1, seed=4)[1])
    with pytest.raises(ConfigError, match="between 0 and 1"):
        stratified_holdout(pool, 1.5)
