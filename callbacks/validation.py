"""Checks of the measurement callbacks' constructor arguments, with one-line messages.

A bad argument raises :class:`CallbackArgumentError`, a ``ValueError`` whose message names
the class, the argument, what is allowed and the value, e.g.
``ICSCallback: every_n_steps must be an integer >= 1, got 0``, so whatever shows it (a
traceback, jsonargparse's list of union errors, a command line) says what is wrong in its
first words. Its attributes (``owner``, ``argument``, ``value``, ``rule``) let a command line
name the option, e.g. ``trainer.callbacks[1].init_args.every_n_steps``.

Numbers are shown with ``:g`` (``0.0004``, not ``0.0003999999999999993``). This module
imports nothing from ``lightning_bn``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any


def show(value: Any) -> str:
    """``value`` as an error message shows it: numbers with ``:g``, strings quoted, lists element-wise."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(show(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class CallbackArgumentError(ValueError):
    """A constructor argument of a callback is invalid.

    ``str()``: ``"<owner>: <argument> <rule>, got <value>"``.

    Attributes:
        owner: the class name (``"ICSCallback"``).
        argument: the constructor argument (``"every_n_steps"``).
        value: the value given.
        rule: what is allowed, as a predicate (``"must be an integer >= 1"``).
    """

    def __init__(self, owner: str, argument: str, value: Any, rule: str) -> None:
        self.owner, self.argument, self.value, self.rule = owner, argument, value, rule
        super().__init__(f"{owner}: {argument} {rule}, got {show(value)}")

    @property
    def detail(self) -> str:
        """The message without the class and argument: ``"must be an integer >= 1, got 0"``."""
        return f"{self.rule}, got {show(self.value)}"

    def for_owner(self, owner: str) -> CallbackArgumentError:
        """The same error reported by ``owner`` (a subclass validating through its base)."""
        return CallbackArgumentError(owner, self.argument, self.value, self.rule)

    def __reduce__(self):  # picklable despite the custom signature (spawned processes)
        return type(self), (self.owner, self.argument, self.value, self.rule)


def fail(owner: str, argument: str, value: Any, rule: str) -> None:
    """Raise :class:`CallbackArgumentError`."""
    raise CallbackArgumentError(owner, argument, value, rule)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(owner: str, argument: str, value: Any, minimum: int, *, optional: bool = False, why: str = "") -> None:
    """An integer >= ``minimum`` (or None with ``optional``); ``why`` explains the bound, e.g. ``" (start_step)"``."""
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        fail(owner, argument, value, f"must be {'None or ' if optional else ''}an integer >= {minimum}{why}")


def check_any_int(owner: str, argument: str, value: Any) -> None:
    """Any integer (a seed)."""
    if not _is_int(value):
        fail(owner, argument, value, "must be an integer")


def check_bool(owner: str, argument: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(owner, argument, value, "must be True or False")


def check_choice(owner: str, argument: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        fail(owner, argument, value, f"must be one of {', '.join(show(c) for c in choices)}")


def check_number(owner: str, argument: str, value: Any, minimum: float) -> None:
    """A finite number >= ``minimum``."""
    if _is_int(value) or isinstance(value, float):
        if math.isfinite(value) and value >= minimum:
            return
    fail(owner, argument, value, f"must be a number >= {minimum:g}")


def check_positive_numbers(owner: str, argument: str, values: Any) -> tuple[float, ...]:
    """A non-empty list of finite numbers > 0, returned as a tuple of floats."""
    rule = "must be a non-empty list of finite numbers > 0"
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        fail(owner, argument, values, rule)
    for v in values:
        if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v) or v <= 0:
            fail(owner, argument, list(values), rule)
    return tuple(float(v) for v in values)


def check_names(owner: str, argument: str, value: Any) -> None:
    """None or a non-empty list of non-empty strings (module names)."""
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        fail(owner, argument, value, "must be None or a non-empty list of module names")
    if not all(isinstance(name, str) and name for name in value):
        fail(owner, argument, list(value), "must be None or a non-empty list of module names")


#: ``""`` or ``_``-separated words: what a ``key_suffix`` appends to every key of an instance
KEY_SUFFIX = re.compile(r"(_[A-Za-z0-9.+-]+)*")


def check_key_suffix(owner: str, value: Any) -> str:
    """A ``key_suffix``: ``""`` or ``_``-separated words of letters, digits, ``. + -``.

    Not ending in ``_at_bound``: a suffixed sharpness key would look like another key's
    bound fraction."""
    if not isinstance(value, str) or not KEY_SUFFIX.fullmatch(value) or value.endswith("_at_bound"):
        rule = "must be '' or _-separated words of letters, digits, . + - (e.g. '_lbfgsb', '_unit')"
        fail(owner, "key_suffix", value, rule)
    return value
