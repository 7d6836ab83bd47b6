"""Shared fixtures: a data root that holds Fashion-MNIST/MNIST offline, built from ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ensure_data_root() -> Path:
    """The data root for tests: UNIFY_DIST_DATA_ROOT if set, else REPO/.data linked to ../shared/data."""
    if os.environ.get("UNIFY_DIST_DATA_ROOT"):
        return Path(os.environ["UNIFY_DIST_DATA_ROOT"])
    root = REPO / ".data"
    for name, folder in (("fashion-mnist", "FashionMNIST"), ("mnist", "MNIST")):
        src = REPO.parent / "shared" / "data" / name
        raw = root / folder / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for gz in src.glob("*.gz"):
            if not (raw / gz.name).exists():
                (raw / gz.name).symlink_to(gz.resolve())
    return root


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = ensure_data_root()
    os.environ["UNIFY_DIST_DATA_ROOT"] = str(root)
    return root
