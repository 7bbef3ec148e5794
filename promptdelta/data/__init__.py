"""Data: examples, loaders (JSONL/CSV folders, ``datasets``, the built-in demo task), few-shot sampling."""

from promptdelta.data.examples import ExampleSet, InputExample, as_examples
from promptdelta.data.loaders import builtin_path, load, load_split_file, read_labels
from promptdelta.data.sampler import few_shot, few_shot_split, stratified_holdout

__all__ = ["InputExample", "ExampleSet", "as_examples", "load", "few_shot", "few_shot_split", "stratified_holdout",
           "builtin_path", "load_split_file", "read_labels"]
