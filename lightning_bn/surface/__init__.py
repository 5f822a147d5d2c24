"""2-D loss surfaces and optimization trajectories (Li et al., "Visualizing the Loss Landscape
of Neural Nets", NeurIPS 2018).

    L(W + a d1 + b d2)  on a grid of (a, b),

d1, d2 filter-normalized random directions (every conv filter / linear row of d with the norm
of the same filter of W; biases and BN parameters 0 unless asked) or, for a trajectory, the
top-2 PCA directions of the checkpoints W_i - W_final of one run with the path projected onto
them. BN statistics recomputed at every point (default) or the checkpoint's running ones.
Command line: ``python -m lightning_bn.surface`` (:mod:`.cli`); docs: docs/surface.md.
"""

from lightning_bn.surface.compute import Surface, fixed_sample, loss_surface, trajectory_surface
from lightning_bn.surface.directions import filter_normalize, random_directions, varied_names
from lightning_bn.surface.evaluate import evaluate_points, grid_coordinates
from lightning_bn.surface.trajectory import TrajectoryPlane, pca_plane

__all__ = [
    "Surface",
    "TrajectoryPlane",
    "evaluate_points",
    "filter_normalize",
    "fixed_sample",
    "grid_coordinates",
    "loss_surface",
    "pca_plane",
    "random_directions",
    "trajectory_surface",
    "varied_names",
]
