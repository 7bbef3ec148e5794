"""A classifier is a folder: save_pretrained -> from_pretrained -> predict gives exactly the saved model's
predictions, for every template and verbalizer kind, with deltas, calibration and refined KPT words; the
recorded backbone reloads by itself, a different backbone is refused, folders are never half-written or
silently replaced."""

from __future__ import annotations

import json

import pytest
import torch

import promptdelta as pd
from promptdelta.errors import BackboneError, CheckpointError, MissingFileError, TemplateError

TEXTS = ["a great and wonderful film", "terrible, bad acting and an awful plot", "fine",
         "It was a long movie with some good scenes but a boring end; I would not watch it again.",
         "the best of the year", "a waste of time"]
CLASSES = ["negative", "positive"]
WORDS = [["bad", "awful"], ["good", "great"]]
TEXT = '{"placeholder":"text_a"} It was {"mask"}.'
TEMPLATES = {"manual": {"text": TEXT},
             "mixed": {"text": '{"placeholder":"text_a"} {"soft": "It was"} {"soft"} {"mask"}.'},
             "soft": {"text": TEXT, "num_tokens": 3},
             "ptuning": {"text": '{"placeholder":"text_a"} {"soft"} {"soft"} {"mask"}.', "prompt_encoder": "lstm"}}
VERBALIZERS = {"manual": {"label_words": WORDS, "multi_token_handler": "mean"},
               "soft": {"label_words": WORDS},
               "kpt": {"label_words": [["bad", "awful", "poor"], ["good", "great", "fine"]]},
               "proto": {"proto_dim": 8},
               "proto+manual": {"proto_dim": 8, "manual": {"kind": "manual", "options": {"label_words": WORDS}}}}


@pytest.fixture(scope="module")
def backbone_dir(tiny_bert_dir):
    """A tiny random BERT with an MLM head (2 layers, hidden 32) as an HF checkpoint folder (tests/conftest.py)."""
    return tiny_bert_dir


