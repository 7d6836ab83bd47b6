"""The data factory (`data.factory = "finetune_owner.data:owner_data"`): small synthetic images with label skew.

Each class is a fixed random pattern (the same on every owner: seeded by train.seed) plus noise. Owner i
holds mostly classes i, i+1 (mod the class count): 80% of its training items, the rest spread evenly, so
the owners' adapters pull apart, as the owners of a real label-skewed split would.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from unify_dist.data import Owner, OwnerDatasets

__all__ = ["owner_data", "images"]

CLASSES = 5
SIZE = 16


def images(labels: torch.Tensor, seed: int, g: torch.Generator, noise: float = 0.6) -> torch.Tensor:
    """[n, 1, SIZE, SIZE] images of the given classes: the class's pattern plus Gaussian noise."""
    patterns = torch.randn(CLASSES, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return patterns[labels] + noise * torch.randn(len(labels), 1, SIZE, SIZE, generator=g)


def owner_data(owner: Owner, n_train: int = 240, n_test: int = 200) -> OwnerDatasets:
    """This owner's train / val (skewed to its own classes) and test (all classes) items."""
    index, _ = owner.share
    g = torch.Generator().manual_seed(1000 * owner.seed + index)
    mine = torch.tensor([index % CLASSES, (index + 1) % CLASSES])
    skewed = torch.rand(n_train, generator=g) < 0.8
    labels = torch.where(skewed, mine[torch.randint(0, 2, (n_train,), generator=g)],
                         torch.randint(0, CLASSES, (n_train,), generator=g))  # fmt: skip
    x = images(labels, owner.seed, g)
    n_val = n_train // 6
    test_labels = torch.arange(n_test) % CLASSES
    test = TensorDataset(images(test_labels, owner.seed, g), test_labels)
    return OwnerDatasets(
        train=TensorDataset(x[n_val:], labels[n_val:]), val=TensorDataset(x[:n_val], labels[:n_val]), test=test,
        classes=[f"pattern{c}" for c in range(CLASSES)],
    )
