"""Many LoRA deltas on one backbone: a mixed batch (row i through delta names[i]) equals running each delta
alone, on a tiny native BERT and a tiny transformers BERT; errors name the problem."""

from __future__ import annotations

import pytest
import torch
from delta_helpers import V, _hf_gpt2, hf_bert, native_bert

from promptdelta.data.examples import InputExample
from promptdelta.deltas import attach, deltas_of
from promptdelta.deltas.mixed import RoutedLinear, add_delta, remove_delta, route_rows, served_deltas
from promptdelta.errors import DeltaError
from promptdelta.kernels import lora_linear

# four task deltas: different ranks and targets (rows of one task touch modules another task leaves alone)
TASKS = {"sst2": dict(r=4, alpha=8, targets=["q_proj", "v_proj"]),
         "agnews": dict(r=2, alpha=4, targets=["q_proj", "v_proj"]),
         "rte": dict(r=8, alpha=8, targets=["q_proj", "fc1"]),
         "boolq": dict(r=4, alpha=16, targets=["v_proj", "o_proj"])}


def hf_gpt2() -> torch.nn.Module:
    """transformers GPT-2: its projections are Conv1D (weight (in, out)); q/v/o name the fused c_attn/c_proj."""
    torch.manual_seed(0)
    return _hf_gpt2(32).eval()


MODELS = {"native": native_bert, "hf": hf_bert, "hf-gpt2": hf_gpt2}


