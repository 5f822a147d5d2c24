"""The report: ``python -m lightning_bn.report RUNS_DIR`` turns TensorBoard logs into the
papers' figures (PNG) and a markdown summary with tables and the exact commands.

- :mod:`~lightning_bn.report.events`: read scalars and histograms (TensorBoard's reader).
- :mod:`~lightning_bn.report.runs`: find runs, group them into experiments and configurations.
- :mod:`~lightning_bn.report.summary`: the numbers of the tables.
- :mod:`~lightning_bn.report.curves`, :mod:`~lightning_bn.report.distributions`,
  :mod:`~lightning_bn.report.grids`: the figures.
- :mod:`~lightning_bn.report.markdown`, :mod:`~lightning_bn.report.build`: the document.
"""

from lightning_bn.report.build import build_report, make_figures
from lightning_bn.report.events import RunEvents, read_events
from lightning_bn.report.runs import Experiment, RunInfo, discover

__all__ = ["Experiment", "RunEvents", "RunInfo", "build_report", "discover", "make_figures", "read_events"]
