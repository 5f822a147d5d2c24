"""CIFAR-10 in the image-folder layout (train/<class>/*.png, test/<class>/*): the tensors are the
files' pixels and labels, the decoded split is cached and rebuilt when the files change, and a
wrong tree fails in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_bn.data import CIFAR10DataModule, image_folder
from lightning_bn.data.cifar10 import CLASSES
from lightning_bn.errors import ConfigError


def make_tree(root: Path, per_class: dict[str, int] | None = None, size: int = 8, seed: int = 0) -> dict:
    """PNGs with random pixels: {split: [(pixels HxWx3, label), ...]} in class, then name order."""
    rng = np.random.default_rng(seed)
    content: dict[str, list] = {}
    for split, n in (per_class or {"train": 3, "test": 1}).items():
        content[split] = []
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
                content[split].append((pixels, label))
    return content


def test_splits_are_the_files_pixels_and_class_indices(tmp_path):
    content = make_tree(tmp_path)
    data = CIFAR10DataModule(root=str(tmp_path), batch_size=4)  # download=True by default: never used here
    data.prepare_data()
    for split, train in (("train", True), ("test", False)):
        images, labels = data.load_split(train=train)
        assert images.dtype == torch.uint8 and images.shape == (len(content[split]), 3, 8, 8)
        expected = np.stack([p for p, _ in content[split]]).transpose(0, 3, 1, 2)
        assert np.array_equal(images.numpy(), expected)
        assert labels.tolist() == [label for _, label in content[split]]
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32


def test_the_decoded_split_is_cached_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    make_tree(tmp_path)
    calls = []
    decode = image_folder._decode
    monkeypatch.setattr(image_folder, "_decode", lambda files: calls.append(len(files)) or decode(files))
    first = image_folder.read_image_folder(tmp_path, "train", CLASSES)
    again = image_folder.read_image_folder(tmp_path, "train", CLASSES)
    assert calls == [30] and torch.equal(first[0], again[0]) and (tmp_path / ".lightning_bn-train.pt").is_file()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "train" / "cat" / "0099.png")
    images, labels = image_folder.read_image_folder(tmp_path, "train", CLASSES)
    assert calls == [30, 31] and len(labels) == 31 and labels[3 * 3 + 3] == 3  # the new cat, after the others
    (tmp_path / ".lightning_bn-train.pt").write_bytes(b"not a tensor file")
    assert torch.equal(image_folder.read_image_folder(tmp_path, "train", CLASSES)[0], images)
    assert calls == [30, 31, 31]


def test_a_read_only_root_reads_without_a_cache(tmp_path, monkeypatch):
    make_tree(tmp_path)
    monkeypatch.setattr(image_folder.tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(PermissionError("ro")))
    images, _ = image_folder.read_image_folder(tmp_path, "train", CLASSES)
    assert images.shape[0] == 30 and not (tmp_path / ".lightning_bn-train.pt").exists()


def test_missing_split_is_one_line(tmp_path):
    make_tree(tmp_path, {"train": 1})
    with pytest.raises(
        ConfigError, match=r"^data.root='.*': no test/ folder \(expected test/<class>/\*.jpg beside train/\)$"
    ):
        CIFAR10DataModule(root=str(tmp_path), batch_size=2).setup("fit")


def test_unknown_class_folder_is_one_line(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "test" / "plane").mkdir()
    with pytest.raises(
        ConfigError, match=r"test: unknown class folder 'plane'; expected the classes airplane, automobile"
    ):
        image_folder.read_image_folder(tmp_path, "test", CLASSES)


def test_mixed_image_sizes_are_one_line(tmp_path):
    make_tree(tmp_path)
    Image.fromarray(np.zeros((16, 8, 3), dtype=np.uint8)).save(tmp_path / "train" / "dog" / "0050.png")
    with pytest.raises(ConfigError, match=r"0050.png: image size 8x16 differs from the others' 8x8"):
        image_folder.read_image_folder(tmp_path, "train", CLASSES)


def test_a_class_without_images_is_one_line(tmp_path):
    make_tree(tmp_path)
    for f in (tmp_path / "test" / "ship").iterdir():
        f.unlink()
    with pytest.raises(ConfigError, match=r"no images \(\*.jpg, \*.jpeg, \*.png\) for class 'ship'"):
        image_folder.read_image_folder(tmp_path, "test", CLASSES)


def test_a_directory_without_train_folder_is_not_an_image_folder(tmp_path):
    assert not image_folder.is_image_folder(tmp_path)
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert not image_folder.is_image_folder(tmp_path)
