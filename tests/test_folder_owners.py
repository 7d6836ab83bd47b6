"""The real-world case: each owner brings its own image folder; nothing but weights leaves it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.world import torchrun

CLASSES = ["circle", "stripes", "dots"]


def make_owner_folder(root: Path, seed: int, per_class: int = 40, side: int = 16) -> None:
    """Three visually distinct classes with noise, as PNG files: a small but learnable task."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    patterns = [
        ((yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 3) ** 2),
        (yy % 4 < 2),
        ((yy % 5 == 0) & (xx % 5 == 0)),
    ]
    for name, pattern in zip(CLASSES, patterns):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = pattern * 200 + rng.integers(0, 55, size=(side, side))
            Image.fromarray(img.astype(np.uint8), mode="L").save(root / name / f"{i}.png")


@pytest.mark.slow
def test_folder_owners_train_and_unify(tmp_path: Path) -> None:
    for rank in (0, 1):
        make_owner_folder(tmp_path / f"owner{rank}", seed=rank)
    proc = torchrun([
        "train", "--set", "data.dataset=folder", "--set", "data.partition=folder",
        "--set", f"data.folder={tmp_path}/owner{{rank}}", "--set", "data.image_size=16",
        "--set", "model.name=mlp", "--set", "train.max_rounds=3", "--set", "train.batch_size=16",
        "--set", f"output.dir={tmp_path / 'run'}",
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and len({o["digest"] for o in records[-1]["owners"]}) == 1
    assert records[-1]["unified_test_acc"] > 0.8  # chance is 1/3
