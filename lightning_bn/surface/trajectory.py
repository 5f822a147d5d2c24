"""The plane of an optimization path: top-2 PCA directions of W_i - W_final (Li et al., 2018, Sec. 7).

With the n checkpoints W_1..W_n of one run (W_n = W_final) and the rows of

    M = [W_1 - W_n; ...; W_{n-1} - W_n]     (flattened over the varied parameters),

the directions are the top-2 principal axes of M (rows centred, as Li et al.'s
``sklearn.decomposition.PCA``), i.e. the top right-singular vectors of M - mean(M): unit
vectors, orthogonal. The explained variance of each is s_k^2 / sum(s^2). The path point of
W_i is its projection onto the plane through W_final spanned by them,

    (a_i, b_i) = (<W_i - W_final, d1>, <W_i - W_final, d2>),

the coordinates at which W_final + a d1 + b d2 is closest to W_i; the surface of that plane is
drawn in the same coordinates, so the path and the contours agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_bn.errors import ConfigError
from lightning_bn.surface.directions import Direction


@dataclass
class TrajectoryPlane:
    """d1, d2 (state-dict shaped, 0 outside ``names``), explained variance ratios, path (n, 2)."""

    d1: Direction
    d2: Direction
    explained_variance: tuple[float, float]
    path: Tensor


def flatten(state: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """The entries ``names`` of ``state`` as one float64 vector (in that order)."""
    return torch.cat([state[n].detach().reshape(-1).double().cpu() for n in names])


def unflatten(vector: Tensor, like: Mapping[str, Tensor], names: Sequence[str]) -> Direction:
    """The inverse of :func:`flatten`, zeros for the entries of ``like`` not in ``names``."""
    out: Direction = {}
    offset = 0
    chosen = set(names)
    for name, ref in like.items():
        if name not in chosen:
            out[name] = torch.zeros_like(ref)
    for name in names:
        ref = like[name]
        out[name] = vector[offset : offset + ref.numel()].view(ref.shape).to(ref.device, ref.dtype)
        offset += ref.numel()
    return {name: out[name] for name in like}  # the model's order


def pca_plane(states: Sequence[Mapping[str, Tensor]], names: Sequence[str]) -> TrajectoryPlane:
    """The PCA plane of a path; ``states[-1]`` is W_final, the others the earlier checkpoints.

    ``states`` are parameter dicts (``named_parameters`` names); ``names`` the varied ones.
    """
    if len(states) < 3:
        raise ConfigError(f"a trajectory needs at least 3 checkpoints (2 PCA directions), got {len(states)}")
    final = flatten(states[-1], names)
    diffs = torch.stack([flatten(s, names) - final for s in states[:-1]])
    centred = diffs - diffs.mean(0, keepdim=True)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    total = float((singular**2).sum())
    if total == 0.0 or len(singular) < 2 or float(singular[1]) == 0.0:
        raise ConfigError("the checkpoints do not span a plane (the path has fewer than 2 directions of change)")
    axes = vh[:2]
    # an SVD's signs are arbitrary: point each axis from W_final towards the start of the path
    signs = torch.where(diffs[0] @ axes.T < 0, -1.0, 1.0).to(axes.dtype)
    axes = axes * signs[:, None]
    path = torch.cat([diffs @ axes.T, torch.zeros(1, 2, dtype=axes.dtype)])  # W_final at the origin
    like = states[-1]
    explained = (float(singular[0] ** 2) / total, float(singular[1] ** 2) / total)
    return TrajectoryPlane(unflatten(axes[0], like, names), unflatten(axes[1], like, names), explained, path)
