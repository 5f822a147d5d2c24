"""A dataset stored as image files, ``<root>/<split>/<class>/*.jpg|jpeg|png``, read into uint8 tensors.

The layout of the CIFAR-10 JPEG archive (``train/airplane/0001.jpg``, ...). Decoding 60,000
small images takes seconds to tens of seconds, so the decoded split is cached beside the
images (``<root>/.lightning_bn-<split>.pt``) together with a fingerprint of the files (names,
sizes, modification times); the cache is reused while the files are unchanged and rebuilt
when one is added, removed or rewritten. A read-only ``root`` only skips the cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_bn.errors import ConfigError

SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_VERSION = 1  # bump when the cached layout changes


def is_image_folder(root: str | Path) -> bool:
    """Whether ``root`` looks like the image-folder layout (a ``train/`` directory of folders)."""
    train = Path(root) / "train"
    return train.is_dir() and any(p.is_dir() for p in train.iterdir())


def _files(split_dir: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """(file, label) of every image of the split, by class and then by name."""
    if not split_dir.is_dir():
        split = split_dir.name
        raise ConfigError(
            f"data.root={str(split_dir.parent)!r}: no {split}/ folder (expected {split}/<class>/*.jpg beside train/)"
        )
    folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    unknown = [f for f in folders if f not in classes]
    if unknown:
        raise ConfigError(
            f"{split_dir}: unknown class folder {unknown[0]!r}; expected the classes {', '.join(classes)}"
        )
    files = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES) if folder.is_dir() else []
        if not images:
            raise ConfigError(f"{split_dir}: no images (*.jpg, *.jpeg, *.png) for class {name!r} in {folder.name}/")
        files += [(p, label) for p in images]
    return files


def _fingerprint(files: list[tuple[Path, int]], root: Path) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for path, label in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _decode(files: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    first: tuple[int, int] | None = None
    arrays = []
    for path, _ in files:
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except OSError as err:
            raise ConfigError(f"{path}: not a readable image ({err})") from err
        if first is None:
            first = array.shape[:2]
        elif array.shape[:2] != first:
            raise ConfigError(
                f"{path}: image size {array.shape[1]}x{array.shape[0]} differs from the others' "
                f"{first[1]}x{first[0]} (all images must have one size)"
            )
        arrays.append(array)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor([label for _, label in files], dtype=torch.long)


def read_image_folder(root: str | Path, split: str, classes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, H, W) and int64 labels (index into ``classes``) of ``root/split``."""
    root = Path(root)
    files = _files(root / split, classes)
    fingerprint = _fingerprint(files, root)
    cache = root / f".lightning_bn-{split}.pt"
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
            if saved.get("fingerprint") == fingerprint:
                return saved["images"], saved["labels"]
        except Exception:  # a truncated or foreign file: decode again and replace it
            pass
    images, labels = _decode(files)
    _write_cache(cache, {"fingerprint": fingerprint, "images": images, "labels": labels})
    return images, labels


def _write_cache(cache: Path, content: dict) -> None:
    """Atomically (a temporary file renamed into place), so that a concurrent reader (another
    DDP rank, a parallel sweep run) never sees half a file; silently skipped where ``root`` is
    read-only."""
    try:
        handle, tmp = tempfile.mkstemp(prefix=cache.name, dir=cache.parent)
    except OSError:
        return
    try:
        with os.fdopen(handle, "wb") as out:
            torch.save(content, out)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the images beside it are not
        os.replace(tmp, cache)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
