"""Cut scikit-learn's breast cancer data (569 rows, 30 features, 2 classes) into one file per owner.

    python -m tabular_owner.split --owners 2 [--out DIR] [--seed 0]

Stands in for data that owners already hold apart: each file gets a stratified share of the rows, as
its own training rows and its own test rows. Features are written raw; each owner standardises its own.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer

from tabular_owner import owners_dir

__all__ = ["split"]


def split(out: Path, owners: int, seed: int = 0, test_fraction: float = 0.2) -> list[Path]:
    """Write out/owner{r}.npz for r < owners: x_train, y_train, x_test, y_test, classes, features."""
    data = load_breast_cancer()
    rng = np.random.default_rng(seed)
    shares: list[list[np.ndarray]] = [[] for _ in range(owners)]
    for label in np.unique(data.target):  # deal each class out in turn: every owner sees both classes
        for owner, part in enumerate(np.array_split(rng.permutation(np.flatnonzero(data.target == label)), owners)):
            shares[owner].append(part)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for owner, parts in enumerate(shares):
        rows = rng.permutation(np.concatenate(parts))
        cut = int(round(len(rows) * (1 - test_fraction)))
        train, test = rows[:cut], rows[cut:]
        path = out / f"owner{owner}.npz"
        np.savez(
            path,
            x_train=data.data[train].astype(np.float32), y_train=data.target[train],
            x_test=data.data[test].astype(np.float32), y_test=data.target[test],
            classes=np.array(data.target_names), features=np.array(data.feature_names),
        )  # fmt: skip
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--owners", type=int, default=2)
    p.add_argument("--out", type=Path, default=owners_dir(), help="folder for owner{rank}.npz")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for path in split(args.out, args.owners, args.seed):
        with np.load(path) as f:
            print(f"{path}: {len(f['y_train'])} training rows, {len(f['y_test'])} test rows")


if __name__ == "__main__":
    main()
