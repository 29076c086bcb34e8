"""Finding a Conveyor instance from a ``module:attribute`` import string."""

from __future__ import annotations

import importlib
from typing import Any

from .core import Conveyor
from .errors import ConfigurationError


def load_yard(import_string: str) -> Conveyor:
    """Import ``module:attribute`` and return the Conveyor instance it names.

    Raises:
        ConfigurationError: the string is malformed, the module cannot be imported, it has no
            such attribute, or the attribute is not a ``Conveyor``.
    """
    module_name, sep, attribute = import_string.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(f"expected module:attribute, got {import_string!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import module {module_name!r}: {exc}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(
                f"module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not isinstance(target, Conveyor):
        raise ConfigurationError(f"{import_string} is a {type(target).__name__}, not a Conveyor")
    return target
