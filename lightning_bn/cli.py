"""LightningCLI entry point: ``python train.py fit --config configs/quickstart.yaml``.

Model and data are chosen by ``class_path`` (any LightningModule / LightningDataModule;
ours live in ``lightning_bn``). Configs are parsed in omegaconf mode, so ``${...}``
interpolation works. User mistakes (bad values, unknown keys or names, missing data) end
the run with one line on stderr and exit status 2.
"""

from __future__ import annotations

import re
import sys
import warnings

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from lightning_bn import models
from lightning_bn.errors import ConfigError

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default"},
    },
    "log_every_n_steps": 10,
}

_NOISE = ("Expected a <class 'NoneType'>", "Given value", "Subtypes:", "Errors:", "usage:")


def summarize_error(message: str) -> str:
    """Condense jsonargparse's nested error report into one line.

    jsonargparse explains a bad value as a tree (union subtypes tried, each one's error);
    the user needs the key and the innermost reason, e.g.
    ``model: class_path 'lightning_bn.Foo': module 'lightning_bn' has no attribute 'Foo'``.
    """
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "invalid arguments"
    key = re.match(r'Parser key "([^"]+)":', lines[0])
    reasons = [
        line.lstrip("- ").strip()
        for line in lines[1:]
        if not line.startswith(_NOISE) and not line.lstrip("- ").startswith(_NOISE)
    ]
    if not key:
        text = lines[0]
        if "is not accepted" in text:
            text += " (check its spelling; `python train.py fit --model.help CLASS_PATH` lists the options)"
        return text
    reasons = [r for r in reasons if r != "Does not validate against any of the Union subtypes"]
    reason = " ".join(reasons[:2]) if reasons else lines[-1]
    if key.group(1) == "model" and "class_path" in reason:
        reason += f"; the project's models are {', '.join('lightning_bn.' + m for m in models.__all__)}"
    return f"{key.group(1)}: {reason}"


class _Parser(LightningArgumentParser):
    """Reports a parse error as one line instead of the usage block and a nested report."""

    def error(self, message: str, *args, **kwargs):  # argparse's API
        sys.stderr.write(f"error: {summarize_error(message)}\n")
        sys.exit(2)


class NormStudyCLI(LightningCLI):
    """LightningCLI with the embedded CIFAR-10 as default data and TensorBoard under ``runs/``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"data": {"class_path": "lightning_bn.data.EmbeddedCIFAR10DataModule"}})


def _config_error_in(err: BaseException) -> str | None:
    """The message of a ConfigError raised by a constructor, even when jsonargparse wrapped it."""
    seen = err
    while seen is not None:
        if isinstance(seen, ConfigError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(err)
    found = re.search(r"^\s*- (.+)$", text, flags=re.MULTILINE)
    if "Union subtypes" in text and found and "NoneType" not in found.group(1):
        return found.group(1)
    return None


def main(args: list[str] | None = None, run: bool = True) -> NormStudyCLI | None:
    """Run the CLI; ``args`` defaults to ``sys.argv[1:]``. Returns the CLI object."""
    # In-memory tensors need no loader workers: Lightning's hint to add some is noise here.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Lightning 2.6 with torch >= 2.10 warns about its own pytree use at every run.
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    try:
        return NormStudyCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=_Parser,
            parser_kwargs={"parser_mode": "omegaconf"},
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    except ValueError as err:  # ConfigError is a ValueError; jsonargparse may wrap it
        message = _config_error_in(err)
        if message is None:
            raise
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)
