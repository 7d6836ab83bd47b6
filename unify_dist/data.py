"""Datasets as in-memory tensors, and each owner's share of them, derived from the seed alone.

Every owner computes the same partition from the same seed and keeps only its own part, so no data and
no index list ever crosses the network. Images are decoded once, normalised once and moved to the
training device once; the training loop only slices tensors (no per-sample Python in the hot path).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.utils.data
from torch import Tensor

from unify_dist.config import DataConfig
from unify_dist.errors import UserError

__all__ = ["Owner", "OwnerDatasets", "Split", "OwnerData", "partition", "check_owner_count", "prepare_dataset", "load_owner_data", "TORCHVISION_SETS"]

# name -> (torchvision class, folder under root, channels, side, classes, per-channel mean, std)
TORCHVISION_SETS = {
    "fashion_mnist": ("FashionMNIST", "FashionMNIST", 1, 28, 10, (0.2860,), (0.3530,)),
    "mnist": ("MNIST", "MNIST", 1, 28, 10, (0.1307,), (0.3081,)),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


@dataclass(frozen=True)
class Owner:
    """Who asks for data: what a data factory (`data.factory`) receives."""

    rank: int
    """This owner's index among the owners, 0 .. world_size - 1."""
    world_size: int
    """How many owners take part."""
    seed: int
    """train.seed: derive any shuffling from it, so every restart sees the same split."""
    name: str
    """The owner's name (today f"owner{rank}"); paths in the factory string may use {rank} and {owner}."""


@dataclass
class OwnerDatasets:
    """What a data factory returns: this owner's three datasets, each item (input tensor, class index)."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    classes: list[str]
    """The class names, the same list (same order) on every owner."""


@dataclass
class Split:
    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class OwnerData:
    """One owner's private data: its training share, its validation split, and its shard of the test set."""

    train: Split
    val: Split
    test: Split
    classes: list[str]
    in_channels: int
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def partition(
    labels: np.ndarray, scheme: str, owners: int, seed: int, alpha: float = 0.5, num_classes: int | None = None
) -> list[np.ndarray]:
    """Split sample indices among owners; the same arguments give the same split on every machine.

    iid: a seeded shuffle cut into equal parts (the paper's V-environment).
    label_split: owner i gets the i-th contiguous block of classes (2 owners: 0-4 and 5-9, the H-environment).
    dirichlet: per class, shares drawn from Dirichlet(alpha); redrawn (deterministically) until every
      owner has at least 10 samples.
    """
    rng = np.random.default_rng(seed)
    n_classes = num_classes or int(labels.max()) + 1
    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), owners)]
    if scheme == "label_split":
        if owners > n_classes:
            raise UserError(
                f"label_split gives each owner a block of classes, but {owners} owners > {n_classes} classes; "
                "use fewer owners or partition = 'dirichlet'"
            )
        blocks = np.array_split(np.arange(n_classes), owners)
        return [np.flatnonzero(np.isin(labels, b)) for b in blocks]
    if scheme == "dirichlet":
        for _ in range(1000):
            shares: list[list[np.ndarray]] = [[] for _ in range(owners)]
            for c in range(n_classes):
                idx = rng.permutation(np.flatnonzero(labels == c))
                cuts = (np.cumsum(rng.dirichlet([alpha] * owners))[:-1] * len(idx)).astype(int)
                for owner, part in enumerate(np.split(idx, cuts)):
                    shares[owner].append(part)
            out = [np.sort(np.concatenate(s)) for s in shares]
            if min(len(o) for o in out) >= 10:
                return out
        raise UserError(f"dirichlet alpha = {alpha} leaves some of {owners} owners nearly empty; raise data.alpha")
    raise ValueError(f"unknown partition scheme '{scheme}'")


def _torchvision_class(name: str):
    import torchvision.datasets as tvd

    return getattr(tvd, TORCHVISION_SETS[name][0])


def check_owner_count(cfg: DataConfig, owners: int) -> None:
    """Refuse, before any file is read, an owner count the partition cannot serve."""
    if cfg.partition == "label_split" and cfg.dataset in TORCHVISION_SETS:
        classes = TORCHVISION_SETS[cfg.dataset][4]
        if owners > classes:
            raise UserError(
                f"label_split gives each owner a block of classes, but {owners} owners > {classes} classes "
                f"in {cfg.dataset}; use fewer owners or partition = 'dirichlet'"
            )


