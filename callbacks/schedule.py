"""When a measurement callback measures: a pure function of the training step.

Step ``t`` is ``trainer.global_step`` when the batch starts, i.e. the number of optimizer
steps already taken; measuring step ``t`` measures the update ``W_t -> W_{t+1}`` made on the
batch of that step. Because the decision depends on ``t`` alone (no counters, no clocks),
a run resumed from a checkpoint measures at exactly the steps the uninterrupted run would,
and every DDP rank takes the same decision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from callbacks.validation import check_int


@dataclass(frozen=True)
class Schedule:
    """Which training steps to measure.

    A step ``t`` is measured when ``start_step <= t`` (and ``t <= end_step`` if given) and
    ``r = t - start_step`` is a multiple of ``every_n_steps`` or, if
    ``log_points_per_decade`` is set, one of the log-spaced offsets
    ``round(10 ** (k / log_points_per_decade))`` for ``k = 0, 1, 2, ...`` (dense early
    measurements, e.g. 1, 2, 3, 4, 6, 10, 16, 25, 40, 63, 100, ... for 5 per decade).
    The two rules add up: for a purely log-spaced schedule make ``every_n_steps`` large.

    Args:
        every_n_steps: measure every n-th step (>= 1).
        start_step: first step that may be measured (>= 0); it is always measured.
        end_step: last step that may be measured (inclusive, >= start_step), or None.
        log_points_per_decade: add log-spaced steps with this many points per decade (>= 1).
    """

    every_n_steps: int = 1
    start_step: int = 0
    end_step: int | None = None
    log_points_per_decade: int | None = None

    def __post_init__(self) -> None:
        # CallbackArgumentError("Schedule", ...); a callback re-raises it under its own name.
        check_int("Schedule", "every_n_steps", self.every_n_steps, 1)
        check_int("Schedule", "start_step", self.start_step, 0)
        if self.end_step is not None:
            check_int("Schedule", "end_step", self.end_step, self.start_step, why=" (start_step)")
        check_int("Schedule", "log_points_per_decade", self.log_points_per_decade, 1, optional=True)

    def should_measure(self, step: int) -> bool:
        """Whether training step ``step`` (``trainer.global_step`` at batch start) is measured."""
        if step < self.start_step or (self.end_step is not None and step > self.end_step):
            return False
        offset = step - self.start_step
        if offset % self.every_n_steps == 0:
            return True
        return self.log_points_per_decade is not None and _is_log_step(offset, self.log_points_per_decade)

    def steps(self, max_step: int) -> list[int]:
        """All measured steps in ``[0, max_step]`` (for docs, plots and tests)."""
        return [t for t in range(max_step + 1) if self.should_measure(t)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Schedule:
        return cls(**state)


def _is_log_step(offset: int, per_decade: int) -> bool:
    if offset < 1:
        return False
    # The offsets round(10**(k/n)) near this one come from k close to n*log10(offset).
    k_center = round(per_decade * math.log10(offset))
    return any(round(10 ** (k / per_decade)) == offset for k in range(max(0, k_center - 2), k_center + 3))
