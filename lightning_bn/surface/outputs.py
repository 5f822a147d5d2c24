"""Files of a surface: ``surface.csv``, ``directions.pt``, the two PNGs, and TensorBoard.

``directions.pt`` holds ``{"d1": {name: tensor}, "d2": {...}}`` with the model's parameter names
and shapes (0 where a parameter does not move), plus how they were made (``mode``, ``bn``,
``seed``, ``explained_variance``, ``path``, ``a``, ``b``), so anyone can load a checkpoint, set
W + a d1 + b d2 and check any row of the CSV by hand.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from lightning_bn.interpolate import write_csv
from lightning_bn.surface.compute import Surface
from lightning_bn.surface.plot import contour_figure, save_png, surface3d_figure


def save_directions(surface: Surface, path: str | Path) -> Path:
    path = Path(path)
    payload = {
        "d1": {k: v.detach().cpu() for k, v in surface.d1.items()},
        "d2": {k: v.detach().cpu() for k, v in surface.d2.items()},
        "mode": surface.mode,
        "bn": surface.bn,
        "samples": dict(surface.samples),
        "a": list(surface.a),
        "b": list(surface.b),
        "explained_variance": surface.explained_variance,
        "path": None if surface.path is None else surface.path.clone(),
        **surface.meta,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_outputs(directory: str | Path) -> Surface:
    """The :class:`Surface` saved in ``directory`` by :func:`write_outputs` (its CSV and
    ``directions.pt``), e.g. to draw several runs' surfaces in one figure."""
    directory = Path(directory)
    saved = torch.load(directory / "directions.pt", map_location="cpu", weights_only=True)
    with open(directory / "surface.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    a, b = list(saved["a"]), list(saved["b"])
    if len(rows) != len(a) * len(b):
        raise ValueError(f"{directory}: surface.csv has {len(rows)} rows, directions.pt a {len(a)} x {len(b)} grid")
    columns = [c for c in rows[0] if c not in ("a", "b")] if rows else []
    values = {c: torch.tensor([float(r[c]) for r in rows], dtype=torch.float64).view(len(a), len(b)) for c in columns}
    path = saved.get("path")
    variance = saved.get("explained_variance")
    known = {"d1", "d2", "mode", "bn", "samples", "a", "b", "explained_variance", "path"}
    return Surface(
        a,
        b,
        values,
        saved["d1"],
        saved["d2"],
        saved["bn"],
        saved["mode"],
        dict(saved.get("samples", {})),
        explained_variance=None if variance is None else tuple(variance),
        path=None if path is None else torch.as_tensor(path, dtype=torch.float64),
        meta={k: v for k, v in saved.items() if k not in known},
    )


def write_outputs(surface: Surface, out: str | Path, title: str | None = None, tensorboard: str | None = None):
    """All files into ``out``; returns the figures (contour, 3-D)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(surface.rows(), out / "surface.csv", columns=["a", "b", *surface.columns])
    save_directions(surface, out / "directions.pt")
    contour = contour_figure(surface, title=title)
    view = surface3d_figure(surface, title=title)
    save_png(contour, out / "contour.png")
    save_png(view, out / "surface3d.png")
    if tensorboard:
        log_to_tensorboard(surface, contour, view, tensorboard)
    return contour, view


def log_to_tensorboard(surface: Surface, contour, view, log_dir: str | Path) -> None:
    """Figures under ``surface/contour`` and ``surface/3d``, the setup as text."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        writer.add_figure("surface/contour", contour, close=False)
        writer.add_figure("surface/3d", view, close=False)
        text = f"{surface.mode} plane; {surface.bn_label()}; cost: {surface.cost()}"
        if surface.explained_variance is not None:
            text += "; explained variance {:.1%}, {:.1%}".format(*surface.explained_variance)
        writer.add_text("surface/setup", text)
    finally:
        writer.close()
