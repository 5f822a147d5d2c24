import pickle

import numpy as np
import pytest
import torch

from lightning_bn.data import CIFAR10DataModule, EmbeddedCIFAR10DataModule
from lightning_bn.data.embedded import load_embedded_cifar10
from lightning_bn.errors import ConfigError


def test_embedded_subset_shapes_and_balance():
    data = load_embedded_cifar10()
    train_x, train_y = data["train"]
    test_x, test_y = data["test"]
    assert train_x.shape == (10_000, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (2_000, 3, 32, 32)
    assert train_y.bincount().tolist() == [1000] * 10
    assert test_y.bincount().tolist() == [200] * 10
    # Test images interleaved by class: every prefix of 10 k images (limit_val_batches) is balanced.
    for k in (1, 7, 50):
        assert test_y[: 10 * k].bincount(minlength=10).tolist() == [k] * 10
    # Real CIFAR-10 images: channel means near the published 0.491 / 0.482 / 0.447.
    means = train_x.float().mean(dim=(0, 2, 3)) / 255
    torch.testing.assert_close(means, torch.tensor([0.491, 0.482, 0.447]), atol=0.01, rtol=0)


def test_interleave_classes_on_a_class_sorted_list():
    from lightning_bn.data.embedded import _interleave_classes

    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    order = _interleave_classes(labels)
    assert labels[order].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert order.tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]  # within a class, the stored order is kept


def test_datamodule_batches_are_normalized_tensors():
    dm = EmbeddedCIFAR10DataModule(batch_size=64, augment=True)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(dm.train_set.images.mean().item()) < 0.1
    assert 0.9 < dm.train_set.images.std().item() < 1.1
    assert len(dm.val_dataloader().dataset) == 2_000


def test_augmentation_changes_images_but_not_labels():
    dm = EmbeddedCIFAR10DataModule(batch_size=8, augment=True)
    dm.setup("fit")
    image, label = dm.train_set[0]
    assert not torch.equal(image, dm.train_set.images[0]) or not torch.equal(dm.train_set[0][0], image)
    assert label == dm.train_set.labels[0]


def test_train_size_subset():
    dm = EmbeddedCIFAR10DataModule(batch_size=10, train_size=500)
    dm.setup("fit")
    assert len(dm.train_set) == 500
    assert len(dm.train_dataloader()) == 50


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "data.batch_size must be an integer >= 1, got 0"),
        ({"num_workers": -1}, "data.num_workers must be >= 0"),
        ({"train_size": 0}, "data.train_size must be >= 1"),
    ],
)
def test_bad_data_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EmbeddedCIFAR10DataModule(**kwargs)


def test_batch_larger_than_dataset_is_refused():
    dm = EmbeddedCIFAR10DataModule(batch_size=600, train_size=500)
    with pytest.raises(ConfigError, match="batch_size=600 exceeds the 500 training samples"):
        dm.setup("fit")


def test_cifar10_absent_offline_names_directory(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path), download=False)
    with pytest.raises(ConfigError, match=f"CIFAR-10 not found in data.root='{tmp_path}'.*cifar-10-python"):
        dm.setup("fit")


def _write_fake_cifar(root, n_train=20, n_test=10):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def batch(n):
        return {
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "labels": list(rng.integers(0, 10, size=n)),
        }

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n_train // 5), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar10_reads_torchvision_layout(tmp_path, monkeypatch):
    _write_fake_cifar(tmp_path)
    # The md5 check of torchvision would reject hand-made files; the reading path is what we test.
    monkeypatch.setattr("torchvision.datasets.CIFAR10._check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, batch_size=4)
    dm.setup("fit")
    assert dm.train_set.images.shape == (20, 3, 32, 32)
    assert len(dm.test_set) == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)
