"""PromptForClassification(readout="mean"): the verbalizer reads the mean of all hidden states."""

import pytest
import torch

import promptdelta as pd
from promptdelta.config import RunConfig
from promptdelta.data.examples import InputExample
from promptdelta.errors import ConfigError, VerbalizerError
from promptdelta.prompts import ManualTemplate, PromptForClassification, ProtoVerbalizer, SoftVerbalizer

TEMPLATE = '{"placeholder":"text_a","shortenable":true} It was {"mask"}.'
EXAMPLES = [InputExample(text="a fine and moving film", label=1), InputExample(text="dull", label=0),
            InputExample(text="an utterly pointless, tedious mess of a movie", label=0)]


@pytest.fixture(scope="module")
def parts(tiny_bert_nohead_dir):
    torch.manual_seed(0)
    model, tok = pd.load_backbone(tiny_bert_nohead_dir)
    return model.eval(), tok


@torch.no_grad()
def test_mean_readout_feeds_the_masked_mean_of_hidden_states(parts):
    model, tok = parts
    verb = ProtoVerbalizer(["neg", "pos"], hidden_size=model.config.hidden_size)
    clf = PromptForClassification(model, ManualTemplate(TEMPLATE, tokenizer=tok), verb, readout="mean").eval()
    batch = clf.collate(EXAMPLES)                                           # padded: rows of unequal length
    assert (batch["attention_mask"] == 0).any()
    states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch.get("token_type_ids")).last_hidden_state      # (B, T, H)
    by_hand = torch.stack([states[i, batch["attention_mask"][i].bool()].mean(0) for i in range(len(EXAMPLES))])
    expected = verb.process(by_hand, None, model)
    torch.testing.assert_close(clf(batch), expected, rtol=1e-5, atol=1e-6)
    masked = PromptForClassification(model, ManualTemplate(TEMPLATE, tokenizer=tok), verb).eval()
    assert not torch.allclose(masked(batch), expected)                      # the mask readout differs


def test_mean_readout_trains_a_soft_verbalizer(parts):
    model, tok = parts
    verb = SoftVerbalizer(tok, classes=["neg", "pos"], label_words=[["bad"], ["good"]], backbone=model)
    clf = PromptForClassification(model, ManualTemplate(TEMPLATE, tokenizer=tok), verb, readout="mean")
    batch = clf.collate(EXAMPLES)
    labels = torch.tensor([e.label for e in EXAMPLES])
    opt = torch.optim.Adam(verb.parameters(), lr=0.05)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(clf(batch), labels)
        first = loss.item() if first is None else first
        opt.zero_grad(), loss.backward(), opt.step()
    assert loss.item() < 0.5 * first


def test_bad_readout_is_refused(parts):
    model, tok = parts
    verb = ProtoVerbalizer(["neg", "pos"], hidden_size=model.config.hidden_size)
    with pytest.raises(VerbalizerError, match="readout='avg' is unknown"):
        PromptForClassification(model, ManualTemplate(TEMPLATE, tokenizer=tok), verb, readout="avg")
    with pytest.raises(ConfigError, match="readout='cls'"):
        RunConfig(readout="cls")
