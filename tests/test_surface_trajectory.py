"""Trajectory planes (Li et al., 2018, Sec. 7): PCA directions against numpy's SVD, path
coordinates against the projection computed by hand, contours evaluated in the same plane."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lightning_bn.errors import ConfigError
from lightning_bn.surface import loss_surface, pca_plane, trajectory_surface, varied_names
from lightning_bn.surface.trajectory import flatten
from tests.test_surface_helpers import GaussianClasses, tiny_mlp


def path_of(model, offsets):
    """Copies of ``model`` at W + offset (flat, over the varied parameters) for each offset."""
    names = varied_names(model)
    out = []
    for offset in offsets:
        state = {k: v.detach().clone() for k, v in model.named_parameters()}
        start = 0
        for n in names:
            size = state[n].numel()
            state[n] += torch.as_tensor(offset[start : start + size], dtype=state[n].dtype).view(state[n].shape)
            start += size
        moved = copy.deepcopy(model)
        moved.load_state_dict({**moved.state_dict(), **state})
        out.append(moved)
    return out


def test_pca_plane_matches_numpy_svd():
    model = tiny_mlp()
    names = varied_names(model)
    size = sum(dict(model.named_parameters())[n].numel() for n in names)
    rng = np.random.default_rng(0)
    offsets = np.cumsum(rng.normal(size=(6, size)) * np.linspace(1.0, 0.1, size), 0)
    offsets -= offsets[-1]  # the last point is W_final
    models = path_of(model, offsets)
    plane = pca_plane([dict(m.named_parameters()) for m in models], names)
    diffs = offsets[:-1].astype(np.float32).astype(np.float64)  # the stored parameters are float32
    centred = diffs - diffs.mean(0)
    _, s, vh = np.linalg.svd(centred, full_matrices=False)
    for k, d in enumerate((plane.d1, plane.d2)):
        axis = flatten(d, names).numpy()
        assert abs(np.dot(axis, vh[k])) == pytest.approx(1.0, abs=1e-5)  # same axis up to sign
        assert np.linalg.norm(axis) == pytest.approx(1.0, abs=1e-6)
    assert plane.explained_variance == pytest.approx(tuple(s[:2] ** 2 / (s**2).sum()), rel=1e-4)
    assert abs(float(flatten(plane.d1, names) @ flatten(plane.d2, names))) < 1e-6
    assert all(torch.count_nonzero(plane.d1[n]) == 0 for n in dict(model.named_parameters()) if n not in names)


def test_path_points_are_the_coordinates_of_the_checkpoints_in_the_plane():
    model = tiny_mlp()
    names = varied_names(model)
    size = sum(dict(model.named_parameters())[n].numel() for n in names)
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.normal(size=(size, 2)))
    coords = np.array([[3.0, 1.0], [2.0, 1.5], [1.2, 0.4], [0.3, 0.5], [0.0, 0.0]])
    planar = path_of(model, coords @ basis.T)
    plane = pca_plane([dict(m.named_parameters()) for m in planar], names)
    final = flatten(dict(planar[-1].named_parameters()), names)
    d1, d2 = flatten(plane.d1, names), flatten(plane.d2, names)
    for k, m in enumerate(planar):  # a path in a plane: W_final + a d1 + b d2 is the checkpoint itself
        a, b = plane.path[k].tolist()
        torch.testing.assert_close(
            final + a * d1 + b * d2, flatten(dict(m.named_parameters()), names), atol=2e-6, rtol=0
        )
    # an arbitrary path: each path point is the orthogonal projection (residual perpendicular to the plane)
    wander = path_of(model, np.cumsum(rng.normal(size=(5, size)), 0)[::-1])
    plane = pca_plane([dict(m.named_parameters()) for m in wander], names)
    final = flatten(dict(wander[-1].named_parameters()), names)
    d1, d2 = flatten(plane.d1, names), flatten(plane.d2, names)
    for k, m in enumerate(wander):
        a, b = plane.path[k].tolist()
        residual = flatten(dict(m.named_parameters()), names) - (final + a * d1 + b * d2)
        assert abs(float(residual @ d1)) < 1e-5 and abs(float(residual @ d2)) < 1e-5
    assert plane.path[-1].tolist() == [0.0, 0.0]


def test_trajectory_surface_is_evaluated_in_the_plane_of_the_path():
    model = tiny_mlp()
    names = varied_names(model)
    size = sum(dict(model.named_parameters())[n].numel() for n in names)
    offsets = np.cumsum(np.random.default_rng(2).normal(size=(4, size)) * 0.3, 0)
    models = path_of(model, offsets - offsets[-1])
    dm = GaussianClasses()
    surface = trajectory_surface(models, dm, resolution=(4, 3), margin=0.1, num_samples=32)
    path = surface.path
    span = [surface.a[0], surface.a[-1], surface.b[0], surface.b[-1]]
    assert span[0] < path[:, 0].min() and path[:, 0].max() < span[1]
    assert span[2] < path[:, 1].min() and path[:, 1].max() < span[3]
    same = loss_surface(
        models[-1], dm, resolution=(4, 3), span=span, directions=(surface.d1, surface.d2), num_samples=32
    )
    torch.testing.assert_close(same.values["train_loss"], surface.values["train_loss"])
    assert surface.mode == "trajectory" and sum(surface.explained_variance) <= 1.0 + 1e-9
    with pytest.raises(ConfigError, match="at least 3 checkpoints"):
        trajectory_surface(models[:2], dm)
    with pytest.raises(ConfigError, match="do not span a plane"):
        trajectory_surface([models[0], models[0], models[0]], dm)
