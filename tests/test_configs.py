"""Every LightningCLI config under configs/ parses and instantiates its model, data and trainer.

Sweep files (a top-level ``sweep:`` key, under configs/experiments/) are checked by the
sweep tests instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_bn.cli import main

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ALL_YAML = sorted(CONFIG_DIR.rglob("*.yaml"))
CLI_CONFIGS = [p for p in ALL_YAML if "sweep" not in (yaml.safe_load(p.read_text()) or {})]


def test_there_are_configs():
    assert (CONFIG_DIR / "quickstart.yaml") in CLI_CONFIGS


@pytest.mark.parametrize("path", CLI_CONFIGS, ids=[str(p.relative_to(CONFIG_DIR)) for p in CLI_CONFIGS])
def test_config_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["--config", str(path)], run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
