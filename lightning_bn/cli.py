"""LightningCLI entry point: ``python train.py fit --config configs/quickstart.yaml``.

Model and data are chosen by ``class_path`` (any LightningModule / LightningDataModule;
ours live in ``lightning_bn``). Configs are parsed in omegaconf mode, so ``${...}``
interpolation works. User mistakes (bad values, unknown keys or names, missing files or
data) end the run with one line on stderr and exit status 2, naming the option, e.g.::

    error: trainer.callbacks[1].init_args.every_n_steps (ICSCallback): must be an integer >= 1, got 0

Mistakes are found when parsing (types, unknown keys), when building the objects (values
the constructors refuse: ``ConfigError``, the callbacks' ``CallbackArgumentError``, the
Trainer's checks) and when the run sets up (callbacks' ``setup``, missing data). Until
training starts, Lightning's informational log lines are held back, so a mistake prints
only its one line; they are shown as usual once training starts (or before a traceback).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import inspect
import logging
import re
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning import callbacks as pl_callbacks
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

import callbacks as measurement_callbacks
from callbacks.validation import CallbackArgumentError
from lightning_bn import models
from lightning_bn.errors import ConfigError, fail
from lightning_bn.tensorboard_summary import TensorBoardSummary

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default"},
    },
    "log_every_n_steps": 10,
}

_NOISE = ("Expected a <class 'NoneType'>", "Given value", "Subtypes:", "Errors:", "usage:")
#: exceptions a constructor or a ``setup`` hook raises for a value it refuses
_REFUSALS = (ValueError, MisconfigurationException)
#: ``ckpt_path`` values Lightning resolves itself (not files)
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
_TYPE_NAMES = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "NoneType": "null",
    "list": "a list",
    "dict": "a mapping",
}


# -- jsonargparse's error reports, in one line ------------------------------------------------
@dataclass
class _Problem:
    path: list[str] = field(default_factory=list)  # option keys, outermost first
    reason: str = ""
    owner: str | None = None  # class path of the innermost class given by class_path
    value: str | None = None  # the value given, as jsonargparse printed it
    unknown: bool = False  # path[-1] is not an option
    class_path: str | None = None  # a class_path that cannot be imported
    given: str | None = None  # the outermost "Given value:" (to find a list element)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _type_text(text: str) -> str:
    text = text.strip().rstrip(".")
    found = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>", text)
    if found:
        return _TYPE_NAMES.get(found.group(1), found.group(1))
    found = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    if found:
        return "one of " + found.group(1)
    return text


def _parse_problem(lines: list[str]) -> _Problem:
    """What a jsonargparse error report says: the key path, the innermost reason, the value."""
    lines = [line for line in lines if line.strip()]
    if not lines:
        return _Problem(reason="invalid arguments")
    first = lines[0].strip().lstrip("- ")
    # The report's own "Given value:" is the least indented one (nested reports have theirs).
    givens = [
        (_indent(ln), -i, ln.split("Given value:", 1)[1].strip()) for i, ln in enumerate(lines) if "Given value:" in ln
    ]
    given = min(givens)[2] if givens else None
    key = re.match(r'Parser key "([^"]+)":\s*(.*)$', first)
    if not key:
        unknown = re.match(r"Option '([^']+)' is not accepted", first) or re.match(
            r"Subcommand '[^']+' does not accept option '([^']+)'", first
        )
        if unknown:
            return _Problem([unknown.group(1)], "not an option", unknown=True)
        found = re.match(r"unrecognized arguments: (\S+)", first)
        if found:
            return _Problem([found.group(1).lstrip("-").split("=", 1)[0]], "not an option", unknown=True)
        found = re.match(r"the following arguments are required: (.+)$", first)
        if found:
            return _Problem([found.group(1).split(",")[0].strip()], "is required but was not given")
        return _Problem(reason=" ".join(line.strip() for line in lines))
    name, inline = key.group(1), key.group(2).strip()
    body = lines[1:]
    if inline:
        return _Problem([name], " ".join([inline, *(b.strip() for b in body)]), given=given)
    # A class given by class_path refused its init_args: explain the nested report.
    for j, line in enumerate(body):
        found = re.match(r"-?\s*Problem with given class_path '([^']+)':\s*(.*)$", line.strip())
        if not found:
            continue
        class_path, rest = found.groups()
        nested = [rest] if rest else []
        for other in body[j + 1 :]:
            if _indent(other) <= _indent(line):
                break
            nested.append(other)
        inner = _parse_problem(nested)
        if inner.path:
            return _Problem(
                [name, "init_args", *inner.path],
                inner.reason,
                owner=inner.owner or class_path,
                value=inner.value,
                unknown=inner.unknown,
                given=given,
            )
        text = " ".join(n.strip() for n in nested)
        reason = f"Problem with given class_path '{class_path}': {text}"
        return _Problem([name], reason, given=given, class_path=class_path)
    # A class name that is neither registered (SGD, StepLR) nor importable.
    if any("Expected a dot import path string" in line or "Expected a path but" in line for line in body):
        example = " (e.g. SGD, Adam or torch.optim.AdamW)" if name == "optimizer" else ""
        return _Problem([name], f"expected a class name or import path{example}", value=given)
    # A type mismatch: "Expected a <class 'int'>. Got value: abc" (or one per union member).
    expected, value = [], None
    for line in body:
        found = re.match(r"-?\s*Expected a (.+?)(?:\. Got value: (.*))?$", line.strip())
        if found:
            expected.append(_type_text(found.group(1)))
            value = found.group(2) if found.group(2) is not None else value
    if expected:
        unique = list(dict.fromkeys(expected))
        return _Problem([name], "expected " + " or ".join(unique), value=value if value is not None else given)
    reasons = [
        line.strip().lstrip("- ").strip()
        for line in body
        if not line.strip().startswith(_NOISE) and not line.strip().lstrip("- ").startswith(_NOISE)
    ]
    reasons = [r for r in reasons if r != "Does not validate against any of the Union subtypes"]
    return _Problem([name], " ".join(reasons[:2]) if reasons else body[-1].strip() if body else "invalid")


def _fields(node: ast.AST | None) -> dict[str, ast.AST]:
    """The keys of a dict or ``Namespace(...)`` in jsonargparse's printed "Given value:"."""
    if isinstance(node, ast.Dict):
        return {k.value: v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)}
    if isinstance(node, ast.Call):
        return {kw.arg: kw.value for kw in node.keywords if kw.arg}
    return {}


