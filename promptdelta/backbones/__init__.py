"""Native backbones (one file per family) and ``load_backbone``; see ``base.py`` for the contract."""

from promptdelta.backbones.base import BackboneOutput
from promptdelta.backbones.bert import BertConfig, BertModel
from promptdelta.backbones.gpt import CausalLMOutput, GPT2Config, GPT2Model
from promptdelta.backbones.llama import LlamaConfig, LlamaModel  # noqa: F401 (registers the family)
from promptdelta.backbones.loading import load_backbone, register_family, supported_families
from promptdelta.backbones.roberta import RobertaConfig, RobertaModel
from promptdelta.backbones.t5 import T5Config, T5Model, T5Output

__all__ = ["BackboneOutput", "BertConfig", "BertModel", "GPT2Config", "GPT2Model", "CausalLMOutput",
           "RobertaConfig", "RobertaModel",
           "T5Config", "T5Model", "T5Output", "load_backbone", "register_family", "supported_families"]