def _out(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state   # (B, T, *)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (10, 9), generator=g)                       # (B, T)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0                                                         # padded rows
    mask[6, 2:] = 0
    return ids, mask


def _randomise(handle, seed: int) -> None:
    """B starts at zero (a fresh LoRA is the identity): give every factor random values so tasks differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _banked_model(kind: str, tmp_path, keep_attached: str | None = None):
    """A tiny model with the four task deltas banked (one through a saved folder) and each one's reference
    output (the delta alone, attached the ordinary way); ``keep_attached`` stays attached instead."""
    model = MODELS[kind]()
    ids, mask = _batch()
    ref = {None: _out(model, ids, mask)}
    for i, (task, cfg) in enumerate(TASKS.items()):
        h = attach(model, "lora", name=task, **cfg)
        _randomise(h, i)
        with torch.no_grad():
            ref[task] = _out(model, ids, mask)
        if task == keep_attached:
            continue
        if task == "agnews":                                                # through a folder
            h.save(tmp_path / task)
            h.detach()
            assert add_delta(model, tmp_path / task) == task
        else:
            assert add_delta(model, h) == task
    return model, ids, mask, ref


@pytest.mark.parametrize("kind", list(MODELS))
def test_mixed_batch_equals_each_delta_alone(kind, tmp_path):
    model, ids, mask, ref = _banked_model(kind, tmp_path)
    assert deltas_of(model) == {} and served_deltas(model) == list(TASKS)
    with torch.no_grad():
        assert torch.equal(_out(model, ids, mask), ref[None])               # banked deltas touch no row
        names = ["sst2", None, "agnews", "rte", "boolq", None, "rte", "sst2", "boolq", "agnews"]
        with route_rows(model, names) as row_ids:
            assert row_ids.tolist() == [0, -1, 1, 2, 3, -1, 2, 0, 3, 1]
            mixed = _out(model, ids, mask)
        after = _out(model, ids, mask)
    for i, n in enumerate(names):
        keep = mask[i].bool()                                               # padded positions are not outputs
        torch.testing.assert_close(mixed[i][keep], ref[n][i][keep], rtol=1e-5, atol=1e-5, msg=f"row {i} ({n})")
    assert torch.equal(after, ref[None])                                    # modules put back on exit
    assert not any(isinstance(m, RoutedLinear) for m in model.modules())


@pytest.mark.parametrize("kind", list(MODELS))
def test_attached_lora_routes_and_is_put_back(kind, tmp_path):
    """A LoRA delta attached the usual way (merged, even) is routed like a banked one, and only its rows get it."""
    model, ids, mask, ref = _banked_model(kind, tmp_path, keep_attached="boolq")
    deltas_of(model)["boolq"].merge()
    names = ["boolq", None, "sst2", "boolq", "rte", "agnews", None, "boolq", "sst2", "rte"]
    with torch.no_grad():
        with route_rows(model, names):
            mixed = _out(model, ids, mask)
        for i, n in enumerate(names):
            torch.testing.assert_close(mixed[i][mask[i].bool()], ref[n][i][mask[i].bool()], rtol=1e-5, atol=1e-5)
        assert deltas_of(model)["boolq"].merged
        torch.testing.assert_close(_out(model, ids, mask), ref["boolq"], rtol=1e-5, atol=1e-5)


def test_flattened_rows_follow_their_sequence():
    """A site that sees (B*T, K) rows (flattened) or (B, T, K) gives each token its sequence's delta."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    a, b = torch.randn(3, 2, 6, generator=g), torch.randn(3, 5, 2, generator=g)
    scales = torch.tensor([0.5, 1.0, 2.0])
    ids = torch.tensor([2, -1, 0, 1])
    x = torch.randn(4, 7, 6, generator=g)                                    # (B, T, K)
    routed = RoutedLinear(lin, a, b, scales, ids)
    with torch.no_grad():
        y3, y2 = routed(x), routed(x.reshape(28, 6))
        want = torch.stack([lin(x[i]) if j < 0 else lora_linear(x[i], lin.weight, lin.bias, a[j], b[j],
                                                                 float(scales[j]), impl="plain")
                            for i, j in enumerate(ids.tolist())])
    torch.testing.assert_close(y3, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, want.reshape(28, 5), rtol=1e-5, atol=1e-5)
    with pytest.raises(DeltaError, match="4 row names but this layer sees 5 rows"):
        routed(torch.randn(5, 6))


def test_errors_name_the_problem(tmp_path):
    model, ids, mask, _ = _banked_model("native", tmp_path)
    with pytest.raises(DeltaError, match=r"row 1 names delta 'mnli', which is not attached.*'sst2', 'agnews'"):
        with route_rows(model, ["sst2", "mnli"]):
            pass
    with pytest.raises(DeltaError, match="already served"):
        add_delta(model, attach(model, "lora", name="x", targets=["k_proj"]), name="sst2")
    deltas_of(model)["x"].detach()                                          # a refused handle stays as it was
    with pytest.raises(DeltaError, match="already served"):
        add_delta(model, tmp_path / "agnews")
    assert deltas_of(model) == {}                                           # a refused folder is not kept
    twin = attach(model, "lora", name="rte", targets=["k_proj"])            # attach does not see the bank
    with pytest.raises(DeltaError, match=r"deltas \['rte'\] are both banked and attached"):
        with route_rows(model, ["rte"]):
            pass
    twin.detach()
    bitfit = attach(model, "bitfit", name="bias")
    with pytest.raises(DeltaError, match=r"non-LoRA deltas \['bias \(bitfit\)'\]"):
        with route_rows(model, ["sst2"]):
            pass
    with pytest.raises(DeltaError, match="LoRA deltas only"):
        add_delta(model, bitfit)
    remove_delta(model, "sst2")
    with pytest.raises(DeltaError, match="no banked delta named 'sst2'"):
        remove_delta(model, "sst2")


# --------------------------------------------------------------------------------------------- classifiers
TEXTS = ["a great and moving film", "dull", "the plot was awful but the cast was fine", "good", "meh, it was ok"]


def _classifier(folder, tiny_bert_dir, kind: str, seed: int):
    """A tiny classifier on the tiny BERT (same weights every time), saved to ``folder``; -> its label logits."""
    import promptdelta as pdl
    from promptdelta.prompts.registry import save_classifier

    model, tok = pdl.load_backbone(str(tiny_bert_dir))
    if kind == "soft":
        template = pdl.ManualTemplate('Review: {"placeholder":"text_a"} All in all {"mask"}.', tokenizer=tok)
        verbalizer = pdl.SoftVerbalizer(tok, ["neg", "pos", "mixed"], [["bad"], ["good"], ["ok"]], model)
        clf = pdl.PromptForClassification(model, template, verbalizer, max_length=24, readout="mean")
    else:
        template = pdl.ManualTemplate('{"placeholder":"text_a"} It was {"mask"}.', tokenizer=tok)
        verbalizer = pdl.ManualVerbalizer(tok, classes=["neg", "pos"], label_words=[["bad"], ["good"]])
        clf = pdl.PromptForClassification(model, template, verbalizer, max_length=32)
    torch.manual_seed(seed)
    for p in clf.verbalizer.parameters():
        p.data.normal_(0, 0.5)
    if kind != "zero-shot":
        _randomise(attach(model, "lora", r=2 + seed, alpha=8), seed)       # every folder's delta is "lora"
    clf.eval()
    with torch.no_grad():
        logits = clf(clf.collate([InputExample(t) for t in TEXTS]))
    save_classifier(clf, folder)
    return logits


def test_predict_many_equals_each_classifier_alone(tiny_bert_dir, tmp_path):
    """Three classifier folders (two LoRA deltas both saved as "lora", one zero-shot; other templates,
    verbalizers and readouts) on one backbone: every row of the mixed batches equals the classifier alone."""
    from promptdelta.deltas.mixed import load_many, predict_many

    kinds = {"a": "manual", "b": "soft", "z": "zero-shot"}
    want = {str(tmp_path / k): _classifier(tmp_path / k, tiny_bert_dir, kind, i) for i, (k, kind) in
            enumerate(kinds.items())}
    got = predict_many(list(want), TEXTS, batch_size=4)                      # batches mix classifiers
    assert list(got) == list(want)
    for key, logits in want.items():
        torch.testing.assert_close(got[key].probs, logits.softmax(-1), rtol=1e-5, atol=1e-5, msg=key)
        assert got[key].label_ids.tolist() == logits.argmax(-1).tolist()
    backbone, clfs, routes = load_many(list(want))
    assert routes == {k: (None if k.endswith("z") else k) for k in want}
    assert deltas_of(backbone) == {} and all(c.backbone is backbone for c in clfs.values())


def test_load_many_refuses_non_lora_and_other_backbones(tiny_bert_dir, tmp_path):
    import promptdelta as pdl
    from promptdelta.deltas.mixed import load_many
    from promptdelta.prompts.registry import save_classifier

    _classifier(tmp_path / "a", tiny_bert_dir, "manual", 0)
    model, tok = pdl.load_backbone(str(tiny_bert_dir))
    attach(model, "adapter")
    template = pdl.ManualTemplate('{"placeholder":"text_a"} It was {"mask"}.', tokenizer=tok)
    verbalizer = pdl.ManualVerbalizer(tok, classes=["neg", "pos"], label_words=[["bad"], ["good"]])
    save_classifier(pdl.PromptForClassification(model, template, verbalizer), tmp_path / "bias")
    with pytest.raises(DeltaError, match=r"carries non-LoRA deltas \['_mixed_1_adapter \(adapter\)'\]"):
        load_many([tmp_path / "a", tmp_path / "bias"])
    with pytest.raises(DeltaError, match="distinct classifier folders"):
        load_many([tmp_path / "a", tmp_path / "a"])


def test_stacks_built_in_inference_mode_serve_later_batches(tmp_path):
    """predict runs route_rows under torch.inference_mode; the bank's cached stacks must still serve a
    later batch outside it (inference tensors would refuse), with the same outputs."""
    model, ids, mask, ref = _banked_model("native", tmp_path)
    names = ["rte", "sst2"] * 5
    with torch.inference_mode(), route_rows(model, names):
        first = _out(model, ids, mask).clone()
    x = torch.zeros(1, requires_grad=True)
    with route_rows(model, names):
        second = _out(model, ids, mask) + x                                 # autograd records through the stacks
    second.sum().backward()
    torch.testing.assert_close(second.detach(), first)


def test_clf_predict_with_a_delta_per_row(tiny_bert_dir, tmp_path):
    """clf.predict(texts, delta=[...]) (length-sorted batches, each routed) gives each row the delta it names."""
    import promptdelta as pdl

    _classifier(tmp_path / "a", tiny_bert_dir, "manual", 0)
    clf = pdl.PromptForClassification.from_pretrained(tmp_path / "a")
    with_delta = clf.predict(TEXTS, batch_size=2).probs
    with deltas_of(clf.backbone)["lora"].disabled():
        base = clf.predict(TEXTS, batch_size=2).probs
    assert (with_delta - base).abs().max() > 1e-3                           # the delta matters
    names = ["lora", None, None, "lora", None]
    got = clf.predict(TEXTS, batch_size=2, delta=names).probs
    for i, n in enumerate(names):
        torch.testing.assert_close(got[i], (with_delta if n else base)[i], rtol=1e-5, atol=1e-5)


def test_native_bert_mixed_batch_runs_on_packed_tokens(tmp_path, monkeypatch):
    """Native BERT skips padding (per-token work on the (N, K) real tokens); routed layers then get each
    token's row from PACKED_ROWS instead of falling back to the padded layout, and stay equal per row."""
    model, ids, mask, ref = _banked_model("native", tmp_path)
    shapes = []
    forward = RoutedLinear.forward

    def spy(self, x):
        shapes.append(tuple(x.shape))
        return forward(self, x)

    monkeypatch.setattr(RoutedLinear, "forward", spy)
    names = ["sst2", None, "agnews", "rte", "boolq", None, "rte", "sst2", "boolq", "agnews"]
    with torch.no_grad(), route_rows(model, names):
        mixed = _out(model, ids, mask)
    real = int(mask.sum())
    assert shapes and all(s[0] == real and len(s) == 2 for s in shapes)     # packed (N, K) in every routed layer
    for i, n in enumerate(names):
        keep = mask[i].bool()
        torch.testing.assert_close(mixed[i][keep], ref[n][i][keep], rtol=1e-5, atol=1e-5, msg=f"row {i} ({n})")
