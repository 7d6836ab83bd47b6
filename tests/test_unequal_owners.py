"""benchmarks/unequal_owners.py's parts that need no root: the 3x-data factory and the per-owner summary."""

from __future__ import annotations

import pytest

from benchmarks.unequal_owners import summarise, three_times_data
from unify_dist.data import Owner


def _owner(rank: int, idle: float) -> dict:
    return {"unify_s": idle * 2.0, "round_s": 2.0, "train_s": 1.5, "eval_s": 0.1, "steps": 10 * (rank + 1)}


def test_summary_is_the_median_after_the_first_round() -> None:
    idles = [[0.9, 0.5], [0.2, 0.0], [0.4, 0.0], [0.3, 0.1]]  # round 1's warm-up (0.9) left out
    records = [{"owners": [_owner(0, a), _owner(1, b)]} for a, b in idles]
    fast, slow = summarise(records)
    assert fast["idle"] == pytest.approx(0.3) and slow["idle"] == pytest.approx(0.0)
    assert fast["other"] == pytest.approx((2.0 - 1.5 - 0.6 - 0.1) / 2.0)  # round 4's is the median
    assert (fast["steps"], slow["steps"]) == (10, 20) and fast["idle_by_round"][0] == 0.9


def test_owner_one_gets_three_times_the_data(monkeypatch, data_root) -> None:
    monkeypatch.setenv("UNEQUAL_BASE", "300")
    sizes = [len(three_times_data(Owner(r, 2, 0, f"rank{r}")).train) for r in (0, 1)]
    assert sizes == [300, 900]  # train_per_owner caps the training images (validation is held back first)
