"""The prompt files in templates/ and verbalizers/: every line of every file loads with the class its name
names and tokenises an example; label words fit the tasks' class order and are single MiniLM tokens;
OpenPrompt-format files load unchanged."""

import json
from pathlib import Path

import pytest
import torch

from promptdelta.data.examples import InputExample
from promptdelta.prompts import (KnowledgeableVerbalizer, ManualTemplate, ManualVerbalizer, MixedTemplate,
                                 PtuningTemplate, SoftTemplate)

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("sst2", "agnews", "trec", "imdb", "rte")
# label order of each task (its labels.txt in the shared data; fixed here so tests need no data folder)
CLASSES = {
    "sst2": ["negative", "positive"],
    "agnews": ["World", "Sports", "Business", "Sci/Tech"],
    "trec": ["ABBR (abbreviation)", "ENTY (entity)", "DESC (description)", "HUM (human)", "LOC (location)",
             "NUM (numeric)"],
    "imdb": ["negative", "positive"],
    "rte": ["entailment", "not_entailment"],
}
KPT_TASKS = ("sst2", "agnews", "trec", "rte")        # tasks with our expanded KPT label words (kpt.json)
TEMPLATE_FILES = {"manual": ManualTemplate, "mixed": MixedTemplate, "soft": SoftTemplate,
                  "ptuning": PtuningTemplate}
EXAMPLE = InputExample("The Senate passed the bill on Monday.", text_b="The bill failed?", label=0)


def n_lines(path):
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def load_template(path, choice, tok, backbone, cls=None):
    cls = cls or TEMPLATE_FILES[path.stem]
    if cls is ManualTemplate:
        return cls.from_file(path, choice=choice, tokenizer=tok)
    extra = {"num_tokens": 4} if cls is SoftTemplate else {}
    return cls.from_file(path, choice=choice, tokenizer=tok, backbone=backbone, **extra)


def template_cases():
    return [(p, i) for p in sorted((ROOT / "templates").rglob("*.txt")) for i in range(n_lines(p))]


def test_every_task_has_every_kind_of_file():
    """Every task has all template kinds and both manual verbalizer formats; no file is of an unknown kind
    (so every file is loaded by one of the tests below)."""
    for task in TASKS:
        assert {p.name for p in (ROOT / "templates" / task).iterdir()} == {f"{k}.txt" for k in TEMPLATE_FILES}
        names = {p.name for p in (ROOT / "verbalizers" / task).iterdir()}
        assert {"manual.txt", "manual.json"} <= names <= {"manual.txt", "manual.json", "kpt.json"}, names
    for top in ("templates", "verbalizers"):
        assert {p.name for p in (ROOT / top).iterdir() if p.is_file()} == {"README.md"}
        assert {p.name for p in (ROOT / top).iterdir() if p.is_dir()} == set(TASKS)
    assert {p.parent.name for p in (ROOT / "verbalizers").glob("*/kpt.json")} == set(KPT_TASKS)


@pytest.mark.parametrize("path, choice", template_cases(),
                         ids=[f"{p.parent.name}/{p.name}:{i}" for p, i in template_cases()])
def test_every_template_line_loads_and_tokenises(tok, encoder_backbone, path, choice):
    assert path.stem in TEMPLATE_FILES, f"{path} must be named manual/mixed/soft/ptuning.txt"
    t = load_template(path, choice, tok, encoder_backbone)
    batch = t.tokenize([EXAMPLE], max_length=64)
    ids = batch["input_ids"][0]
    assert ids[batch["mask_pos"][0]].eq(tok.mask_token_id).all() and ids.eq(tok.mask_token_id).sum() == 1
    uses_b = any(p.kind == "placeholder" and p.value == "text_b" for p in t.pieces)
    assert uses_b == (path.parent.name == "rte")
    if isinstance(t, MixedTemplate):
        assert t.num_soft_tokens > 0 and batch["soft_pos"].shape[1] >= t.num_soft_tokens
        out = t.process_embeds(encoder_backbone.input_embeddings()(batch["input_ids"]), batch)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("task", TASKS)
def test_verbalizer_files_fit_the_class_order(tok, task):
    for choice in range(2):
        v = ManualVerbalizer.from_file(ROOT / "verbalizers" / task / "manual.json", tokenizer=tok, choice=choice)
        assert v.classes == CLASSES[task]
        assert v.token_mask.sum(-1).le(1).all(), "every label word is a single MiniLM token"
        words_per_class = v.word_mask.sum(-1)
        assert words_per_class.eq(1).all() if choice == 0 else words_per_class.ge(2).all()
    by_name = ManualVerbalizer.from_file(ROOT / "verbalizers" / task / "manual.json", tokenizer=tok,
                                         classes=CLASSES[task], choice=1)
    assert by_name.classes == CLASSES[task]
    text = ManualVerbalizer.from_file(ROOT / "verbalizers" / task / "manual.txt", tokenizer=tok,
                                      classes=CLASSES[task])
    first = ManualVerbalizer.from_file(ROOT / "verbalizers" / task / "manual.json", tokenizer=tok)
    assert text.label_words == first.label_words and text.token_mask.sum(-1).le(1).all()


