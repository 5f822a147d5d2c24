"""Shared test setup: CPU only, deterministic, quiet."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*litlogger.*|.*litmodels.*")


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> None:
    # Tests use tiny models: one intra-op thread is faster than two for them, and keeps
    # timings stable when the machine is shared.
    torch.set_num_threads(1)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
