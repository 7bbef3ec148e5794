"""train.gradient_checkpointing: the Trainer switches it on in native and transformers backbones, training
ends with the same weights as without it, and a model without a backbone gets a clear error."""

import pytest
import torch

from train_helpers import Classifier, Ex

from promptdelta.backbones.bert import BertConfig, BertModel
from promptdelta.errors import ConfigError
from promptdelta.train import Trainer


def data(n: int = 12) -> list[Ex]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (n, 6), generator=g)
    return [Ex(tuple(row.tolist()), int(row[1] > 25)) for row in ids]


def native() -> Classifier:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24,
                     max_position_embeddings=16, has_pooler=False)
    return Classifier(BertModel(cfg), 16)


CONFIG = dict(lr=0.01, max_steps=4, batch_size=4, seed=5, progress=False)


def test_same_weights_with_and_without_checkpointing():
    plain, ckpt = native(), native()
    Trainer(plain, **CONFIG).fit(data())
    Trainer(ckpt, **CONFIG, gradient_checkpointing=True).fit(data())
    assert ckpt.backbone.is_gradient_checkpointing and not plain.backbone.is_gradient_checkpointing
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(plain.head.weight, native().head.weight)     # it did train


def test_transformers_backbone_uses_its_own_switch():
    import transformers

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    torch.manual_seed(0)
    hf = transformers.BertModel(cfg)
    Trainer(Classifier(hf, 16), **CONFIG, gradient_checkpointing=True).fit(data())
    on = hf.is_activation_checkpointing if hasattr(hf, "is_activation_checkpointing") else hf.is_gradient_checkpointing
    assert on


def test_model_without_backbone_is_a_config_error():
    toy = Classifier(torch.nn.Embedding(50, 4), 4)
    toy.backbone = torch.nn.Identity()
    with pytest.raises(ConfigError, match="gradient_checkpointing=true.*holds no backbone"):
        Trainer(toy, **CONFIG, gradient_checkpointing=True).fit(data())


def test_gradient_checkpointing_must_be_a_bool():
    with pytest.raises(ConfigError, match="train.gradient_checkpointing='yes' has the wrong type; it must be bool"):
        Trainer(native(), gradient_checkpointing="yes")
