"""promptdelta: prompt learning and parameter-efficient (delta) tuning of pretrained Transformers.

>>> import promptdelta as pd
>>> model, tok = pd.load_backbone("minilm")
>>> delta = pd.attach(model, "lora", targets=["q_proj", "v_proj"], r=8, alpha=16)
"""

__version__ = "0.1.0"

from promptdelta import data
from promptdelta.backbones import load_backbone
from promptdelta.config import RunConfig
from promptdelta.deltas import DeltaHandle, attach, deltas_of, load_delta
from promptdelta.deltas import export_prompt_tuning, import_prompt_tuning, merge_and_unload  # PEFT format, merge
from promptdelta.errors import (BackboneError, CheckpointError, ConfigError, DataError, DeltaError,
                                MissingFileError, PromptDeltaError, TemplateError, VerbalizerError)
from promptdelta.prompts import (KnowledgeableVerbalizer, ManualTemplate, ManualVerbalizer, MixedTemplate,
                                 MultiMaskVerbalizer, PromptForClassification, PromptForGeneration,
                                 ProtoVerbalizer, PtuningTemplate, SoftTemplate, SoftVerbalizer, Template,
                                 Verbalizer)
from promptdelta.predict import Prediction, Predictions
from promptdelta.prompts.registry import (build_classifier, build_template, build_verbalizer, register_template,
                                          register_verbalizer, registered_templates, registered_verbalizers)
from promptdelta.train import Trainer, TrainConfig
from promptdelta.train.contrastive import train_contrastive          # SetFit pairs / SupCon on any delta
from promptdelta.prompts.similarity import SimilarityVerbalizer
from promptdelta.prompts.ensemble import TemplateEnsemble
from promptdelta.recipe import auto_recipe

__all__ = [
    "merge_and_unload", "export_prompt_tuning", "import_prompt_tuning",
    "build_classifier", "build_template", "build_verbalizer", "register_template", "register_verbalizer",
    "registered_templates", "registered_verbalizers", "Prediction", "Predictions",
    "train_contrastive", "SimilarityVerbalizer", "TemplateEnsemble", "auto_recipe",
    "__version__", "data", "load_backbone", "attach", "load_delta", "deltas_of", "DeltaHandle",
    "ManualTemplate", "MixedTemplate", "SoftTemplate", "PtuningTemplate", "Template", "ManualVerbalizer",
    "SoftVerbalizer", "KnowledgeableVerbalizer", "ProtoVerbalizer", "MultiMaskVerbalizer", "Verbalizer",
    "PromptForClassification", "PromptForGeneration", "Trainer", "TrainConfig", "RunConfig",
    "PromptDeltaError", "ConfigError", "TemplateError", "VerbalizerError", "DeltaError", "CheckpointError",
    "DataError", "BackboneError", "MissingFileError",
]