def _given_elements(given: str | None) -> list[tuple[str | None, dict[str, ast.AST], bool]]:
    """(class_path, init_args, already validated) of each element of a list "Given value:"."""
    try:
        tree = ast.parse(given or "", mode="eval").body
    except (SyntaxError, ValueError):
        return []
    if not isinstance(tree, ast.List):
        return []
    out = []
    for element in tree.elts:
        if isinstance(element, ast.Constant):
            out.append((element.value, {}, False))
            continue
        found = _fields(element).get("class_path")
        path = found.value if isinstance(found, ast.Constant) else None
        # Elements before the failing one are already validated (Namespace); raw ones are dicts.
        out.append((path, _fields(_fields(element).get("init_args")), not isinstance(element, ast.Dict)))
    return out


def _element_index(given: str | None, class_path: str | None, key: str | None) -> int | None:
    """Which element of a list value (jsonargparse's "Given value:") has ``class_path`` and sets ``key``."""
    if not class_path:
        return None
    matches = [
        (validated, index)
        for index, (path, init, validated) in enumerate(_given_elements(given))
        if path == class_path and (key is None or key in init)
    ]
    return min(matches)[1] if matches else None


def _unknown_callback(given: str | None) -> tuple[int | None, str | None]:
    """(index, class_path) of the first callback in a list "Given value:" that names no class."""
    for index, (path, _, _) in enumerate(_given_elements(given)):
        if isinstance(path, str) and not _resolves(path):
            return index, path
    text = (given or "").strip().strip("'\"")
    return None, text if text and not text.startswith("[") else None


