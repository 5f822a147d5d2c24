"""Build the embedded CIFAR-10 subset shipped in ``lightning_bn/data/cifar10_subset.pt.xz``.

Input: the CIFAR-10-as-JPEG archive (layout ``train/<class>/NNNN.jpg``,
``test/<class>/NNNN.jpg``; see the project README for its origin). The JPEG bytes are kept
as they are (not decoded) so 12,000 real images fit in about 4 MB; the data module decodes
them once into memory with ``torchvision.io.decode_jpeg``.

Usage::

    python tools/build_embedded_cifar10.py cifar10_jpg.tar.gz \
        --train-per-class 1000 --test-per-class 200
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import tarfile
from pathlib import Path

import torch

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "lightning_bn" / "data" / "cifar10_subset.pt.xz"


def _collect(archive: Path) -> dict[tuple[str, str], list[tuple[str, bytes]]]:
    files: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or not parts[-1].endswith(".jpg"):
                continue
            split, cls, name = parts[-3], parts[-2], parts[-1]
            if split not in ("train", "test") or cls not in CLASSES:
                continue
            data = tar.extractfile(member).read()
            files.setdefault((split, cls), []).append((name, data))
    return files


def _pack(files, split: str, per_class: int) -> dict[str, torch.Tensor]:
    blobs, labels = [], []
    for label, cls in enumerate(CLASSES):
        # File order is by name: take the first `per_class` names, deterministic across runs.
        chosen = sorted(files[(split, cls)])[:per_class]
        if len(chosen) < per_class:
            raise SystemExit(f"{split}/{cls} has only {len(chosen)} images, {per_class} requested")
        blobs += [data for _, data in chosen]
        labels += [label] * per_class
    lengths = torch.tensor([len(b) for b in blobs], dtype=torch.int64)
    payload = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
    return {"jpeg": payload, "lengths": lengths, "labels": torch.tensor(labels, dtype=torch.uint8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    files = _collect(args.archive)
    blob = {
        "classes": list(CLASSES),
        "source": "CIFAR-10 (Krizhevsky 2009) re-encoded as JPEG q75; first N files per class by name",
        "archive_sha256": hashlib.sha256(args.archive.read_bytes()).hexdigest(),
        "train": _pack(files, "train", args.train_per_class),
        "test": _pack(files, "test", args.test_per_class),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    # Every 32x32 JPEG repeats the same ~600 bytes of tables; xz removes that redundancy,
    # shrinking the file about threefold.
    args.out.write_bytes(lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
