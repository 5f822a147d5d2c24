"""Scalars and histograms of one run, read with TensorBoard's own event reader.

A run directory may hold several event files (a resumed run appends a new one; a ``test``
stage writes to ``test/``): all are merged. When a resumed run logs a step again, the value
written last wins, as the run that continued from the checkpoint is the one that counts.
Histograms are reduced to TensorBoard's distribution percentiles (the "distributions" tab):
min, 6.7%, 15.9%, 30.9%, 50%, 69.1%, 84.1%, 93.3%, max, i.e. +-0.5, 1, 1.5 sigma for a normal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import (
    HISTOGRAMS,
    SCALARS,
    EventAccumulator,
)
from tensorboard.plugins.distribution.compressor import NORMAL_HISTOGRAM_BPS, compress_histogram_proto

EVENT_GLOB = "events.out.tfevents.*"
IGNORED_TAGS = ("epoch", "hp_metric")  # Lightning's bookkeeping, not measurements
PERCENTILES = tuple(bp / 100 for bp in NORMAL_HISTOGRAM_BPS)


@dataclass(frozen=True)
class Series:
    """A scalar over training steps (sorted by step, one value per step)."""

    steps: np.ndarray
    values: np.ndarray

    @property
    def final(self) -> float:
        return float(self.values[-1])

    @property
    def mean(self) -> float:
        finite = self.values[np.isfinite(self.values)]
        return float(finite.mean()) if finite.size else float("nan")


@dataclass(frozen=True)
class Distribution:
    """A histogram over steps as percentiles: ``quantiles[i, j]`` is percentile ``PERCENTILES[j]`` at ``steps[i]``."""

    steps: np.ndarray
    quantiles: np.ndarray


@dataclass
class RunEvents:
    scalars: dict[str, Series] = field(default_factory=dict)
    distributions: dict[str, Distribution] = field(default_factory=dict)

    def tags(self, prefix: str = "") -> list[str]:
        """Scalar tags starting with ``prefix``, in the order they were first logged."""
        return [t for t in self.scalars if t.startswith(prefix)]


def event_dirs(run_dir: Path) -> list[Path]:
    """``run_dir`` and its sub-directories that hold event files (the run's own and its stages')."""
    found = {p.parent for p in Path(run_dir).rglob(EVENT_GLOB)}
    return sorted(found, key=lambda d: (len(d.relative_to(run_dir).parts), str(d)))


def read_events(run_dir: str | Path) -> RunEvents:
    """Every scalar and histogram logged under ``run_dir``."""
    scalars: dict[str, dict[int, tuple[float, float]]] = {}
    histograms: dict[str, dict[int, tuple[float, list[float]]]] = {}
    for directory in event_dirs(Path(run_dir)):
        for path in sorted(directory.glob(EVENT_GLOB)):
            # One accumulator per file; purging off: we resolve repeated steps ourselves, by wall time.
            acc = EventAccumulator(str(path), size_guidance={SCALARS: 0, HISTOGRAMS: 0}, purge_orphaned_data=False)
            acc.Reload()
            tags = acc.Tags()
            for tag in tags.get("scalars", []):
                if tag in IGNORED_TAGS:
                    continue
                slot = scalars.setdefault(tag, {})
                for event in acc.Scalars(tag):
                    if event.step not in slot or event.wall_time >= slot[event.step][0]:
                        slot[event.step] = (event.wall_time, event.value)
            for tag in tags.get("histograms", []):
                slot = histograms.setdefault(tag, {})
                for event in acc.Histograms(tag):
                    if event.step not in slot or event.wall_time >= slot[event.step][0]:
                        compressed = compress_histogram_proto(event.histogram_value)
                        slot[event.step] = (event.wall_time, [value for _, value in compressed])
    result = RunEvents()
    for tag, by_step in scalars.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        result.scalars[tag] = Series(steps, np.array([by_step[s][1] for s in steps], dtype=np.float64))
    for tag, by_step in histograms.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        result.distributions[tag] = Distribution(steps, np.array([by_step[s][1] for s in steps], dtype=np.float64))
    return result