def _resolves(class_path: str) -> bool:
    """Whether ``class_path`` names a class jsonargparse can find (an import path or a known name)."""
    if "." not in class_path:
        return any(known.rpartition(".")[2] == class_path for known in _known_classes("trainer.callbacks"))
    module_name, _, name = class_path.rpartition(".")
    try:
        return isinstance(getattr(__import__(module_name, fromlist=[name]), name, None), type)
    except (ImportError, ValueError):
        return False


def _known_classes(section: str) -> list[str]:
    """The classes a user can name for ``model`` or ``trainer.callbacks``: ours first, then Lightning's."""
    if section == "model":
        return [f"lightning_bn.{name}" for name in models.__all__]
    ours = [f"callbacks.{n}" for n in measurement_callbacks.__all__ if _is_callback(measurement_callbacks, n)]
    lightnings = [f"pytorch_lightning.callbacks.{n}" for n in pl_callbacks.__all__ if _is_callback(pl_callbacks, n)]
    return [c for c in ours if not c.endswith(".MeasurementCallback")] + lightnings


def _is_callback(module: Any, name: str) -> bool:
    obj = getattr(module, name, None)
    return isinstance(obj, type) and issubclass(obj, pl.Callback) and not inspect.isabstract(obj)


def _class_hint(section: str, class_path: str) -> str:
    """The "; did you mean ...? (the known classes)" tail of an error about a class not found."""
    known = _known_classes(section)
    by_name = {k.rpartition(".")[2]: k for k in reversed(known)}
    close = _suggest(class_path.rpartition(".")[2], list(by_name))
    hint = f"; did you mean {by_name[close]!r}?" if close else ""
    if section == "model":
        return f"{hint} (the project's models: {', '.join(known)})"
    ours = [k for k in known if k.startswith("callbacks.")]
    return f"{hint} (the project's callbacks: {', '.join(ours)}; or Lightning's, e.g. ModelCheckpoint)"


def _suggest(word: str, choices: Sequence[str]) -> str | None:
    """The choice ``word`` is most likely a misspelling of: a close match, else a prefix either way
    (``lrate`` -> ``lr``, which difflib finds too different)."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return close[0]
    prefixes = [c for c in choices if min(len(c), len(word)) >= 2 and (word.startswith(c) or c.startswith(word))]
    return max(prefixes, key=len) if len(prefixes) == 1 else None


def _class_options(class_path: str) -> list[str]:
    """The constructor arguments of ``class_path`` (and of its bases, through ``**kwargs``)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(sys.modules.get(module_name) or __import__(module_name, fromlist=[name]), name)
    except (ImportError, AttributeError, ValueError):
        return []
    out: list[str] = []
    for klass in getattr(cls, "__mro__", ()):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        out += [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in out]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return out


def _show_given(value: str) -> str:
    try:
        float(value)
    except ValueError:
        return repr(value) if value not in ("None", "null", "true", "false") else value
    return value


def _callback_option(problem: _Problem, option: str) -> str:
    """``trainer.callbacks[i]...``: which element of the list the problem is about; for a class
    that is not found, the known callbacks go into ``problem.reason``."""
    if len(problem.path) > 2:
        index = _element_index(problem.given, problem.owner, problem.path[2])
        return option if index is None else f"trainer.callbacks[{index}]." + ".".join(problem.path[1:])
    if problem.path != ["trainer.callbacks"]:
        return option
    if problem.class_path:
        index = _element_index(problem.given, problem.class_path, None)
        problem.reason += _class_hint("trainer.callbacks", problem.class_path)
        return option if index is None else f"trainer.callbacks[{index}].class_path"
    if problem.reason.startswith("expected a class name"):
        # A list with one unknown name: point at that element instead of printing the whole list.
        index, class_path = _unknown_callback(problem.value)
        if class_path is not None:
            problem.reason = f"{class_path!r} is not a class" + _class_hint("trainer.callbacks", class_path)
            problem.value = None
            return option if index is None else f"trainer.callbacks[{index}].class_path"
    return option