@pytest.mark.parametrize("task", KPT_TASKS)
def test_kpt_files_load_whole_with_the_manual_word_as_anchor(tok, task):
    """kpt.json: class names in label order, no word shared by two classes (KPT would drop it), each class's
    first word (its anchor in relevance refinement) is the one-word manual verbalizer's word."""
    path = ROOT / "verbalizers" / task / "kpt.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    v = KnowledgeableVerbalizer.from_file(path, tokenizer=tok, classes=CLASSES[task])
    assert v.classes == CLASSES[task] == list(raw)
    assert v.label_words == [raw[c] for c in CLASSES[task]]                  # nothing removed or reordered
    assert all(len(ws) >= 7 for ws in v.label_words)
    manual = ManualVerbalizer.from_file(ROOT / "verbalizers" / task / "manual.json", tokenizer=tok, choice=0)
    assert [ws[0] for ws in v.label_words] == [ws[0] for ws in manual.label_words]
    assert v.label_word_weights.shape == v.word_mask.shape and v.word_mask.sum() == sum(map(len, raw.values()))


# Copies of OpenPrompt's file formats (agnews scripts): leading spaces, {"special"}, Python literals, soft.
OPENPROMPT_TEMPLATES = {
    ManualTemplate: ' A {"mask"} news : {"placeholder": "text_a"} {"placeholder": "text_b"}\n'
                    ' {"placeholder": "text_a"} {"placeholder": "text_b"} {"special": "<sep>"} This topic is '
                    'about {"mask"} .\n',
    MixedTemplate: '{"placeholder": "text_a"} {"placeholder": "text_b"} {"soft":"This"} topic {"soft":"is about"} '
                   '{"mask"}.',
    PtuningTemplate: '{"soft"} {"mask"} news {"soft"} {"placeholder": "text_a"} {"placeholder": "text_b"}\n'
                     '{"placeholder":"text_a", "shortenable":True} {"soft": None, "duplicate": 2} {"mask"}',
}


@pytest.mark.parametrize("cls", list(OPENPROMPT_TEMPLATES))
def test_openprompt_template_files_load_unchanged(tok, encoder_backbone, tmp_path, cls):
    path = tmp_path / "template.txt"
    path.write_text(OPENPROMPT_TEMPLATES[cls])
    kw = {} if cls is ManualTemplate else {"backbone": encoder_backbone}
    for choice in range(n_lines(path)):
        t = cls.from_file(path, choice=choice, tokenizer=tok, **kw)
        batch = t.tokenize([EXAMPLE])
        assert batch["input_ids"][0, batch["mask_pos"][0]].eq(tok.mask_token_id).all()


def test_openprompt_verbalizer_files_load_unchanged(tok, tmp_path):
    (tmp_path / "manual_verbalizer.txt").write_text("politics\nsports\nbusiness\ntechnology\n\n\n")
    v = ManualVerbalizer.from_file(tmp_path / "manual_verbalizer.txt", tokenizer=tok)
    assert v.classes == ["politics", "sports", "business", "technology"]
    (tmp_path / "multi.json").write_text('[\n {"World": ["politics" ], "Tech": ["technology"]},\n'
                                          ' {"World": ["politics", "world" ], "Tech": ["technology", "science"]}\n]')
    v = ManualVerbalizer.from_file(tmp_path / "multi.json", tokenizer=tok, choice=1)
    assert v.classes == ["World", "Tech"] and v.label_words == [["politics", "world"], ["technology", "science"]]


# OpenPrompt's own files for some tasks, in the shared benchmark data when it is there (unit tests must not
# need it, so these skip without it). Loaded with our classes, as published, one-text examples (no text_b).
OPENPROMPT_DATA = ROOT.parent / "shared" / "data"
OPENPROMPT_FILES = sorted(OPENPROMPT_DATA.glob("*/openprompt/*")) if OPENPROMPT_DATA.is_dir() else []
OPENPROMPT_LOADERS = {"manual_template": ManualTemplate, "mixed_template": MixedTemplate,
                      "ptuning_template": PtuningTemplate, "soft_template": SoftTemplate,
                      "manual_verbalizer": ManualVerbalizer, "multiwords_verbalizer": ManualVerbalizer,
                      "knowledgeable_verbalizer": KnowledgeableVerbalizer}


@pytest.mark.skipif(not OPENPROMPT_FILES, reason=f"no OpenPrompt files under {OPENPROMPT_DATA}/*/openprompt")
@pytest.mark.parametrize("path", OPENPROMPT_FILES, ids=[f"{p.parts[-3]}/{p.name}" for p in OPENPROMPT_FILES])
def test_shared_openprompt_files_load(tok, encoder_backbone, path):
    cls = OPENPROMPT_LOADERS.get(path.stem)
    assert cls is not None, f"{path}: no loader is known for this OpenPrompt file name"
    if issubclass(cls, ManualVerbalizer):
        n = len(json.loads(path.read_text())) if path.suffix == ".jsonl" else 1
        for choice in range(n):
            v = cls.from_file(path, tokenizer=tok, choice=choice)
            assert v.num_classes >= 2 and all(v.label_words)
        return
    for choice in range(n_lines(path)):
        t = load_template(path, choice, tok, encoder_backbone, cls)
        batch = t.tokenize([InputExample("Stocks rose on Monday.")])
        ids = batch["input_ids"][0]
        assert ids[batch["mask_pos"][0]].eq(tok.mask_token_id).all() and ids.eq(tok.mask_token_id).sum() == 1
