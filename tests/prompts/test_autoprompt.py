"""AutoPrompt: the chosen trigger tokens raise the train likelihood over the initial ones, and the written
manual template reproduces the prompt that was scored."""

import pytest
import torch

from promptdelta.data import InputExample
from promptdelta.errors import CheckpointError, ConfigError, TemplateError
from promptdelta.prompts import ManualTemplate, ManualVerbalizer, PromptForClassification
from promptdelta.prompts.autoprompt import AutoPrompt, trigger_vocabulary

TEXT = '{"placeholder":"text_a"} [T] [T] {"mask"}.'
EXAMPLES = [InputExample("a fine and lovely film", label=1), InputExample("dull, long and boring", label=0),
            InputExample("i loved every minute", label=1), InputExample("a waste of time", label=0),
            InputExample("great acting and story", label=1), InputExample("the plot made no sense", label=0)]


@pytest.fixture(scope="module")
def sharp_mlm():
    """A tiny random BERT MLM with a wide init (std 0.5): its outputs depend on the prompt words (the default
    std 0.02 gives near-uniform label scores whatever the prompt)."""
    import transformers

    from promptdelta.backbones import load_backbone

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=128, initializer_range=0.5,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return load_backbone(transformers.BertForMaskedLM(cfg))[0]


def _verbalizer(tok):
    return ManualVerbalizer(tok, classes=["negative", "positive"], label_words=[["bad"], ["good"]])


def _nll(backbone, tok, text):
    clf = PromptForClassification(backbone, ManualTemplate(text, tokenizer=tok), _verbalizer(tok)).eval()
    with torch.no_grad():
        return float(clf.loss(clf.collate(EXAMPLES))[0])


def test_chosen_triggers_raise_train_likelihood(sharp_mlm, tok, tmp_path):
    search = AutoPrompt(sharp_mlm, tok, _verbalizer(tok), TEXT, init_token="the", num_candidates=8)
    result = search.search(EXAMPLES, iters=4, batch_size=len(EXAMPLES), seed=0)
    initial = _nll(sharp_mlm, tok, TEXT.replace("[T]", "the"))
    assert result.initial_loss == pytest.approx(initial, abs=1e-5)
    assert result.final_loss < result.initial_loss - 0.05           # a lower NLL = a higher likelihood
    assert result.trigger_ids != [tok.convert_tokens_to_ids("the")] * 2
    path = result.save(tmp_path / "autoprompt.txt")
    written = ManualTemplate.from_file(path, tokenizer=tok)          # an ordinary manual template
    assert "[T]" not in written.text and all(w in written.text for w in result.trigger_tokens)
    assert _nll(sharp_mlm, tok, written.text) == pytest.approx(result.final_loss, abs=1e-5)
    with pytest.raises(CheckpointError, match="already exists"):
        result.save(path)


def test_trigger_vocabulary_is_whole_words(tok):
    keep = trigger_vocabulary(tok)
    assert keep[tok.convert_tokens_to_ids("good")] and not keep[tok.convert_tokens_to_ids("##ing")]
    assert not keep[tok.mask_token_id] and not keep[tok.cls_token_id]


def test_bad_inputs_raise_named_errors(sharp_mlm, tok):
    with pytest.raises(TemplateError, match=r"\[T\]"):
        AutoPrompt(sharp_mlm, tok, _verbalizer(tok), '{"placeholder":"text_a"} {"mask"}.')
    with pytest.raises(ConfigError, match="init_token"):
        AutoPrompt(sharp_mlm, tok, _verbalizer(tok), TEXT, init_token="unbelievably")


@pytest.mark.parametrize("family", ["roberta", "gpt2", "t5"])
def test_other_families_search_and_reproduce(family):
    """Causal and encoder-decoder backbones (and BPE tokenizers): the search lowers the NLL and the written
    manual template scores exactly as searched."""
    from prompt_helpers import gpt2_tokenizer, roberta_tokenizer, t5_tokenizer, tiny_backbone

    tok = {"roberta": roberta_tokenizer, "gpt2": gpt2_tokenizer, "t5": t5_tokenizer}[family]()
    wide = {"initializer_factor": 5.0} if family == "t5" else {"initializer_range": 0.5}
    model = tiny_backbone(family, len(tok), **wide)
    verb = ManualVerbalizer(tok, classes=["negative", "positive"], label_words=[["bad"], ["good"]])
    examples = [InputExample("the movie was great", label=1), InputExample("a terrible film", label=0),
                InputExample("I loved the plot", label=1), InputExample("I hated the acting", label=0)]
    result = AutoPrompt(model, tok, verb, '{"placeholder":"text_a"} [T] [T] {"mask"}', num_candidates=5) \
        .search(examples, iters=3, batch_size=4)
    assert result.final_loss < result.initial_loss
    clf = PromptForClassification(model, ManualTemplate(result.template, tokenizer=tok), verb).eval()
    with torch.no_grad():
        assert float(clf.loss(clf.collate(examples))[0]) == pytest.approx(result.final_loss, abs=1e-5)