def summarize_error(message: str, known_keys: Sequence[str] = ()) -> str:
    """Condense jsonargparse's nested error report into one line.

    jsonargparse explains a bad value as a tree (union subtypes tried, each one's error);
    the user needs the full option name, the reason and the value, e.g.
    ``model: class_path 'lightning_bn.Foo': module 'lightning_bn' has no attribute 'Foo'`` or
    ``trainer.callbacks[1].init_args.every_n_steps (ICSCallback): expected an integer, got 'abc'``.
    ``known_keys`` (the parser's options) are offered for a misspelled top-level option.
    """
    problem = _parse_problem(str(message).splitlines())
    if not problem.path:
        return problem.reason
    subcommand = re.match(r"(fit|validate|test|predict)\.(.+)$", problem.path[0])
    if subcommand:  # "fit.model" is the option "model" of `train.py fit`
        problem.path[0] = subcommand.group(2)
    option = ".".join(problem.path)
    if problem.path[0] == "trainer.callbacks":
        option = _callback_option(problem, option)
    owner = f" ({problem.owner.rpartition('.')[2]})" if problem.owner else ""
    reason = problem.reason
    if problem.unknown:
        choices = _class_options(problem.owner) if problem.owner else []
        close = _suggest(problem.path[-1], choices) if problem.owner else _suggest_key(option, known_keys)
        if close:
            reason += f"; did you mean {close!r}?"
        if problem.owner and choices:
            reason += f" (options of {problem.owner}: {', '.join(choices)})"
        elif not problem.owner and not close:
            reason += " (check its spelling; `python train.py fit --help` lists the options)"
    elif problem.value is not None:
        reason += f", got {_show_given(problem.value)}"
    named = problem.class_path or (problem.value if reason.startswith("expected a class name") else None)
    if problem.path == ["model"] and named:
        reason += _class_hint("model", named.strip("'\""))
    return f"{option}{owner}: {reason}"


def _suggest_key(option: str, known_keys: Sequence[str]) -> str | None:
    """The parser key ``option`` most likely means, compared name to name within its section
    (``trainer.max_epoch`` -> ``trainer.max_epochs``; ``trainer.foo`` is not ``trainer.logger``),
    else the same name in another section (``max_epochs`` -> ``trainer.max_epochs``)."""
    section, _, leaf = option.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known_keys if k.rpartition(".")[0] == section}
    close = _suggest(leaf, list(siblings))
    if close:
        return siblings[close]
    elsewhere = [k for k in known_keys if k.rpartition(".")[2] == leaf and k != option]
    return elsewhere[0] if len(elsewhere) == 1 else None


def _parser_keys(parser: Any) -> list[str]:
    keys = []
    for action in getattr(parser, "_actions", []):
        keys.append(action.dest)
        for sub in getattr(action, "_name_parser_map", {}).values():
            keys += _parser_keys(sub)
    return keys


class _Parser(LightningArgumentParser):
    """Reports a parse error as one line instead of the usage block and a nested report."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # argparse expands a unique prefix (``--trainer.max_epoch`` -> ``max_epochs``): a typo
        # would run silently on the command line while the same key in YAML is refused.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):  # argparse's API
        if not self.exit_on_error:
            # A nested parser (a class's init_args, one member of a union): jsonargparse
            # reports its error in context ("trainer.callbacks" ... "every_n_steps").
            return super().error(message, ex)
        raise ConfigError(summarize_error(message, _parser_keys(self)))  # main() prints it


# -- Lightning's log lines, held back until the run is under way ------------------------------
class _HeldLogs:
    """Keeps back what Lightning's log handlers would print, to show it later or drop it."""

    LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")

    def __init__(self) -> None:
        self.held: list[tuple[logging.Handler, logging.LogRecord]] = []
        self._filters: list[tuple[logging.Handler, _Hold]] = []
        self.warnings: list[tuple[Any, ...]] = []
        self._showwarning: Any = None

    def start(self) -> _HeldLogs:
        for name in self.LOGGERS:
            for handler in logging.getLogger(name).handlers:
                if all(handler is not h for h, _ in self._filters):
                    hold = _Hold(self, handler)
                    handler.addFilter(hold)
                    self._filters.append((handler, hold))
        # Warnings shown while setting up (e.g. a callback's "no logger" warning) too.
        self._showwarning = warnings.showwarning
        warnings.showwarning = lambda *args, **kwargs: self.warnings.append((args, kwargs))
        return self

    def _stop(self) -> None:
        for handler, hold in self._filters:
            handler.removeFilter(hold)
        self._filters = []
        if self._showwarning is not None:
            warnings.showwarning, self._showwarning = self._showwarning, None

    def release(self) -> None:
        """Stop holding and print what was held, in order."""
        self._stop()
        held, self.held = self.held, []
        for handler, record in held:
            handler.handle(record)
        shown, self.warnings = self.warnings, []
        for args, kwargs in shown:
            warnings.showwarning(*args, **kwargs)

    def drop(self) -> None:
        """Stop holding and forget what was held (a mistake's one line is all that is shown)."""
        self._stop()
        self.held, self.warnings = [], []


