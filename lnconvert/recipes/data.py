"""Datasets for recipes: scikit-learn's digits (embedded, real), ImageFolder, CIFAR-10 on disk."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from .config import RecipeError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass
class Data:
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]  # one sample, (C, H, W)
    description: str


def _first(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A fixed random subset of ``limit`` samples (for quick runs), else the dataset."""
    if limit is None or limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[order] for t in dataset.tensors))
    return Subset(dataset, order.tolist())


def digits(cfg: dict[str, Any], seed: int) -> Data:
    """1797 real 8x8 handwritten digits (values 0..16) upscaled bilinearly to ``size``,
    divided by ``scale``, optionally standardised with the training set's mean and std.
    A stratified ``test_fraction`` split, fixed by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / float(cfg["scale"])
    y = torch.tensor(bunch.target, dtype=torch.long)
    size = int(cfg["size"])
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=cfg["test_fraction"],
                                           stratify=y.numpy(), random_state=seed)
    x_train, x_test = x[train_idx], x[test_idx]
    if cfg["normalize"]:
        mean, std = x_train.mean(), x_train.std()
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    train = _first(TensorDataset(x_train, y[train_idx]), cfg["max_train"], seed)
    test = _first(TensorDataset(x_test, y[test_idx]), cfg["max_test"], seed)
    how = "standardised" if cfg["normalize"] else f"/{cfg['scale']:g} only"
    return Data(train, test, 10, (1, size, size), f"digits {len(train)}+{len(test)} at {size}x{size} ({how})")


def _transform(cfg: dict[str, Any], mean: tuple, std: tuple, resize: bool = True):
    from torchvision import transforms as T

    steps = [T.Resize(int(cfg["size"])), T.CenterCrop(int(cfg["size"]))] if resize else []
    return T.Compose(steps + [T.ToTensor(), T.Normalize(cfg["mean"] or mean, cfg["std"] or std)])


def imagefolder(cfg: dict[str, Any], seed: int) -> Data:
    """``path/train`` + ``path/val`` (or ``path/test``) when present, else one folder split by
    ``test_fraction``. Resize + centre crop to ``size``, ImageNet normalisation by default."""
    from torchvision.datasets import ImageFolder

    if not cfg["path"]:
        raise RecipeError("data.path is not set: pass --data PATH (an ImageFolder directory)")
    root = Path(cfg["path"]).expanduser()
    if not root.is_dir():
        raise RecipeError(f"ImageFolder directory not found: {root}")
    transform = _transform(cfg, IMAGENET_MEAN, IMAGENET_STD)
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    try:
        if (root / "train").is_dir() and test_dir is not None:
            train, test = ImageFolder(root / "train", transform), ImageFolder(test_dir, transform)
            if train.classes != test.classes:
                raise RecipeError(f"{root}/train and {test_dir} have different class folders")
        else:
            full = ImageFolder(root, transform)
            order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
            n_test = max(1, int(round(len(full) * cfg["test_fraction"])))
            train, test = Subset(full, order[n_test:]), Subset(full, order[:n_test])
            train.classes = full.classes
    except (FileNotFoundError, OSError) as exc:
        raise RecipeError(f"{root} is not a usable ImageFolder: {str(exc).splitlines()[0]}") from None
    classes = train.classes
    size = int(cfg["size"])
    train, test = _first(train, cfg["max_train"], seed), _first(test, cfg["max_test"], seed)
    return Data(train, test, len(classes), (3, size, size),
                f"ImageFolder {root} ({len(classes)} classes, {len(train)}+{len(test)} images at {size}x{size})")


def cifar10(cfg: dict[str, Any], seed: int) -> Data:
    """CIFAR-10 from ``data_root`` (torchvision's ``cifar-10-batches-py`` layout); never downloads."""
    from torchvision.datasets import CIFAR10

    if not cfg["data_root"]:
        raise RecipeError("data.data_root is not set: pass --data DIR (the folder holding cifar-10-batches-py)")
    root = Path(cfg["data_root"]).expanduser()
    size = int(cfg["size"])
    transform = _transform(cfg, CIFAR_MEAN, CIFAR_STD, resize=size != 32)
    try:
        train = CIFAR10(str(root), train=True, transform=transform, download=False)
        test = CIFAR10(str(root), train=False, transform=transform, download=False)
    except RuntimeError:
        raise RecipeError(f"CIFAR-10 not found under {root} (expects {root / 'cifar-10-batches-py'}; "
                          f"nothing is downloaded): copy it there or use data.kind: imagefolder") from None
    train, test = _first(train, cfg["max_train"], seed), _first(test, cfg["max_test"], seed)
    return Data(train, test, 10, (3, size, size), f"CIFAR-10 {len(train)}+{len(test)} at {size}x{size}")


SOURCES = {"digits": digits, "imagefolder": imagefolder, "cifar10": cifar10}


def build_data(cfg: dict[str, Any], seed: int) -> Data:
    if cfg["kind"] not in SOURCES:
        raise RecipeError(f"unknown data.kind {cfg['kind']!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[cfg["kind"]](cfg, seed)
