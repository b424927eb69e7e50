"""Fashion-MNIST as tensors: verified raw files, loaded through torchvision, split once."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets import FashionMNIST

from stages.errors import UserError

# MD5 of each file's decompressed bytes (upstream's and Debian's .gz files differ only in the
# gzip header, so the decompressed bytes are what identifies the data).
RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
CLASSES = FashionMNIST.classes
TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000  # the data set's sizes, for costs without loading it


def class_key(name: str) -> str:
    """A class name usable as a metric key ('T-shirt/top' would nest under dvclive)."""
    return name.replace("/", "_")


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def raw_folder(root: Path) -> Path:
    """Where torchvision's FashionMNIST(root) looks for the decompressed files."""
    return Path(root) / "FashionMNIST" / "raw"


def verify_raw(root: Path) -> None:
    """Refuse a data folder whose files are missing or altered."""
    folder = raw_folder(root)
    if not folder.is_dir():
        raise UserError(f"data folder {folder} does not exist: run `dvc repro fetch` first")
    for name, expected in RAW_MD5.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"data file {path} is missing: run `dvc repro fetch`")
        actual = md5_hex(path.read_bytes())
        if actual != expected:
            raise UserError(
                f"data file {path} is corrupt: MD5 {actual}, expected {expected}; "
                "run `dvc repro fetch` (or `dvc checkout`) to restore it"
            )


@dataclass
class Split:
    """Images as float tensors in [0, 1], shape (n, 1, 28, 28), with their integer labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "Split":
        return Split(self.images[:n], self.labels[:n])

    def to(self, device: torch.device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    train: Split
    val: Split
    test: Split


def _as_split(ds: FashionMNIST) -> Split:
    # Same scaling as torchvision's ToTensor(): uint8 -> float in [0, 1], no normalisation.
    return Split(ds.data.unsqueeze(1).float().div_(255.0), ds.targets.clone())


def load_dataset(
    root: Path,
    *,
    val_size: int,
    split_seed: int,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> Dataset:
    """Verify and load the data; carve a validation split from the training set.

    The validation images are drawn with their own seed, so every run and every training seed
    sees the same split. `train_limit` and `test_limit` take the first images (after the shuffle,
    for train) for quick runs.
    """
    verify_raw(root)
    full_train = _as_split(FashionMNIST(str(root), train=True, download=False))
    test = _as_split(FashionMNIST(str(root), train=False, download=False))
    if val_size >= len(full_train):
        raise UserError(
            f"val_size={val_size} leaves no training images (train has {len(full_train)})"
        )
    order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_limit is not None:
        train_idx = train_idx[:train_limit]
    if test_limit is not None:
        test = test.head(test_limit)

    def pick(idx: torch.Tensor) -> Split:
        return Split(full_train.images[idx], full_train.labels[idx])

    return Dataset(train=pick(train_idx), val=pick(val_idx), test=test)