def _perturb(clf: torch.nn.Module, seed: int = 1) -> None:
    """Stand-in for training: move every trainable parameter (deltas, soft vectors, heads, KPT weights), so a
    folder that lost any of them predicts differently."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clf.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def _build(backbone_dir, template: str, verbalizer: str, delta: bool = True):
    model, tok = pd.load_backbone(backbone_dir)
    if delta:
        pd.attach(model, "lora", targets=["q_proj", "v_proj"], r=2, alpha=4)
    else:
        model.requires_grad_(False)                        # zero-shot / prompt-only: the backbone is frozen
    v_kind, v_opts = verbalizer.split("+")[0], json.loads(json.dumps(VERBALIZERS[verbalizer]))
    clf = pd.build_classifier(model, tok, CLASSES, template, v_kind, template_options=TEMPLATES[template],
                              verbalizer_options=v_opts, max_length=48)
    _perturb(clf)
    return clf


def _round_trip(clf, path, **kw):
    before = clf.predict(TEXTS, batch_size=4)
    clf.save_pretrained(path)
    loaded = pd.PromptForClassification.from_pretrained(path, **kw)
    after = loaded.predict(TEXTS, batch_size=4)
    assert after.labels == before.labels
    assert torch.equal(after.probs, before.probs)          # exactly: same weights, same ops
    return loaded


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_template_kind_round_trips_exactly(backbone_dir, tmp_path, template):
    loaded = _round_trip(_build(backbone_dir, template, "manual"), tmp_path / "clf")
    assert type(loaded.template).__name__.lower().startswith(template[:4])


@pytest.mark.parametrize("verbalizer", sorted(VERBALIZERS))
def test_every_verbalizer_kind_round_trips_exactly(backbone_dir, tmp_path, verbalizer):
    _round_trip(_build(backbone_dir, "mixed", verbalizer), tmp_path / "clf")


def test_multi_mask_verbalizer_round_trips(backbone_dir, tmp_path):
    model, tok = pd.load_backbone(backbone_dir)
    clf = pd.build_classifier(model, tok, CLASSES, "manual", "multi_mask",
                              template_options={"text": '{"placeholder":"text_a"} It was {"mask"} , {"mask"} .'},
                              verbalizer_options={"label_words": [WORDS, [["no"], ["yes"]]], "weights": [1.0, 0.5]})
    loaded = _round_trip(clf, tmp_path / "clf")
    assert loaded.verbalizer.weights == [1.0, 0.5] and loaded.verbalizer.num_masks == 2


def test_calibration_and_refined_kpt_words_travel(backbone_dir, tmp_path):
    clf = _build(backbone_dir, "manual", "kpt")
    v = clf.verbalizer
    v.keep_words(torch.tensor([[True, False, True], [True, True, False]]))      # a refinement
    v.set_calibration(torch.randn(v.word_mask.shape))
    loaded = _round_trip(clf, tmp_path / "clf")
    assert loaded.verbalizer.label_words == [["bad", "poor"], ["good", "great"]]
    assert torch.equal(loaded.verbalizer.calibration, v.calibration)


def test_zero_shot_classifier_round_trips(backbone_dir, tmp_path):
    """No delta, nothing trained: the folder still records template, words and backbone."""
    clf = _build(backbone_dir, "manual", "manual", delta=False)
    loaded = _round_trip(clf, tmp_path / "clf")
    assert pd.deltas_of(loaded.backbone) == {}
    cfg = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert cfg["deltas"] == [] and cfg["verbalizer"]["options"]["label_words"] == WORDS
    assert cfg["promptdelta_version"] == pd.__version__ and cfg["backbone"]["name_or_path"] == str(backbone_dir)


def test_full_fine_tuning_embeds_the_backbone(backbone_dir, tmp_path):
    """Trained backbone weights differ from the recorded backbone: the folder carries them (backbone/)."""
    model, tok = pd.load_backbone(backbone_dir)
    clf = pd.build_classifier(model, tok, CLASSES, "manual", "soft", template_options={"text": TEXT},
                              verbalizer_options={"label_words": WORDS})
    _perturb(clf)                                          # every backbone weight moves
    loaded = _round_trip(clf, tmp_path / "clf")
    cfg = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert cfg["backbone"]["embedded"] == "backbone" and (tmp_path / "clf" / "backbone" / "config.json").is_file()
    assert loaded.backbone is not model


def test_several_deltas_and_mean_readout(backbone_dir, tmp_path):
    model, tok = pd.load_backbone(backbone_dir)
    pd.attach(model, "lora", targets=["q_proj"], r=2, alpha=4, name="a")
    pd.attach(model, "bitfit", name="b")
    clf = pd.build_classifier(model, tok, CLASSES, "manual", "soft", template_options={"text": TEXT},
                              verbalizer_options={"label_words": WORDS}, readout="mean")
    _perturb(clf)
    loaded = _round_trip(clf, tmp_path / "clf")
    assert sorted(pd.deltas_of(loaded.backbone)) == ["a", "b"] and loaded.readout == "mean"
    assert (tmp_path / "clf" / "deltas" / "a" / "delta.json").is_file()


def test_given_backbone_same_weights_is_used(backbone_dir, tmp_path):
    clf = _build(backbone_dir, "soft", "soft")
    clf.save_pretrained(tmp_path / "clf")
    fresh, _ = pd.load_backbone(backbone_dir)
    loaded = pd.PromptForClassification.from_pretrained(tmp_path / "clf", backbone=fresh)
    assert loaded.backbone is fresh and "lora" in pd.deltas_of(fresh)
    assert torch.equal(loaded.predict(TEXTS).probs, clf.predict(TEXTS).probs)


def test_backbone_with_other_weights_is_refused(backbone_dir, tmp_path):
    _build(backbone_dir, "manual", "manual").save_pretrained(tmp_path / "clf")
    other, _ = pd.load_backbone(backbone_dir)
    with torch.no_grad():
        other.input_embeddings().weight[5].add_(1.0)
    other.name_or_path = "my-other-bert"
    with pytest.raises(BackboneError, match=r"made on .*tiny_bert_mlm.* given backbone is .*my-other-bert") as err:
        pd.PromptForClassification.from_pretrained(tmp_path / "clf", backbone=other)
    assert "\n" not in str(err.value)
    assert pd.deltas_of(other) == {}                         # nothing attached to a refused backbone


def test_existing_classifier_is_not_overwritten(backbone_dir, tmp_path):
    clf = _build(backbone_dir, "manual", "soft")
    clf.save_pretrained(tmp_path / "clf")
    first = (tmp_path / "clf" / "prompt.safetensors").read_bytes()
    _perturb(clf, seed=2)
    with pytest.raises(CheckpointError, match="overwrite=True"):
        clf.save_pretrained(tmp_path / "clf")
    assert (tmp_path / "clf" / "prompt.safetensors").read_bytes() == first
    clf.save_pretrained(tmp_path / "clf", overwrite=True)
    assert (tmp_path / "clf" / "prompt.safetensors").read_bytes() != first
    assert [p.name for p in tmp_path.iterdir()] == ["clf"]                    # no temporary folder left


def test_folder_that_is_not_a_classifier_names_what_is_missing(backbone_dir, tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        pd.PromptForClassification.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="not a classifier folder: it has no classifier.json"):
        pd.PromptForClassification.from_pretrained(tmp_path / "empty")
    model, _ = pd.load_backbone(backbone_dir)
    pd.attach(model, "lora", targets=["q_proj"], r=2).save(tmp_path / "delta")
    with pytest.raises(MissingFileError, match="delta folder: load it with pd.load_delta"):
        pd.PromptForClassification.from_pretrained(tmp_path / "delta")
    _build(backbone_dir, "manual", "manual").save_pretrained(tmp_path / "clf")
    cfg_path = tmp_path / "clf" / "classifier.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "deltas": [{**cfg["deltas"][0], "folder": "../delta"}]}))
    with pytest.raises(CheckpointError, match="lists delta folder '../delta'"):
        pd.PromptForClassification.from_pretrained(tmp_path / "clf")
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "clf" / "prompt.safetensors").unlink()
    with pytest.raises(MissingFileError, match="missing prompt.safetensors"):
        pd.PromptForClassification.from_pretrained(tmp_path / "clf")


def test_user_post_processing_cannot_be_saved(backbone_dir, tmp_path):
    model, tok = pd.load_backbone(backbone_dir)
    template = pd.ManualTemplate('{"placeholder":"text_a", "post_processing": "shout"} It was {"mask"}.', tok,
                                 post_processing={"shout": str.upper})
    clf = pd.build_classifier(model, tok, CLASSES, template, "manual", verbalizer_options={"label_words": WORDS})
    with pytest.raises(TemplateError, match="user functions and cannot be saved"):
        clf.save_pretrained(tmp_path / "clf")
    assert not (tmp_path / "clf").exists()


@pytest.mark.parametrize("family", ["roberta", "gpt2", "t5"])
def test_other_families_round_trip_onto_a_given_backbone(tmp_path, family):
    """Causal (mask at the end, multi-token words by sequence score) and T5 (sentinel) prompts; a live model
    has no recorded path, so backbone= is required, and a backbone with the same weights is accepted."""
    from prompt_helpers import gpt2_tokenizer, roberta_tokenizer, t5_tokenizer, tiny_backbone

    tok = {"roberta": roberta_tokenizer, "gpt2": gpt2_tokenizer, "t5": t5_tokenizer}[family]()
    model = tiny_backbone(family, len(tok))
    pd.attach(model, "lora", targets=["q_proj", "v_proj"], r=2, alpha=4)
    clf = pd.build_classifier(model, tok, CLASSES, "manual", "manual", max_length=32,
                              template_options={"text": '{"placeholder":"text_a"} It was {"mask"}'},
                              verbalizer_options={"label_words": [["terrible", "bad"], ["wonderful", "good"]]})
    _perturb(clf)
    clf.save_pretrained(tmp_path / "clf")
    with pytest.raises(BackboneError, match="no recorded name or path; pass backbone="):
        pd.PromptForClassification.from_pretrained(tmp_path / "clf")
    loaded = pd.PromptForClassification.from_pretrained(tmp_path / "clf", backbone=tiny_backbone(family, len(tok)))
    assert loaded.kind == clf.kind and loaded.uses_sequence_scoring == clf.uses_sequence_scoring
    texts = ["the movie was great", "awful film", "I loved the plot"]
    assert torch.equal(loaded.predict(texts).probs, clf.predict(texts).probs)
