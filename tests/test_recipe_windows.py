"""Long texts in the recipe's heads: a single text longer than max_length is read whole, in windows of
max_length tokens, its embedding the token-weighted mean of the windows' (every token once); short texts and
pairs are encoded exactly as before; the saved classifier reads texts the same way."""

import numpy as np
import pytest
import torch

from promptdelta.bench.baselines import embed, tokenize_pairs, tokenize_windows
from promptdelta.data import InputExample, load
from promptdelta.recipe import auto_recipe
from promptdelta.recipe_export import load_recipe
from promptdelta.utils.pooling import grouped_mean

ML = 16
LONG = ("the film was long and slow , but the last act and the music made it worth the wait for me and my "
        "friends , who all said the same thing about the actors and the story and the ending of it all .")


@pytest.fixture(scope="module")
def setup(tiny_sentence_backbone):
    base, tok = tiny_sentence_backbone
    return base, tok, load("builtin:demo", shots=4, seed=13)


def test_windows_cover_every_token_once_in_order(setup):
    _, tok, _ = setup
    exs = [InputExample(text=LONG, label=1), InputExample(text="fine .", label=0)]
    batch = tokenize_windows(tok, exs, ML)
    ids = tok(LONG, add_special_tokens=False)["input_ids"]
    room = ML - tok.num_special_tokens_to_add(pair=False)
    n_long = -(-len(ids) // room)
    assert batch["row_group"].tolist() == [0] * n_long + [1]
    assert batch["input_ids"].shape[1] <= ML and batch["labels"].tolist() == [1, 0]
    got = [t for r, m in zip(batch["input_ids"][:n_long], batch["attention_mask"][:n_long])
           for t in r[m.bool()].tolist()[1:-1]]
    assert got == ids                                             # every token once, in order, none truncated


def test_short_texts_and_pairs_are_encoded_as_before(setup):
    _, tok, (train, _, _) = setup
    short = [ex for ex in train if len(tok(ex.text)["input_ids"]) <= ML][:4]
    a, b = tokenize_windows(tok, short, ML), tokenize_pairs(tok, short, ML)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    pairs = [InputExample(text=LONG, text_b="short one .", label=0)]
    a, b = tokenize_windows(tok, pairs, ML), tokenize_pairs(tok, pairs, ML)
    assert torch.equal(a["input_ids"], b["input_ids"]) and a["row_group"].tolist() == [0]


def test_grouped_mean_is_the_mean_over_all_tokens_of_a_group():
    torch.manual_seed(0)
    h, m = torch.randn(3, 5, 4), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    got = grouped_mean(h, m, torch.tensor([0, 0, 1]))
    want0 = torch.cat([h[0, :3], h[1]]).mean(0)                  # 8 tokens of example 0
    assert torch.allclose(got[0], want0) and torch.allclose(got[1], h[2, :2].mean(0))
    plain = (h * m[..., None]).sum(1) / m[..., None].sum(1).clamp_min(1.0)
    assert torch.equal(grouped_mean(h, m, None), plain)


def test_embed_in_windows_is_the_token_weighted_mean_of_each_window_alone(setup):
    base, tok, _ = setup
    exs = [InputExample(text=LONG), InputExample(text="fine .")]
    got = embed(base, tok, exs, ML, windows=True)
    batch = tokenize_windows(tok, exs, ML)
    rows = []
    for r, m in zip(batch["input_ids"], batch["attention_mask"]):  # each window through the model alone
        ids = r[m.bool()][None]
        rows.append((base(input_ids=ids).last_hidden_state[0].sum(0).detach(), ids.shape[1]))
    n_long = int((batch["row_group"] == 0).sum())
    want = sum(s for s, _ in rows[:n_long]) / sum(n for _, n in rows[:n_long])
    assert np.allclose(got[0], want.numpy(), atol=1e-5)
    assert np.allclose(got[1], embed(base, tok, exs[1:], ML)[0], atol=1e-6)     # a short text: as before
    assert not np.allclose(got[0], embed(base, tok, exs[:1], ML)[0], atol=1e-3)  # truncation reads less


@pytest.mark.parametrize("choice", ["logreg", "zero-shot"])
def test_saved_choice_reads_long_texts_in_windows_too(setup, tmp_path, choice):
    base, tok, (train, dev, test) = setup
    longer = lambda s: s.like([InputExample(text=(ex.text + " " + LONG) if i % 2 else ex.text, label=ex.label)
                               for i, ex in enumerate(s)])
    train, dev, test = longer(train), longer(dev), longer(test)
    out = auto_recipe(base, tok, train, dev, candidates=[choice], max_length=ML, label_words=[["bad"], ["good"]],
                      echo=lambda s: None)
    out.save_pretrained(tmp_path / "clf")
    clf = load_recipe(tmp_path / "clf")
    assert clf.template.windows
    got = clf.predict(list(test), batch_size=3).probs.numpy()
    assert np.allclose(got, out.proba(list(test)), atol=1e-5)
