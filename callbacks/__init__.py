"""Measurement callbacks for any LightningModule (Santurkar et al. 2018, Keskar et al. 2017).

``MeasurementCallback`` is the base every measurement builds on (docs/measurement-core.md).
"""

from callbacks.activations import ActivationStatsCallback
from callbacks.base import MeasurementCallback, MeasurementWarning
from callbacks.context import StepContext
from callbacks.guards import is_measuring
from callbacks.hessian import HessianCallback
from callbacks.ics import ICSCallback
from callbacks.landscape import LandscapeCallback
from callbacks.norm_curvature import NormCurvatureCallback
from callbacks.norm_gradient import NormGradientCallback
from callbacks.schedule import Schedule
from callbacks.sharpness import KeskarSharpnessCallback

__all__ = [
    "ActivationStatsCallback",
    "HessianCallback",
    "ICSCallback",
    "KeskarSharpnessCallback",
    "LandscapeCallback",
    "MeasurementCallback",
    "MeasurementWarning",
    "NormCurvatureCallback",
    "NormGradientCallback",
    "Schedule",
    "StepContext",
    "is_measuring",
]