class _Hold(logging.Filter):
    def __init__(self, owner: _HeldLogs, handler: logging.Handler) -> None:
        super().__init__()
        self.owner, self.handler = owner, handler

    def filter(self, record: logging.LogRecord) -> bool:
        self.owner.held.append((self.handler, record))
        return False


class _ReleaseLogs(pl.Callback):
    """Shows the held log lines when fitting starts (every setup check has passed)."""

    def __init__(self, held: _HeldLogs) -> None:
        self._held = held

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._held.release()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._held.release()

    on_test_start = on_predict_start = on_validation_start  # type: ignore[assignment]


# -- which option an exception is about ---------------------------------------------------------
def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _raised_in(err: BaseException, kinds: tuple[type, ...], methods: tuple[str, ...]):
    """(object, exception): the outermost object of ``kinds`` whose method in ``methods`` is on
    the traceback of ``err`` or of one of its causes, and the exception that passed through it."""
    for exc in _chain(err):
        tb = exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code.co_name in methods and isinstance(frame.f_locals.get("self"), kinds):
                return frame.f_locals["self"], exc
            tb = tb.tb_next
    return None, None


def _first(err: BaseException, kind: type) -> Any:
    return next((e for e in _chain(err) if isinstance(e, kind)), None)


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _short(err: BaseException, limit: int = 120) -> str:
    """``Type: first sentence`` of an exception from a library, cut at ``limit`` characters."""
    text = _one_line(err).split(". ")[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}"


def _trainer_option(message: str) -> str:
    names = [n for n in inspect.signature(pl.Trainer.__init__).parameters if n != "self"]
    found = re.search(r"\b(" + "|".join(map(re.escape, names)) + r")\b", message)
    return f"trainer.{found.group(1)}" if found else "trainer"


