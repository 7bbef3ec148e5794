"""One builder: templates and verbalizers by name through the registry; unknown names and options are errors
listing the known ones; run.py's config path and a hand-built model give the same classifier."""

from __future__ import annotations

import pytest
import torch

import promptdelta as pd
from promptdelta.config import RunConfig
from promptdelta.errors import ConfigError
from promptdelta.prompts import registry
from promptdelta.run import build_template, build_verbalizer

CLASSES = ["negative", "positive"]
WORDS = [["bad"], ["good"]]
TEXT = '{"placeholder":"text_a"} It was {"mask"}.'


def test_every_builtin_kind_is_registered():
    assert pd.registered_templates() == ["manual", "mixed", "pair", "plain", "ptuning", "soft"]  # plain, pair,
    assert pd.registered_verbalizers() == ["kpt", "linear", "manual", "multi_mask", "pair-cosine", "prior-linear",
                                           "proto", "similarity", "soft"]   # linear, pair-cosine, prior-linear:
                                                                            # recipe_export.py


def test_unknown_names_list_the_known_ones(tok, mlm_backbone):
    with pytest.raises(ConfigError, match="unknown template 'manuel'; known templates: manual, mixed, pair, "
                                          "plain, ptuning, soft"):
        pd.build_template("manuel", tok, CLASSES, {"text": TEXT})
    with pytest.raises(ConfigError, match="unknown verbalizer 'sfot'; known verbalizers: kpt, linear, manual, "
                                          "multi_mask, pair-cosine, prior-linear, proto, similarity, soft"):
        pd.build_verbalizer("sfot", tok, CLASSES, {"label_words": WORDS}, mlm_backbone)
    with pytest.raises(ConfigError, match="unknown verbalizer"):
        pd.build_classifier(mlm_backbone, tok, CLASSES, "manual", "sfot", template_options={"text": TEXT})


def test_an_unmatched_config_name_no_longer_becomes_a_soft_verbalizer(tok, mlm_backbone):
    """run.build_verbalizer used to turn any name it did not know into a SoftVerbalizer."""
    config = RunConfig(verbalizer="manual", label_words={"negative": ["bad"], "positive": ["good"]})
    config.verbalizer = "sfot"                                # past the config's own check, as a suite could
    with pytest.raises(ConfigError, match="known verbalizers: kpt, linear, manual"):
        build_verbalizer(config, tok, CLASSES, mlm_backbone)


def test_unknown_options_name_the_valid_ones(tok, mlm_backbone):
    with pytest.raises(ConfigError, match=r"unknown template option\(s\) \['num_token'\] for SoftTemplate; valid: "
                                          r"\[.*'num_tokens'"):
        pd.build_template("soft", tok, CLASSES, {"num_token": 3}, mlm_backbone)
    with pytest.raises(ConfigError, match=r"unknown verbalizer option\(s\) \['dim'\] for ProtoVerbalizer"):
        pd.build_verbalizer("proto", tok, CLASSES, {"dim": 8}, mlm_backbone)
    with pytest.raises(ConfigError, match="sized from the backbone; pass backbone=model"):
        pd.build_verbalizer("soft", tok, CLASSES, {"label_words": WORDS})


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ConfigError, match="already registered"):
        pd.register_template("manual", pd.ManualTemplate, lambda *a: None, lambda t: {})


def test_config_keys_feed_only_the_kinds_that_take_them():
    config = RunConfig(verbalizer="manual", label_words={"negative": ["bad"], "positive": ["good"]},
                       multi_token_handler="max", verbalizer_options={"prefix": " "})
    (t_kind, t_opts), (v_kind, v_opts) = registry.config_parts(config)
    assert (t_kind, t_opts["text"], t_opts["choice"]) == ("manual", config.template, 0)
    assert v_opts == {"prefix": " ", "label_words": config.label_words, "multi_token_handler": "max"}
    proto = RunConfig(verbalizer="proto", label_words={"negative": ["bad"], "positive": ["good"]},
                      verbalizer_options={"proto_dim": 8})
    assert registry.config_parts(proto)[1] == ("proto", {"proto_dim": 8})     # label words are not proto's


@pytest.mark.parametrize("kind", ["manual", "soft", "kpt", "proto"])
def test_run_config_path_equals_the_public_builder(tok, mlm_backbone, kind):
    """promptdelta run (RunConfig -> run.build_*) and pd.build_classifier give the same model, seed for seed."""
    config = RunConfig(template=TEXT, verbalizer=kind, label_words={"negative": ["bad"], "positive": ["good"]})
    torch.manual_seed(0)
    via_run = pd.PromptForClassification(mlm_backbone, build_template(config, tok, mlm_backbone),
                                         build_verbalizer(config, tok, CLASSES, mlm_backbone), max_length=32)
    torch.manual_seed(0)
    (_, t_opts), (_, v_opts) = registry.config_parts(config)
    direct = pd.build_classifier(mlm_backbone, tok, CLASSES, "manual", kind, template_options=t_opts,
                                 verbalizer_options=v_opts, max_length=32)
    texts = ["a good film", "a bad one"]
    assert type(via_run.verbalizer) is type(direct.verbalizer)
    assert torch.equal(via_run.predict(texts).probs, direct.predict(texts).probs)


def test_template_from_a_file_with_choice(tok, tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text(f'{TEXT}\n{{"placeholder":"text_a"}} All in all, {{"mask"}}.\n')
    template = pd.build_template("manual", tok, None, {"text": str(path), "choice": 1})
    assert template.text == '{"placeholder":"text_a"} All in all, {"mask"}.'
    assert registry.template_spec(template) == {"kind": "manual", "options": {"text": template.text, "kind": "mlm"}}


def test_a_registered_user_kind_builds_and_saves(tok, mlm_backbone):
    """A method file outside the package registers its own kind and is saved through its exporter."""
    class ShoutTemplate(pd.ManualTemplate):
        pass

    def build(tokenizer, classes, options, backbone):
        return ShoutTemplate(options["text"].upper().replace("PLACEHOLDER", "placeholder").replace("TEXT_A", "text_a")
                             .replace("MASK", "mask"), tokenizer)

    pd.register_template("test-shout", ShoutTemplate, build, lambda t: {"text": t.text})
    try:
        clf = pd.build_classifier(mlm_backbone, tok, CLASSES, "test-shout", "manual", template_options={"text": TEXT},
                                  verbalizer_options={"label_words": WORDS})
        assert isinstance(clf.template, ShoutTemplate) and "IT WAS" in clf.template.text
        assert registry.template_spec(clf.template)["kind"] == "test-shout"
    finally:
        registry._TEMPLATES.pop("test-shout")
