"""promptdelta's own errors.

Every error a user can cause by bad input is one of these. Each message names the problem and the fix.
They subclass the builtin exception a Python user would expect (ValueError, FileNotFoundError, ...), so
``except ValueError`` still works.
"""

from __future__ import annotations


class PromptDeltaError(Exception):
    """Base class of every documented promptdelta error."""


class ConfigError(PromptDeltaError, ValueError):
    """A config key is unknown or a value is out of range."""


class TemplateError(PromptDeltaError, ValueError):
    """A template text is malformed (no mask, unbalanced brace, unknown key, bad JSON)."""


class VerbalizerError(PromptDeltaError, ValueError):
    """Label words or classes do not fit the data or the tokenizer."""


class DeltaError(PromptDeltaError, ValueError):
    """A delta cannot be attached, merged, detached or loaded as asked."""


class CheckpointError(PromptDeltaError, ValueError):
    """A checkpoint is missing, corrupt, or made for another model."""


class DataError(PromptDeltaError, ValueError):
    """A data folder or file is malformed (missing labels.txt, labels out of range, bad columns)."""


class BackboneError(PromptDeltaError, ValueError):
    """A backbone cannot be built or its weights do not match (missing/unexpected keys, shapes)."""


class MissingFileError(PromptDeltaError, FileNotFoundError):
    """A file or folder the user named does not exist."""