class NormStudyCLI(LightningCLI):
    """LightningCLI with the embedded CIFAR-10 as default data and TensorBoard under ``runs/``;
    every user mistake becomes a :class:`ConfigError` that names the option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._held = _HeldLogs().start()
        try:
            super().__init__(*args, **kwargs)
        except ConfigError:
            self._held.drop()
            raise
        except BaseException:
            self._held.release()  # a bug or an interrupt: show everything before the traceback
            raise
        if self.quiet:
            self._held.drop()
        else:
            self._held.release()

    #: drop Lightning's log lines instead of showing them (``check``)
    quiet = False

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"data": {"class_path": "lightning_bn.data.EmbeddedCIFAR10DataModule"}})

    # Lightning's own steps, each made to name the option a mistake is about.
    def _parse_ckpt_path(self) -> None:
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if isinstance(ckpt_path, str) and ckpt_path:
            keyword = ckpt_path in _CKPT_KEYWORDS or ckpt_path.startswith("registry:") or "://" in ckpt_path
            if not keyword and not Path(ckpt_path).is_file():
                allowed = "a checkpoint file, or one of " + ", ".join(_CKPT_KEYWORDS)
                raise ConfigError(f"ckpt_path: no such checkpoint file (got {ckpt_path!r}; allowed: {allowed})")
        try:
            super()._parse_ckpt_path()
        except Exception as err:  # not a checkpoint, truncated, or its hyperparameters do not parse
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"ckpt_path: cannot read {ckpt_path!r} as a checkpoint ({_short(err)})") from err

    def before_instantiate_classes(self) -> None:
        # A single callback (not a list) is a list of one for Lightning; as a list, a constructor's
        # error is the one jsonargparse chains (it tries the union's list member first).
        section = self._section()
        trainer = section.get("trainer") if section is not None else None
        callbacks = trainer.get("callbacks") if trainer is not None else None
        if callbacks is not None and not isinstance(callbacks, list):
            trainer["callbacks"] = [callbacks]

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            message = self._explain_instantiation_error(err)
            if message is None:
                raise
            raise ConfigError(message) from err
        self.trainer.callbacks.append(_ReleaseLogs(self._held))
        # what TensorBoard opens on: the custom-scalars layout and the run's real hyperparameters
        if not any(isinstance(c, TensorBoardSummary) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(TensorBoardSummary())

    def _run_subcommand(self, subcommand: str) -> None:
        before = _LogDirBefore.of(self.trainer)
        try:
            super()._run_subcommand(subcommand)
        except Exception as err:
            message = self._explain_run_error(err)
            if message is None:
                raise
            # A mistake found at setup: the logger's fresh version_N would hold only an event
            # file and show up as an empty run (a row of dashes in the report).
            if self.trainer.global_step == 0 and self.trainer.is_global_zero:
                before.restore()
            raise ConfigError(message) from err

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print("\n".join(fit_summary(self.trainer)), flush=True)

    # -- explanations ---------------------------------------------------------------------------
    def _section(self) -> Any:
        return self.config.get(self.subcommand) if self.subcommand else self.config

    def _callback_specs(self) -> list[Any]:
        specs = (self._section().get("trainer") or {}).get("callbacks")
        return specs if isinstance(specs, list) else [] if specs is None else [specs]

    def _callback_index(self, owner: str, argument: str | None = None, value: Any = None) -> int | None:
        candidates = []
        for index, spec in enumerate(self._callback_specs()):
            class_path = spec.get("class_path", "") if hasattr(spec, "get") else ""
            if str(class_path).rpartition(".")[2] != owner:
                continue
            init_args = spec.get("init_args") or {}
            same = argument is not None and hasattr(init_args, "get") and init_args.get(argument) == value
            candidates.append((not same, index))
        return min(candidates)[1] if candidates else None

    def _explain_instantiation_error(self, err: Exception) -> str | None:
        bad_arg = _first(err, CallbackArgumentError)
        if bad_arg is not None:
            index = self._callback_index(bad_arg.owner, bad_arg.argument, bad_arg.value)
            if index is None:
                return str(bad_arg)
            return f"trainer.callbacks[{index}].init_args.{bad_arg.argument} ({bad_arg.owner}): {bad_arg.detail}"
        kinds = (pl.Callback, pl.LightningModule, pl.LightningDataModule, Logger, pl.Trainer)
        obj, exc = _raised_in(err, kinds, ("__init__",))
        config_error = _first(err, ConfigError)
        if obj is None:
            return str(config_error) if config_error is not None else _config_error_in(err)
        if not isinstance(exc, _REFUSALS) and config_error is None:
            return None  # a bug in a constructor: keep the traceback
        text = _one_line(config_error if config_error is not None else exc)
        name = type(obj).__name__
        if isinstance(obj, pl.Trainer):
            return f"{_trainer_option(text)}: {text}"
        if isinstance(obj, pl.Callback):
            index = self._callback_index(name)
            where = f"trainer.callbacks[{index}]" if index is not None else "trainer.callbacks"
        elif isinstance(obj, Logger):
            where = "trainer.logger"
        else:
            where = "model" if isinstance(obj, pl.LightningModule) else "data"
            if text.startswith((f"{where}.", f"{where}:")):
                return text
            # "lr must be > 0, got 0": name the option, model.init_args.lr
            leading = re.match(r"(\w+)\b", text)
            cls = type(obj)
            if leading and leading.group(1) in _class_options(f"{cls.__module__}.{cls.__qualname__}"):
                where = f"{where}.init_args.{leading.group(1)}"
        return f"{where} ({name}): {text.removeprefix(name + ': ')}"

    def _explain_run_error(self, err: Exception) -> str | None:
        config_error = _first(err, ConfigError)
        if config_error is not None:
            return str(config_error)
        obj, exc = _raised_in(err, (pl.Callback,), ("setup", "setup_measurement"))
        if obj is None or not isinstance(exc, _REFUSALS):
            misconfigured = _first(err, MisconfigurationException)  # Lightning's word for a user mistake
            if misconfigured is None:
                return None
            text = _one_line(misconfigured)
            return f"{_trainer_option(text)}: {text}"
        name = type(obj).__name__
        instances = (self._get(self.config_init, "trainer", default={}) or {}).get("callbacks") or []
        index = next((i for i, cb in enumerate(instances) if cb is obj), None)
        where = f"trainer.callbacks[{index}]" if index is not None else "trainer.callbacks"
        return f"{where} ({name}): {_one_line(exc).removeprefix(name + ': ')}"


# -- after the run ------------------------------------------------------------------------------
def fit_summary(trainer: pl.Trainer) -> list[str]:
    """A few plain lines after ``fit`` (instead of ending on a progress bar): the final metrics,
    the checkpoint and the log directory, i.e. what a user looks for next."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    epochs, steps = trainer.current_epoch, trainer.global_step
    lines = [f"fit finished: {epochs} epoch{'s' * (epochs != 1)}, {steps} step{'s' * (steps != 1)}"]
    for stage in ("train", "val"):
        shown = [_show_metric(stage, name, metrics.get(f"{stage}/{name}")) for name in ("loss", "acc")]
        shown = [text for text in shown if text]
        if shown:
            lines.append(f"  {stage:<11} {', '.join(shown)}")
    lines += _checkpoint_lines(trainer.checkpoint_callback)
    # logger.log_dir, not trainer.log_dir: the latter is a collective call under DDP (rank 0 only here)
    log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
    if log_dir:
        lines.append(f"  {'logs':<11} {log_dir}")
    return lines


