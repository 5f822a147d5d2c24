"""The error type for user mistakes (bad config values, bad arguments, missing files).

``train.py`` prints a ``ConfigError`` as one line and exits with status 2, instead of a
traceback: a wrong value in a YAML file is the user's to fix, not a bug to debug. It
subclasses ``ValueError`` so library users can catch it the usual way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration error whose message names the option, value and choices."""


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ``ConfigError`` unless ``value`` is > 0 (or >= 0 with ``allow_zero``)."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of: {allowed}")