def prepare_dataset(cfg: DataConfig) -> None:
    """Make sure the dataset's files are under the data root: download if allowed, else a clear error.

    Call on one process per machine before the others load (torchvision unpacks files in place).
    """
    if cfg.dataset == "folder":
        return
    cls, root = _torchvision_class(cfg.dataset), cfg.resolved_root()
    where = f"{root}/{TORCHVISION_SETS[cfg.dataset][1]}"
    try:
        for train in (True, False):
            cls(str(root), train=train, download=cfg.download)
    except Exception as e:  # torchvision raises RuntimeError, URLError, OSError... depending on what is missing
        how = "and it could not be downloaded" if cfg.download else "and data.download = false"
        raise UserError(
            f"dataset '{cfg.dataset}' is not under data root '{root}' ({where}) {how} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); put the official files in "
            f"{where}/raw/ or point UNIFY_DIST_DATA_ROOT (or data.root) at a folder that has them"
        ) from None


def _load_torchvision(cfg: DataConfig, train: bool) -> tuple[Tensor, Tensor]:
    ds = _torchvision_class(cfg.dataset)(str(cfg.resolved_root()), train=train, download=False)
    x = torch.as_tensor(np.asarray(ds.data))
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # -> N, C, H, W
    return x, y


def _normalise(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> Tensor:
    x = x.to(device=device, dtype=torch.float32).div_(255.0)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _own_share(indices: np.ndarray, cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle an owner's indices, cap them (train_per_owner), and cut off the validation split."""
    idx = np.random.default_rng(seed).permutation(indices)
    if cfg.train_per_owner:
        idx = idx[: int(round(cfg.train_per_owner / (1 - cfg.val_fraction)))]
    n_val = max(1, int(round(len(idx) * cfg.val_fraction)))
    return idx[n_val:], idx[:n_val]


def load_owner_data(cfg: DataConfig, seed: int, rank: int, world: int, device: torch.device) -> OwnerData:
    """This owner's train/val data and test shard, as normalised tensors on `device`."""
    if cfg.dataset == "folder":
        return _load_folder(cfg, seed, rank, world, device)
    _, _, channels, side, n_classes, mean, std = TORCHVISION_SETS[cfg.dataset]
    x, y = _load_torchvision(cfg, train=True)
    shares = partition(y.numpy(), cfg.partition, world, seed, cfg.alpha, n_classes)
    train_idx, val_idx = _own_share(shares[rank], cfg, seed + 1000 + rank)
    tx, ty = _load_torchvision(cfg, train=False)
    test_idx = np.random.default_rng(seed).permutation(len(ty))[: cfg.test_size or len(ty)]
    test_idx = np.sort(test_idx[rank::world])  # shards: disjoint, together the whole test set

    def split(xs: Tensor, ys: Tensor, idx: np.ndarray) -> Split:
        t = torch.as_tensor(idx)
        return Split(_normalise(xs[t], mean, std, device), ys[t].to(device))

    classes = [str(c) for c in range(n_classes)]
    return OwnerData(split(x, y, train_idx), split(x, y, val_idx), split(tx, ty, test_idx), classes, channels, side)


def _load_folder(cfg: DataConfig, seed: int, rank: int, world: int, device: torch.device) -> OwnerData:
    """An owner's own ImageFolder tree (class-named subfolders); its test shard is a held-out part of it."""
    from torchvision import datasets, transforms

    path = Path(cfg.folder.replace("{rank}", str(rank))).expanduser()
    if not path.is_dir():
        raise UserError(f"owner {rank}'s image folder '{path}' does not exist; check data.folder ('{cfg.folder}')")
    steps = [transforms.Grayscale(1)] if cfg.channels == 1 else [transforms.Lambda(lambda im: im.convert("RGB"))]
    tf = transforms.Compose([*steps, transforms.Resize((cfg.image_size, cfg.image_size)), transforms.PILToTensor()])
    try:
        ds = datasets.ImageFolder(str(path), transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"owner {rank}'s folder '{path}' is not an image folder ({e}); use one subfolder per class")
    x = torch.stack([ds[i][0] for i in range(len(ds))])  # decoded once, at load time
    y = torch.as_tensor(ds.targets, dtype=torch.int64)
    order = np.random.default_rng(seed + rank).permutation(len(y))
    n_hold = max(1, int(round(len(y) * cfg.val_fraction)))
    test_idx, rest = order[:n_hold], order[n_hold:]
    train_idx, val_idx = _own_share(rest, cfg, seed + 1000 + rank)
    half = (0.5,) * cfg.channels

    def split(idx: np.ndarray) -> Split:
        t = torch.as_tensor(idx)
        return Split(_normalise(x[t], half, half, device), y[t].to(device))

    return OwnerData(split(train_idx), split(val_idx), split(test_idx), list(ds.classes), cfg.channels, cfg.image_size)
