"""Issue 21's harness kinds (bench/methods_harness.py) on a tiny random backbone and tiny JSONL tasks:
s3delta's emitted plan stays within its budget and is what trains; ipt trains only z (d numbers) from a
subspace of the OTHER tasks' prompts; multitask transfers from the other tasks; no kind reads a test split
before the final prediction of the task under test, and a source task's test split never."""

import functools
import json

import pytest
import torch

from promptdelta.bench import harness
from promptdelta.bench.harness import read_results, run_suite
from promptdelta.bench.suite import suite_from_dict
from promptdelta.errors import ConfigError
from promptdelta.prompts.model import PromptForClassification
from promptdelta.prompts.verbalizer import ManualVerbalizer
from promptdelta import run as run_mod
from promptdelta.train import Trainer

WORDS = {"alpha": ["red", "blue"], "beta": ["cat", "dog", "fish"], "gamma": ["up", "down"]}


def _task(folder, name):
    """A tiny task: 8 train texts per class, test texts marked TEST-<task>."""
    folder.mkdir()
    words = WORDS[name]
    (folder / "labels.txt").write_text("".join(f"{i}\t{w}\n" for i, w in enumerate(words)))
    for split, n, mark in (("train", 8, ""), ("test", 3, f"TEST-{name} ")):
        rows = [{"text": f"{mark}the {w} one number {j} of {name}", "label": i}
                for i, w in enumerate(words) for j in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def methods_suite(backbone, tmp_path, methods):
    tasks = {n: {"data": _task(tmp_path / n, n), "template": '{"placeholder":"text_a"} It was {"mask"}.',
                 "label_words": [[w] for w in WORDS[n]]} for n in WORDS}
    return {"name": "methods-test", "backbone": str(backbone), "shots": 4, "seeds": [13], "max_length": 32,
            "train": {"batch_size": 4, "max_steps": 2, "eval_every": 2},
            "tasks": tasks, "methods": methods}


S3 = {"kind": "s3delta", "verbalizer": "soft", "readout": "mean",
      "search": {"budget": 400, "steps": 3, "r": 2, "bottleneck": 2, "gate_lr": 0.5}, "train": {"lr": 1e-3}}
IPT = {"kind": "ipt", "verbalizer": "soft", "readout": "mean", "subspace": {"dim": 1, "num_tokens": 2},
       "train": {"lr": 1e-1, "head_lr": 1e-2}}
LM = {"kind": "lmbff", "verbalizer": "manual", "readout": "mean", "delta": {"method": "lora", "r": 2, "alpha": 4},
      "label_search": {"k": 2}, "train": {"lr": 1e-3}}
AP = {"kind": "autoprompt", "verbalizer": "manual", "readout": "mean", "delta": "bitfit",
      "triggers": {"n": 2, "iters": 2, "num_candidates": 3, "batch_size": 4}, "train": {"lr": 1e-3}}
MT = {"kind": "multitask", "verbalizer": "soft", "readout": "mean", "delta": {"method": "lora", "r": 2, "alpha": 4},
      "multitask": {"num_soft_tokens": 2, "steps": 3}, "train": {"lr": 1e-3}}


@pytest.fixture(scope="module")
def watched(tiny_bert_nohead_dir, tmp_path_factory, request):
    """Run the three kinds on task alpha, recording every text collated and when predict() runs."""
    tmp = tmp_path_factory.mktemp("methods")
    raw = methods_suite(tiny_bert_nohead_dir, tmp, {"s3": S3, "ipt": IPT, "mt": MT, "lm": LM, "ap": AP})
    events, state, verbalizers, templates = [], {"predict": 0}, [], []
    collate, predict, verbalizer = PromptForClassification.collate, Trainer.predict, ManualVerbalizer.__init__

    @functools.wraps(verbalizer)                                        # keeps the signature the registry reads
    def spy_verbalizer(self, tokenizer, classes=None, label_words=(), *a, **k):
        verbalizers.append([list(w) for w in label_words])
        return verbalizer(self, tokenizer, classes, label_words, *a, **k)

    def spy_collate(self, examples, *a, **k):
        events.extend(("collate", state["predict"] > 0, ex.text_a) for ex in examples)
        return collate(self, examples, *a, **k)

    def spy_predict(self, examples, *a, **k):
        state["predict"] += 1
        try:
            return predict(self, examples, *a, **k)
        finally:
            state["predict"] -= 1

    mp = pytest.MonkeyPatch()
    mp.setattr(PromptForClassification, "collate", spy_collate)
    mp.setattr(Trainer, "predict", spy_predict)
    mp.setattr(ManualVerbalizer, "__init__", spy_verbalizer)
    build_template = run_mod.build_template
    mp.setattr(run_mod, "build_template", lambda config, *a: templates.append(config.template) or build_template(
        config, *a))
    results = tmp / "r.jsonl"
    try:
        run_suite(suite_from_dict(raw), results, only=["alpha/*"])
    finally:
        mp.undo()
    return {r["method"]: r for r in read_results(results)}, events, results, raw, verbalizers, templates


def test_no_test_split_is_read_before_the_final_prediction(watched):
    _, events, _, _, _, _ = watched
    seen = [(inside, text) for _, inside, text in events if text.startswith("TEST-")]
    assert seen, "the task's test split was never predicted"
    assert all(text.startswith("TEST-alpha") for _, text in seen)     # no source task's test split, ever
    assert all(inside for inside, _ in seen)                           # only inside predict()
    trained = {text for _, inside, text in events if not inside}       # training batches
    assert all(f"of {t}" in " ".join(trained) for t in WORDS)          # the sources' train splits were used


def test_s3delta_row_emits_a_plan_within_budget_and_trains_it(watched):
    rows = watched[0]
    row = rows["s3"]
    assert 0 < row["plan_cost"] <= row["budget"] == 400
    assert {c["method"] for c in row["emitted"]} <= {"lora", "adapter", "bitfit"}
    assert row["search_dev"] is not None and len(row["search_loss"]) == 2
    head = 32 * 2 + 2                                                  # the soft verbalizer's head (H*C + C)
    assert row["trainable_params"] == row["plan_cost"] + head          # exactly the plan trains (+ the head)


def test_ipt_row_trains_only_z_from_the_other_tasks(watched):
    row = watched[0]["ipt"]
    assert row["source_tasks"] == ["beta", "gamma"]                    # leave-one-out: never alpha itself
    assert row["delta_params"] == 1                                    # d = 1
    assert row["trainable_params"] == 1 + 32 * 2 + 2                  # z + the soft head


def test_multitask_row_transfers_from_the_other_tasks(watched):
    row = watched[0]["mt"]
    assert row["source_tasks"] == ["beta", "gamma"] and 0.0 <= row["accuracy"] <= 1.0
    lora = 2 * 2 * 2 * (32 + 32)                                       # 2 layers x q,v x r (in + out)
    assert row["trainable_params"] == lora + 2 * 32 + 32 * 2 + 2      # lora + soft prompt (2, H) + head


def test_sources_are_cached_and_reused(watched, tiny_bert_nohead_dir):
    rows, _, results, raw, _, _ = watched
    cache = results.parent / "r.cache"
    prompts = sorted(p.name.split("-seed")[0] for p in (cache / "ipt").glob("*.safetensors"))
    assert prompts == ["beta", "gamma"]
    assert len(list((cache / "multitask").iterdir())) == 1                 # no temporary folder left behind
    assert not [p for p in (cache / "ipt").iterdir() if p.name.startswith(".")]
    # beta's row reuses gamma's prompt and trains only alpha's new one
    before = {p.name for p in (cache / "ipt").glob("*.safetensors")}
    run_suite(suite_from_dict(raw), results, only=["beta/ipt"])
    after = {p.name for p in (cache / "ipt").glob("*.safetensors")}
    assert len(after - before) == 1 and next(iter(after - before)).startswith("alpha-")


def test_a_changed_source_task_changes_the_ipt_hash(tiny_bert_nohead_dir, tmp_path):
    raw = methods_suite(tiny_bert_nohead_dir, tmp_path, {"ipt": IPT, "s3": S3})
    h = suite_from_dict(raw).config_hash
    before = (h("alpha", "ipt"), h("alpha", "s3"))
    raw["tasks"]["beta"]["template"] = '{"mask"} : {"placeholder":"text_a"}'
    h = suite_from_dict(raw).config_hash
    assert h("alpha", "ipt") != before[0] and h("alpha", "s3") == before[1]


@pytest.mark.parametrize("method, match", [
    ({"kind": "s3delta", "search": {"steps": 3}}, "needs search: {budget"),
    ({"kind": "s3delta", "search": {"budget": 10, "typo": 1}}, "search: must be a mapping"),
    ({"kind": "ipt", "source_tasks": ["nope"]}, "source_tasks"),
    ({"kind": "ipt", "source_tasks": ["alpha"]}, "no source task left"),
    ({"kind": "multitask", "delta": "lora", "bogus": 1}, "unknown key"),
])
def test_bad_method_entries_fail_when_the_suite_loads(tiny_bert_nohead_dir, tmp_path, method, match):
    raw = methods_suite(tiny_bert_nohead_dir, tmp_path, {"m": method})
    with pytest.raises(ConfigError, match=match):
        suite_from_dict(raw)


def test_direct_run_spec_without_cache_dir(tiny_bert_nohead_dir, tmp_path):
    from promptdelta.backbones import load_backbone

    suite = suite_from_dict(methods_suite(tiny_bert_nohead_dir, tmp_path, {"s3": S3}))
    spec = suite.expand(["alpha/s3"])[0]
    base, tok = load_backbone(suite.backbone)
    row = harness.run_spec(suite, spec, base, tok, harness.load_task(suite, "alpha", 4, 13))
    assert row["plan_cost"] <= 400 and row["kind"] == "s3delta"
    assert not any(p.requires_grad is False and p.grad is not None for p in base.parameters())
    assert torch.equal(next(base.parameters()), load_backbone(suite.backbone)[0].state_dict()[
        next(iter(base.state_dict()))])                                 # the shared base is untouched


def test_lmbff_row_trains_with_the_searched_label_words(watched):
    row, verbalizers = watched[0]["lm"], watched[4]
    words = [row["label_words"][c] for c in WORDS["alpha"]]             # class order (the row's JSON is sorted)
    assert len(set(words)) == 2 and 0.0 <= row["search_dev"] <= 1.0
    assert all(w in cands for w, cands in zip(words, row["candidates"]))   # the top-k of its class
    assert [[w] for w in words] in verbalizers                              # the trained verbalizer's words
    assert row["trainable_params"] == 2 * 2 * 2 * (32 + 32)                # the LoRA only (manual verbalizer)


def test_autoprompt_row_trains_the_found_template(watched):
    row = watched[0]["ap"]
    assert len(row["trigger_tokens"]) == 2 and all(w.isalpha() for w in row["trigger_tokens"])
    assert row["template"] == '{"placeholder":"text_a"} It was %s %s {"mask"}.' % tuple(row["trigger_tokens"])
    assert row["search_loss"][1] <= row["search_loss"][0] + 1e-6        # the search keeps the best (or initial)
    assert row["template"] in watched[5]                                 # the template the row trained with

