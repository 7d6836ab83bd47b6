"""The DDP baseline of issue 4.5 through the real torchrun: it learns, keeps every rank's weights identical
(DDP's gradient all_reduce, checked by digest each epoch), writes its records, and stops at its target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.world import torchrun

TINY = ["--config", "configs/paper_v.toml", "--set", "data.train_per_owner=512", "--set", "data.test_size=512"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ddp_baseline_two_ranks(tmp_path: Path, data_root) -> None:
    args = [*TINY, "--set", "train.max_rounds=2", "--target", "0.99", "--out", str(tmp_path)]  # 0.99: not reached
    proc = torchrun(args, nproc=2, timeout=120, module="benchmarks.ddp_baseline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert set(r) >= {"epoch", "test_acc", "time", "train_s", "started", "digests"}
        assert len(r["digests"]) == 2 and r["digests"][0] == r["digests"][1]  # both ranks: the same bits
        assert r["started"] < r["time"] and r["train_s"] > 0
    assert records[0]["digests"] != records[1]["digests"]  # and they trained
    assert records[-1]["test_acc"] > 0.3  # chance is 0.1
    assert "epoch   2" in proc.stdout  # rank 0 talks


def test_ddp_baseline_bad_target_is_one_line() -> None:
    cmd = [sys.executable, "-m", "benchmarks.ddp_baseline", "--target", "88"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "unify-dist: error: --target is a fraction in [0, 1], got 88.0; e.g. --target 0.88"
    ]
