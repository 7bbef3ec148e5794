"""promptdelta (being assembled: the full public API lands when every layer exists)."""

__version__ = "0.1.0"
