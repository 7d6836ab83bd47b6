"""The real-world case: each owner brings its own image folder; nothing but weights leaves it.

Owners may hold different classes: the class list is the union of their folder names, agreed by a collective."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.world import run_world, torchrun
from unify_dist.config import DataConfig
from unify_dist.data import Owner, load_owner_data
from unify_dist.errors import UserError

CLASSES = ["circle", "stripes", "dots"]


def make_owner_folder(
    root: Path, seed: int, per_class: int = 40, side: int = 16, classes: Sequence[str] = tuple(CLASSES),
    empty: Sequence[str] = (),
) -> None:
    """Three visually distinct classes with noise, as PNG files: a small but learnable task.

    `classes` picks which of them this owner holds; `empty` names class folders made with no image in them.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    patterns = [
        ((yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 3) ** 2),
        (yy % 4 < 2),
        ((yy % 5 == 0) & (xx % 5 == 0)),
    ]
    for name in empty:
        (root / name).mkdir(parents=True, exist_ok=True)
    for name, pattern in zip(CLASSES, patterns):
        if name not in classes:
            continue
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = pattern * 200 + rng.integers(0, 55, size=(side, side))
            Image.fromarray(img.astype(np.uint8), mode="L").save(root / name / f"{i}.png")


def _train_folders(tmp_path: Path, rounds: int):
    """The program through torchrun on the owners' folders under tmp_path/owner{rank}: 2 owners, an MLP."""
    return torchrun([
        "train", "--set", "data.dataset=folder", "--set", "data.partition=folder",
        "--set", f"data.folder={tmp_path}/owner{{rank}}", "--set", "data.image_size=16",
        "--set", "model.name=mlp", "--set", f"train.max_rounds={rounds}", "--set", "train.batch_size=16",
        "--set", f"output.dir={tmp_path / 'run'}",
    ])  # fmt: skip


@pytest.mark.slow
def test_folder_owners_train_and_unify(tmp_path: Path) -> None:
    for rank in (0, 1):
        make_owner_folder(tmp_path / f"owner{rank}", seed=rank)
    proc = _train_folders(tmp_path, rounds=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and len({o["digest"] for o in records[-1]["owners"]}) == 1
    assert records[-1]["unified_test_acc"] > 0.8  # chance is 1/3


def _held_classes(root: Path) -> None:
    """The H-environment with real folders: owner 0 holds circle and dots, owner 1 stripes (and an empty circle/)."""
    make_owner_folder(root / "owner0", seed=0, per_class=20, classes=("circle", "dots"))
    make_owner_folder(root / "owner1", seed=1, per_class=20, classes=("stripes",), empty=("circle",))


def _load_folder(root: str, rank: int, world: int) -> tuple[list[str], list[int], int] | str:
    cfg = DataConfig(dataset="folder", partition="folder", folder=f"{root}/owner{{rank}}", image_size=16)
    try:
        data = load_owner_data(cfg, Owner(rank, world, 0, f"owner{rank}"), torch.device("cpu"))
    except UserError as e:
        return str(e)
    labels = torch.cat([data.train.y, data.val.y, data.test.y])
    return data.classes, torch.bincount(labels, minlength=3).tolist(), int(data.train.x.shape[-1])


def _two_loads(rank: int, world: int, held: str, missing: str) -> list:
    return [_load_folder(held, rank, world), _load_folder(missing, rank, world)]  # one group, two agreements


def test_owners_agree_on_the_union_of_their_classes(tmp_path: Path) -> None:
    _held_classes(tmp_path / "held")
    make_owner_folder(tmp_path / "missing" / "owner0", seed=0, per_class=2)  # owner 1 has no folder
    (owner0, gap0), (owner1, gap1) = run_world(_two_loads, 2, str(tmp_path / "held"), str(tmp_path / "missing"))
    assert owner0[0] == owner1[0] == ["circle", "dots", "stripes"]  # sorted union, the same on both
    assert owner0[1] == [20, 20, 0] and owner1[1] == [0, 0, 20]  # each owner's images under the union's index
    assert owner0[2] == 16
    assert "owner 1's image folder" in gap1 and "does not exist" in gap1
    assert "failed on rank(s) [1]" in gap0  # owner 0 does not wait for a collective that never comes


@pytest.mark.slow
def test_owners_with_different_classes_train_through_torchrun(tmp_path: Path) -> None:
    _held_classes(tmp_path)
    proc = _train_folders(tmp_path, rounds=2)
    assert proc.returncode == 0, proc.stderr[-3000:]  # the consistency check saw one class list
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(len({o["digest"] for o in r["owners"]}) == 1 for r in records) and len(records) == 2
    assert len(records[-1]["per_class"]["unified"]) == 3