def _show_metric(stage: str, name: str, value: float | None) -> str:
    if value is None:
        return ""
    text = f"{name} {value:.1%}" if name == "acc" else f"{name} {value:.4g}"
    # the module logs the training loss per step (the others per epoch)
    return f"{text} (last step)" if (stage, name) == ("train", "loss") else text


def _checkpoint_lines(ckpt: Any) -> list[str]:
    if not isinstance(ckpt, pl.callbacks.ModelCheckpoint):
        return []
    best, last = ckpt.best_model_path, ckpt.last_model_path
    lines = []
    if best and ckpt.monitor:
        score = f" ({ckpt.monitor}={float(ckpt.best_model_score):.4g})" if ckpt.best_model_score is not None else ""
        lines.append(f"  {'best ckpt':<11} {best}{score}")
    elif best:  # without a monitor, the "best" is simply the latest checkpoint
        lines.append(f"  {'checkpoint':<11} {best}")
    if last and last != best:
        lines.append(f"  {'last ckpt':<11} {last}")
    return lines


@dataclass
class _LogDirBefore:
    """What the logger's directory held before the run, to take back what a failed setup wrote
    (an event file alone reads as an empty run in the report)."""

    path: Path | None = None
    entries: set[str] | None = None  # None: the directory did not exist
    new_parents: list[Path] = field(default_factory=list)  # created with it, innermost first

    @classmethod
    def of(cls, trainer: pl.Trainer | None) -> _LogDirBefore:
        logger = getattr(trainer, "logger", None)
        # Only loggers whose log_dir is a plain path: asking others (W&B, MLflow) may start a run.
        if not isinstance(logger, (TensorBoardLogger, CSVLogger)) or not logger.log_dir:
            return cls()
        path = Path(logger.log_dir)
        if path.exists():  # e.g. a sweep run's directory (its train.log, an earlier attempt)
            return cls(path, {p.name for p in path.iterdir()})
        return cls(path, None, [p for p in path.parents if not p.exists()])

    def restore(self) -> None:
        if self.path is None or not self.path.exists():
            return
        if self.entries is not None:
            for entry in self.path.iterdir():
                if entry.name in self.entries:
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            return
        shutil.rmtree(self.path, ignore_errors=True)
        for parent in self.new_parents:  # rmdir only when empty: another run may be writing next to it
            try:
                parent.rmdir()
            except OSError:
                break


