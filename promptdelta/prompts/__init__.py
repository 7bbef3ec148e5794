"""Prompts: templates (wrap examples around a mask), verbalizers (mask output -> class scores) and the
model that joins them to a backbone."""

from promptdelta.prompts.dsl import Piece, parse_template
from promptdelta.prompts.model import PromptForClassification
from promptdelta.prompts.template import ManualTemplate, Template
from promptdelta.prompts.verbalizer import ManualVerbalizer, SoftVerbalizer, Verbalizer

__all__ = ["ManualTemplate", "Template", "ManualVerbalizer", "SoftVerbalizer", "Verbalizer",
           "PromptForClassification", "parse_template", "Piece"]
