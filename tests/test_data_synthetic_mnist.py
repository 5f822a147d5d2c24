"""Synthetic Gaussian data (the DLN's) and MNIST / Fashion-MNIST from idx files (tiny files, no download)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from lightning_bn.cli import main
from lightning_bn.data import FashionMNISTDataModule, GaussianRegressionDataModule, MNISTDataModule
from lightning_bn.data.mnist import read_idx
from lightning_bn.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# -- synthetic Gaussian --------------------------------------------------------------------------


def _data(**kwargs) -> GaussianRegressionDataModule:
    data = GaussianRegressionDataModule(**kwargs)
    data.setup()
    return data


def test_gaussian_targets_come_from_the_linear_teacher():
    data = _data(num_samples=50, in_features=4, out_features=3, num_val_samples=20)
    x, y = data.train_set.tensors
    assert x.shape == (50, 4) and y.shape == (50, 3) and len(data.val_set) == 20
    torch.testing.assert_close(y, x @ data.teacher.T)
    noisy = _data(num_samples=5000, in_features=4, out_features=3, noise=0.5)
    x, y = noisy.train_set.tensors
    assert (y - x @ noisy.teacher.T).std().item() == pytest.approx(0.5, rel=0.05)


def test_gaussian_data_depend_only_on_the_seed():
    torch.manual_seed(123)
    a = _data(seed=1)
    torch.manual_seed(456)  # the global RNG plays no part
    b, c = _data(seed=1), _data(seed=2)
    assert torch.equal(a.teacher, b.teacher) and torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert not torch.equal(a.teacher, c.teacher)


def test_full_batch_is_the_whole_training_set_in_a_fixed_order():
    data = _data(num_samples=30)
    assert data.batch_size == 30 and data.full_batch
    epochs = [list(data.train_dataloader()) for _ in range(2)]
    assert all(len(batches) == 1 for batches in epochs)
    assert torch.equal(epochs[0][0][0], data.train_set.tensors[0])
    assert torch.equal(epochs[0][0][0], epochs[1][0][0])


def test_mini_batches_are_shuffled_and_all_the_same_size():
    data = _data(num_samples=30, batch_size=8)
    batches = list(data.train_dataloader())
    assert [len(b[0]) for b in batches] == [8, 8, 8]  # drop_last: every SGD batch the same size
    assert not torch.equal(batches[0][0], data.train_set.tensors[0][:8])


def test_gaussian_classification_labels_are_the_teacher_argmax():
    data = _data(num_samples=40, out_features=5, task="classification")
    x, labels = data.train_set.tensors
    assert labels.dtype == torch.long and torch.equal(labels, (x @ data.teacher.T).argmax(1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_samples": 0}, "data.num_samples must be an integer >= 1, got 0"),
        ({"batch_size": 0}, r"data.batch_size must be an integer in \[1, num_samples=1000\] or null"),
        ({"batch_size": 2000}, "data.batch_size must be an integer in"),
        ({"noise": -1.0}, "data.noise must be >= 0"),
        ({"task": "ranking"}, "data.task='ranking' is not allowed"),
    ],
)
def test_gaussian_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GaussianRegressionDataModule(**kwargs)


# -- MNIST / Fashion-MNIST idx files ------------------------------------------------------------------


def _idx_bytes(array: torch.Tensor) -> bytes:
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.numpy().tobytes()


def write_mnist(folder: Path, n_train: int = 12, n_test: int = 6, compress: bool = True, seed: int = 0) -> dict:
    """Tiny MNIST-format files: {split: (uint8 images, labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    content = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, (n,), dtype=torch.uint8, generator=generator)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name, data = f"{split}-{kind}-ubyte", _idx_bytes(array)
            if compress:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        content[split] = (images, labels)
    return content


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_read_idx_round_trip(tmp_path, compress):
    content = write_mnist(tmp_path, compress=compress)
    suffix = ".gz" if compress else ""
    images = read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}")
    assert images.dtype == torch.uint8 and torch.equal(images, content["train"][0])
    assert torch.equal(read_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}"), content["t10k"][1])


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")  # float type code
    with pytest.raises(ConfigError, match="is not an idx file of unsigned bytes"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(torch.zeros(4, dtype=torch.uint8))[:-1])
    with pytest.raises(ConfigError, match="truncated or corrupt: 11 bytes, its header announces 12"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize(
    "cls, layout, compress",
    [
        (FashionMNISTDataModule, "", True),  # Debian: /usr/share/datasets/fashion-mnist/*.gz
        (FashionMNISTDataModule, "FashionMNIST/raw", False),  # torchvision's layout
        (MNISTDataModule, "MNIST/raw", True),
    ],
)
def test_mnist_layouts_load_normalized_images(tmp_path, cls, layout, compress):
    content = write_mnist(tmp_path / layout, compress=compress)
    data = cls(root=str(tmp_path), batch_size=4)
    data.setup()
    images, labels = data.train_set.images, data.train_set.labels
    assert images.shape == (12, 1, 28, 28) and images.dtype == torch.float32
    assert torch.equal(labels, content["train"][1].long())
    expected = (content["train"][0].float() / 255 - cls.mean[0]) / cls.std[0]
    torch.testing.assert_close(images[:, 0], expected)
    assert len(data.test_set) == 6
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 1, 28, 28) and y.shape == (4,)


def test_mnist_and_fashion_use_their_own_statistics():
    assert MNISTDataModule.mean != FashionMNISTDataModule.mean
    assert MNISTDataModule.std != FashionMNISTDataModule.std


def test_missing_files_are_one_clear_error_naming_the_directory_and_files(tmp_path):
    data = FashionMNISTDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError) as info:
        data.setup()
    message = str(info.value)
    assert "\n" not in message
    assert "Fashion-MNIST not found in data.root=" in message and "nowhere" in message
    assert "train-images-idx3-ubyte[.gz]" in message and "t10k-labels-idx1-ubyte[.gz]" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_mnist_augment_is_refused():
    with pytest.raises(ConfigError, match="data.augment=true is not supported for MNIST"):
        MNISTDataModule(augment=True)


def test_mlp_config_runs_on_fashion_mnist_files_and_fails_cleanly_without_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_mnist(tmp_path / "fmnist", n_train=40, n_test=8)
    config = str(ROOT / "configs" / "mlp" / "batch.yaml")
    args = ["fit", "--config", config, "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1"]
    args += ["--data.init_args.batch_size", "8", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
    cli = main([*args, "--data.init_args.root", str(tmp_path / "fmnist")])
    assert cli.trainer.global_step == 5
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--data.init_args.root", str(tmp_path / "absent")])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Fashion-MNIST not found in data.root=" in errors[0]