def _config_error_in(err: BaseException) -> str | None:
    """The message of a ConfigError raised by a constructor, even when jsonargparse wrapped it."""
    for seen in _chain(err):
        if isinstance(seen, (ConfigError, CallbackArgumentError)):
            return str(seen)
    text = str(err)
    generic = ("Expected a ", "Not a valid subclass", "a class path", "a dict ")
    found = [m for m in re.findall(r"^\s*- (.+)$", text, flags=re.MULTILINE) if not m.startswith(generic)]
    if "Union subtypes" in text and found:
        return found[0]
    return None


# -- the command line before LightningCLI sees it ---------------------------------------------
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--opt -1e-3`` -> ``--opt=-1e-3``: argparse takes ``-1e-3`` for an option, not a value."""
    out: list[str] = []
    for token in argv:
        if out and _NEGATIVE_NUMBER.match(token) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _check_config_files(argv: Sequence[str]) -> None:
    """Every ``--config FILE`` exists and is YAML: the error names the file and the line."""
    for i, token in enumerate(argv):
        if token in ("-c", "--config") and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith("--config="):
            value = token.split("=", 1)[1]
        else:
            continue
        path = Path(value)
        if not path.is_file():
            if "\n" not in value and not value.lstrip().startswith(("{", "[")) and ": " not in value:
                raise ConfigError(f"--config: no such file (got {value!r}; allowed: a YAML file)")
            continue
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(err, "problem", None) or _one_line(err)
            raise ConfigError(f"--config {value}: not valid YAML ({where}{problem})") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--config {value}: cannot read it ({_one_line(err)})") from None


def _build(cli_class: type[NormStudyCLI], args: list[str] | None, run: bool) -> NormStudyCLI:
    argv = list(sys.argv[1:] if args is None else args)
    fixed = _attach_negative_values(argv)
    if args is None and fixed != argv:
        sys.argv[1:] = fixed  # LightningCLI reads sys.argv itself when args is None
    _check_config_files(fixed)
    try:
        return cli_class(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=_Parser,
            parser_kwargs={"parser_mode": "omegaconf"},
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=None if args is None else fixed,
            run=run,
        )
    except argparse.ArgumentError as err:  # a parser that raises instead of exiting
        raise ConfigError(summarize_error(str(err))) from err
    except OmegaConfBaseException as err:  # a ${...} interpolation that does not resolve
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{key or '--config'}: {str(err).splitlines()[0]}") from None


class _QuietCLI(NormStudyCLI):
    quiet = True


def check(args: Sequence[str]) -> None:
    """Raise ``ConfigError`` (one line, naming the option) unless the CLI accepts ``args``
    (options without a subcommand, as ``main(args, run=False)`` takes them). Model, data and
    trainer are built, nothing runs and nothing is printed. Sweeps check their runs with it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _build(_QuietCLI, list(args), run=False)
        except ValueError as err:
            message = _config_error_in(err)
            if message is None:
                raise
            raise ConfigError(message) from None


def main(args: list[str] | None = None, run: bool = True) -> NormStudyCLI | None:
    """Run the CLI; ``args`` defaults to ``sys.argv[1:]``. Returns the CLI object."""
    # In-memory tensors need no loader workers: Lightning's hint to add some is noise here.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Lightning 2.6 with torch >= 2.10 warns about its own pytree use at every run.
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    try:
        return _build(NormStudyCLI, args, run)
    except ValueError as err:  # ConfigError is a ValueError; jsonargparse may wrap it
        message = _config_error_in(err)
        if message is None:
            raise
        fail(message)
