"""ProtoVerbalizer (ProtoVerb): contrastive losses against direct computations, scoring, fitting, errors."""

import copy

import pytest
import torch
from torch.nn import functional as F

from promptdelta.data.examples import InputExample
from promptdelta.errors import VerbalizerError
from promptdelta.prompts import ManualTemplate, ManualVerbalizer, ProtoVerbalizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids contention (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sim(x, y):
    return F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T


def paper_losses(v_ins, proto):
    """The N-way K-shot losses written out with loops: v_ins (N, K, D), proto (N, D).

    L_proto = -1/(N^2 K) sum_n sum_i log exp S(v_i^n, p_n) / sum_m exp S(v_i^n, p_m)
    L_ins   = -1/(N^2 K^2) sum_n sum_{i,j} log exp S(v_i^n, v_j^n) /
                                             (exp S(v_i^n, v_j^n) + sum_{m != n} sum_k exp S(v_k^m, v_j^n))
    """
    n_cls, k_shot, _ = v_ins.shape
    l_proto = 0.0
    for n in range(n_cls):
        for i in range(k_shot):
            s = torch.stack([sim(v_ins[n, i:i + 1], proto[m:m + 1])[0, 0] for m in range(n_cls)])
            l_proto -= (s[n].exp() / s.exp().sum()).log()
    l_ins = 0.0
    for n in range(n_cls):
        for i in range(k_shot):
            for j in range(k_shot):
                pos = sim(v_ins[n, i:i + 1], v_ins[n, j:j + 1])[0, 0].exp()
                neg = sum(sim(v_ins[m, k:k + 1], v_ins[n, j:j + 1])[0, 0].exp()
                          for m in range(n_cls) if m != n for k in range(k_shot))
                l_ins -= (pos / (pos + neg)).log()
    return l_proto / (n_cls ** 2 * k_shot), l_ins / (n_cls ** 2 * k_shot ** 2)


def test_losses_match_the_paper_up_to_the_batch_constant():
    torch.manual_seed(0)
    v = ProtoVerbalizer(["a", "b", "c"], hidden_size=8, proto_dim=5)
    hidden = torch.randn(3, 4, 8)                                        # (N, K, H)
    labels = torch.arange(3).repeat_interleave(4)
    perm = torch.randperm(12)                                            # order must not matter
    flat_h, flat_y = hidden.reshape(12, 8)[perm], labels[perm]
    want_proto, want_ins = paper_losses(v.head(hidden), v.prototypes)
    torch.testing.assert_close(v.instance_prototype_loss(flat_h, flat_y), 3 * want_proto)
    torch.testing.assert_close(v.instance_instance_loss(flat_h, flat_y), 3 * want_ins)


def test_instance_loss_on_an_unbalanced_batch_with_temperature():
    torch.manual_seed(1)
    v = ProtoVerbalizer(["a", "b"], hidden_size=6, proto_dim=4, temperature=0.5)
    hidden, labels = torch.randn(5, 6), torch.tensor([0, 0, 0, 1, 1])
    z = F.normalize(v.head(hidden), dim=-1)
    terms = []
    for i in range(5):
        for j in range(5):
            if labels[i] == labels[j]:
                pos = (z[i] @ z[j] / 0.5).exp()
                neg = sum((z[k] @ z[j] / 0.5).exp() for k in range(5) if labels[k] != labels[j])
                terms.append(-(pos / (pos + neg)).log())
    torch.testing.assert_close(v.instance_instance_loss(hidden, labels), torch.stack(terms).mean())
    one_class = v.instance_instance_loss(hidden, torch.zeros(5, dtype=torch.long))
    assert one_class.item() == 0.0 and one_class.requires_grad


def test_scores_alone_and_combined_with_a_manual_verbalizer(tok):
    torch.manual_seed(2)
    alone = ProtoVerbalizer(["neg", "pos"], hidden_size=8, proto_dim=4, temperature=0.1)
    hidden = torch.randn(3, 8)
    torch.testing.assert_close(alone.process(hidden, None, None), sim(alone.head(hidden), alone.prototypes) / 0.1)
    manual = ManualVerbalizer(tok, ["neg", "pos"], ["bad", "good"])
    mixed = ProtoVerbalizer(["neg", "pos"], hidden_size=8, proto_dim=4, temperature=0.1, manual=manual,
                            manual_weight=0.5)
    logits = torch.randn(3, tok.vocab_size)
    want = (mixed.proto_logits(hidden).log_softmax(-1)
            + 0.5 * manual.process(hidden, logits, None).log_softmax(-1))
    torch.testing.assert_close(mixed.process(hidden[:, None], logits[:, None], None), want)   # (B, 1, .) ok
    labels = torch.tensor([0, 1, 1])
    torch.testing.assert_close(alone.extra_loss(hidden, labels), alone.instance_instance_loss(hidden, labels))
    torch.testing.assert_close(mixed.extra_loss(hidden, labels), mixed.instance_instance_loss(hidden, labels)
                               + mixed.instance_prototype_loss(hidden, labels))


def test_joint_training_through_the_extra_loss_hook_on_a_tiny_bert(tok, mlm_backbone):
    """ProtoVerb's objective, CE(process) + extra_loss = L_proto + L_ins, trained with the backbone."""
    backbone = copy.deepcopy(mlm_backbone).eval()                       # eval: no dropout, trainable
    template = ManualTemplate('{"placeholder":"text_a"} It was {"mask"}.', tok)
    texts = ["great fun", "awful mess", "a joy", "a bore", "loved it", "hated it", "superb", "dreadful"]
    batch = template.tokenize([InputExample(t, label=i % 2) for i, t in enumerate(texts)], max_length=32)
    v = ProtoVerbalizer(["neg", "pos"], hidden_size=backbone.config.hidden_size, proto_dim=16, temperature=0.1)
    opt = torch.optim.Adam([*backbone.parameters(), *v.parameters()], lr=1e-2)
    rows, losses = torch.arange(8), []
    for _ in range(20):
        out = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = out.last_hidden_state[rows, batch["mask_pos"][:, 0]]                  # (B, H)
        loss = F.cross_entropy(v.process(hidden, None, None), batch["labels"]) + v.extra_loss(hidden,
                                                                                         batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert (v.process(hidden, None, None).argmax(-1) == batch["labels"]).all()


def test_fit_separates_cached_hidden_states():
    torch.manual_seed(3)
    centres = torch.randn(3, 16)
    labels = torch.arange(3).repeat(6)                                  # 18 examples, 3 classes
    hidden = centres[labels] + 0.8 * torch.randn(18, 16)
    v = ProtoVerbalizer(["a", "b", "c"], hidden_size=16, proto_dim=8, temperature=0.1)
    before = v.prototypes.detach().clone()
    history = v.fit(hidden, labels, epochs=40, lr=5e-2, batch_size=6)
    assert len(history) == 40 and history[-1] < 0.5 * history[0]
    assert not torch.equal(before, v.prototypes)
    assert (v.process(hidden, None, None).argmax(-1) == labels).float().mean() >= 0.9


def test_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    v = ProtoVerbalizer(["a", "b"], hidden_size=8, proto_dim=4, seed=1)
    save_file(v.state_dict(), str(tmp_path / "proto.safetensors"))
    w = ProtoVerbalizer(["a", "b"], hidden_size=8, proto_dim=4, seed=2)
    hidden = torch.randn(3, 8)
    assert not torch.allclose(w.process(hidden, None, None), v.process(hidden, None, None))
    w.load_state_dict(load_file(str(tmp_path / "proto.safetensors")))
    torch.testing.assert_close(w.process(hidden, None, None), v.process(hidden, None, None))


def test_bad_inputs(tok):
    with pytest.raises(VerbalizerError, match="same classes"):
        ProtoVerbalizer(["a", "b"], 8, manual=ManualVerbalizer(tok, ["x", "y"], ["bad", "good"]))
    with pytest.raises(VerbalizerError, match="temperature=1.0"):
        ProtoVerbalizer(["a", "b"], 8, temperature=0.0)
    v = ProtoVerbalizer(["a", "b"], 8, proto_dim=4)
    with pytest.raises(VerbalizerError, match="MultiMaskVerbalizer"):
        v.process(torch.randn(3, 2, 8), None, None)
    with pytest.raises(VerbalizerError, match="labels \\(N,\\)"):
        v.fit(torch.randn(3, 8), torch.zeros(4, dtype=torch.long))
