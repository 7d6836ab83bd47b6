"""Real runs through torchrun: owners learn, every rank ends every round with identical weights,
outputs are readable, and two torchrun agents meet at a c10d endpoint as two 'machines' would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.world import free_port, torchrun

SMALL = ["--set", "data.train_per_owner=1500", "--set", "data.test_size=2000", "--set", "train.max_rounds=3"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("nproc,rule", [(2, "avg"), (3, "absmax"), (2, "auto")])
def test_owners_learn_with_identical_weights(tmp_path: Path, data_root, nproc: int, rule: str) -> None:
    args = ["train", "--config", "configs/demo_cpu.toml", *SMALL, "--set", f"unify.rule={rule}"]
    proc = torchrun([*args, "--set", f"output.dir={tmp_path}"], nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(tmp_path)
    assert [r["round"] for r in records] == [1, 2, 3]
    for r in records:  # every owner's digest, every round: identical
        assert len(r["owners"]) == nproc
        assert len({o["digest"] for o in r["owners"]}) == 1
    assert records[-1]["unified_test_acc"] > 0.6  # chance is 0.1
    assert all(r["rule_used"] in ({"avg", "max", "absmax"} if rule == "auto" else {rule}) for r in records)
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert final["metrics"][-1]["digest"] == records[-1]["digest"]
    assert final["config"]["unify"]["rule"] == rule
    assert "features.0.weight" in final["model"]
    assert "unified test" in proc.stdout  # rank 0's per-round table


@pytest.mark.slow
def test_two_nodes_meet_at_a_c10d_endpoint(tmp_path: Path, data_root) -> None:
    port = free_port()
    agents = []
    for node_rank in (0, 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
            "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes",
            "-m", "unify_dist", "train", "--config", "configs/demo_cpu.toml", *SMALL,
            "--set", "train.max_rounds=2", "--set", "train.threads=1", "--set", f"output.dir={tmp_path}",
        ]  # fmt: skip
        agents.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [a.communicate(timeout=300) for a in agents]
    for a, (_, err) in zip(agents, outputs):
        assert a.returncode == 0, err[-3000:]
    records = _records(tmp_path)
    assert len(records) == 2 and all(len({o["digest"] for o in r["owners"]}) == 1 for r in records)
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"rank0", "rank1"}
