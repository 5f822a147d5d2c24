"""The error type for user mistakes (bad config values, bad arguments, missing files).

``train.py`` (and the sweep, report and interpolate commands) print a ``ConfigError`` as one
line ``error: ...`` and exit with status 2, instead of a traceback: a wrong value in a YAML
file is the user's to fix, not a bug to debug. It subclasses ``ValueError`` so library users
can catch it the usual way. Numbers in messages are shown with ``:g`` (:func:`format_value`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

# One rule for showing values in messages, shared with the callbacks (which cannot import us).
from callbacks.validation import show as format_value


class ConfigError(ValueError):
    """A user-facing configuration error whose message names the option, value and choices."""


def fail(message: str, status: int = 2) -> NoReturn:
    """End a command line with ``error: <message>`` (one line) on stderr and ``status``."""
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    sys.exit(status)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose mistakes end as one line ``error: ...`` and exit status 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:  # argparse's API
        fail(f"{message} (see {self.prog} --help)")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ``ConfigError`` unless ``value`` is > 0 (or >= 0 with ``allow_zero``)."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound}, got {format_value(value)}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        allowed = ", ".join(format_value(c) for c in choices)
        raise ConfigError(f"{name}={format_value(value)} is not allowed; choose one of: {allowed}")
