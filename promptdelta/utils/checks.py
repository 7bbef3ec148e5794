"""Type checks for config dataclasses: a wrong type is a :class:`ConfigError` naming the key, the value and
the expected type, never a ``TypeError`` from deep inside a comparison.

A field's kinds are a tuple of types; ``None`` in it means null is allowed. ``bool`` is only accepted where
``bool`` is listed (``True`` is an ``int`` to Python, never to a config), and an ``int`` is accepted where a
``float`` is (YAML reads ``lr: 1`` as an int).
"""

from __future__ import annotations

from typing import Any, Mapping

from promptdelta.errors import ConfigError


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def type_name(kinds: tuple) -> str:
    """``(int, None)`` -> ``"int or null"``."""
    names = {dict: "mapping", list: "list"}
    return " or ".join("null" if k is None else names.get(k, k.__name__) for k in kinds)


def has_kind(value: Any, kinds: tuple) -> bool:
    """Whether ``value`` fits one of ``kinds`` (see the module docstring for bool, int and float)."""
    if value is None:
        return None in kinds
    if isinstance(value, bool):
        return bool in kinds
    types = tuple(k for k in kinds if k is not None and k is not bool)
    return isinstance(value, types) or (float in kinds and isinstance(value, int))


def check_types(obj: Any, kinds_of: Mapping[str, tuple], prefix: str, see: str) -> None:
    """Raise :class:`ConfigError` for the first attribute of ``obj`` whose value does not fit ``kinds_of``.

    prefix: how the key is written to the user (``"train."`` for TrainConfig); see: where the fields are documented.
    """
    for name, kinds in kinds_of.items():
        value = getattr(obj, name)
        if not has_kind(value, kinds):
            raise ConfigError(f"{prefix}{name}={_short(value)} has the wrong type; it must be {type_name(kinds)} "
                              f"(see {see})")


def check_device(device: str) -> None:
    """Raise :class:`ConfigError` unless ``device`` (``cpu``, ``cuda[:i]``, ``mps``, ``xpu[:i]``) exists here."""
    import torch

    kind, _, index = str(device).partition(":")
    if kind == "cpu":
        return
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None),
               "xpu": getattr(torch, "xpu", None)}.get(kind)
    if backend is None or not backend.is_available():
        build = "this torch build" if kind != "cuda" or torch.version.cuda is None else "this machine"
        raise ConfigError(f"device={device!r}, but {build} has no {kind.upper()} device (torch "
                          f"{torch.__version__}); use --device cpu, or run where {kind} is available")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if index and int(index) >= count:
        raise ConfigError(f"device={device!r}, but only {count} {kind} device(s) exist (indices 0..{count - 1}); "
                          "pick one of those")
