"""Partitions: disjoint, covering, deterministic; label_split class blocks; real Fashion-MNIST shares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unify_dist.config import DataConfig
from unify_dist.data import Owner, load_owner_data, partition, prepare_dataset
from unify_dist.errors import UserError

LABELS = np.random.default_rng(0).integers(0, 10, size=5000)


@pytest.mark.parametrize("scheme", ["iid", "label_split", "dirichlet"])
@pytest.mark.parametrize("owners", [2, 3, 4])
def test_disjoint_cover_deterministic(scheme: str, owners: int) -> None:
    parts = partition(LABELS, scheme, owners, seed=7, alpha=0.3)
    assert len(parts) == owners
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS) and len(np.unique(joined)) == len(LABELS)  # disjoint and covering
    again = partition(LABELS, scheme, owners, seed=7, alpha=0.3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_label_split_blocks() -> None:
    a, b = partition(LABELS, "label_split", 2, seed=0)
    assert set(LABELS[a]) == {0, 1, 2, 3, 4} and set(LABELS[b]) == {5, 6, 7, 8, 9}
    three = partition(LABELS, "label_split", 3, seed=0)
    assert [sorted(set(LABELS[p])) for p in three] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_label_split_refuses_more_owners_than_classes() -> None:
    with pytest.raises(UserError, match="11 owners > 10 classes"):
        partition(LABELS, "label_split", 11, seed=0)


def test_iid_differs_by_seed_and_dirichlet_skews() -> None:
    assert not np.array_equal(partition(LABELS, "iid", 2, 1)[0], partition(LABELS, "iid", 2, 2)[0])
    skewed = partition(LABELS, "dirichlet", 4, seed=0, alpha=0.05)
    shares = [np.bincount(LABELS[p], minlength=10) / len(p) for p in skewed]
    assert max(s.max() for s in shares) > 0.4  # some owner is dominated by a few classes


def test_real_owner_shares(data_root) -> None:
    cfg = DataConfig(partition="label_split", train_per_owner=500, test_size=1000)
    prepare_dataset(cfg)
    owners = [load_owner_data(cfg, Owner(r, 2, 0, f"owner{r}"), torch.device("cpu")) for r in range(2)]
    assert set(owners[0].train.y.tolist()) <= {0, 1, 2, 3, 4} and set(owners[1].train.y.tolist()) <= {5, 6, 7, 8, 9}
    assert len(owners[0].train) == 500 and owners[0].train.x.shape[1:] == (1, 28, 28)
    assert len(owners[0].test) + len(owners[1].test) == 1000  # test shards cover the test subset
    assert abs(float(owners[0].train.x.mean())) < 0.5  # normalised


def test_registries_refuse_duplicates_and_config_reads_them() -> None:
    from unify_dist.app.config import RunConfig
    from unify_dist.config import DataConfig
    from unify_dist.data import DATASETS, PARTITIONS, dataset_problems, register_dataset, register_partition

    assert set(DATASETS) == {"fashion_mnist", "mnist", "cifar10", "folder"}
    assert set(PARTITIONS) == {"iid", "label_split", "dirichlet", "folder"}
    with pytest.raises(ValueError, match="registered twice"):
        register_partition("iid")(lambda labels, owners, rng, **_: [])
    with pytest.raises(ValueError, match="registered twice"):
        register_dataset("mnist")(lambda cfg, owner, device, group: None)
    assert any("data.partition = 'halves' is not known" in p for p in RunConfig(data=DataConfig(partition="halves")).problems())
    try:
        register_partition("halves")(lambda labels, owners, rng, **_: np.array_split(np.arange(len(labels)), owners))
        assert RunConfig(data=DataConfig(partition="halves")).problems() == []  # a registered name is valid at once
        assert [len(p) for p in partition(LABELS, "halves", 2, seed=0)] == [2500, 2500]
        mismatch = dataset_problems(DataConfig(dataset="folder", partition="halves", folder="x"))
        assert mismatch[0].endswith("takes partition 'folder'")
    finally:
        PARTITIONS.pop("halves", None)
