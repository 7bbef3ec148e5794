"""Small shared helpers: atomic file writes, seeding."""

from promptdelta.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text, atomic_save_safetensors
from promptdelta.utils.seed import seed_everything

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "atomic_save_safetensors", "seed_everything"]
