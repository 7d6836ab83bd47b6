"""The data factory (`data.factory = "tabular_owner.data:owner_data"`): this owner's rows, and no one else's."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from tabular_owner import DIR_ENV, owners_dir
from unify_dist.data import Owner, OwnerDatasets
from unify_dist.errors import UserError

__all__ = ["owner_data"]

VAL_FRACTION = 0.15


def owner_data(owner: Owner) -> OwnerDatasets:
    """Read owner{i}.npz, hold back a validation share (seeded), standardise with this owner's statistics.

    i is this owner's share index: its rank, or its place in train.owners when owners are named.
    """
    index, count = owner.share
    path = owners_dir() / f"owner{index}.npz"
    if not path.is_file():
        raise UserError(
            f"{owner.name}'s file '{path}' does not exist; run `python -m tabular_owner.split --owners "
            f"{count} --out DIR` and point {DIR_ENV} at DIR"
        )
    with np.load(path) as f:
        x, y, x_test, y_test = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
        classes = [str(c) for c in f["classes"]]
    order = np.random.default_rng([owner.seed, index]).permutation(len(y))
    n_val = max(1, int(len(y) * VAL_FRACTION))
    val, train = order[:n_val], order[n_val:]
    # Standardise with this owner's own training rows: no statistic of anyone's data leaves its owner.
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    return OwnerDatasets(
        train=_tensors((x[train] - mean) / std, y[train]),
        val=_tensors((x[val] - mean) / std, y[val]),
        test=_tensors((x_test - mean) / std, y_test),
        classes=classes,
    )


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64))
