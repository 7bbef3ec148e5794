"""Prompts: templates (wrap examples around a mask), verbalizers (mask output -> class scores) and the
model that joins them to a backbone."""

from promptdelta.prompts.dsl import POST_PROCESSING, Piece, parse_template
from promptdelta.prompts.generation import PromptForGeneration
from promptdelta.prompts.model import PromptForClassification
from promptdelta.prompts.template import ManualTemplate, Template
from promptdelta.prompts.soft import MixedTemplate, PtuningTemplate, SoftTemplate
from promptdelta.prompts.verbalizer import ManualVerbalizer, MultiMaskVerbalizer, SoftVerbalizer, Verbalizer
from promptdelta.prompts.kpt import KnowledgeableVerbalizer, expand_label_words, refine_with_support
from promptdelta.prompts.proto import ProtoVerbalizer
from promptdelta.prompts.similarity import SimilarityVerbalizer
from promptdelta.prompts.calibration import (calibrate_content_free, calibrate_contextual, content_free_prior,
                                             contextual_prior, word_log_probs)

__all__ = ["ManualTemplate", "Template", "ManualVerbalizer", "SoftVerbalizer", "Verbalizer",
           "PromptForClassification", "PromptForGeneration", "parse_template", "Piece",
           "MixedTemplate", "SoftTemplate", "PtuningTemplate", "POST_PROCESSING",
           "MultiMaskVerbalizer", "KnowledgeableVerbalizer", "expand_label_words", "refine_with_support",
           "ProtoVerbalizer", "calibrate_content_free", "calibrate_contextual", "content_free_prior",
           "contextual_prior", "word_log_probs"]
