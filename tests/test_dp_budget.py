"""Differential privacy's exact accountant (dp-accounting's PLD) and the budget unify.dp_max_epsilon.

The budget is checked through the program: 2 owners (one real group; two torchrun agents where their budgets
differ) stop before the round that would pass it, with one line, having saved the last affordable round; the
privacy spent survives a resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from tests.world import cli, cli_world, merged
from unify_dist.config import UnifyConfig
from unify_dist.privacy import dp_epsilon, rdp_accountant_epsilon, rdp_bound_epsilon

pytest.importorskip("dp_accounting")


@pytest.mark.parametrize("z,rounds,exact", [(1.0, 10, 46.21), (5.0, 30, 11.19), (20.0, 30, 2.21)])
def test_gaussian_without_subsampling_is_accounted_exactly(z: float, rounds: int, exact: float) -> None:
    eps = dp_epsilon(z, rounds, 1e-5)
    assert abs(eps / exact - 1) < 0.005, eps
    # RDP (dp-accounting's, and the former hand-written bound) is 6-9% looser: the test can tell them apart
    assert rdp_accountant_epsilon(z, rounds, 1e-5) > 1.05 * eps
    assert rdp_bound_epsilon(z, rounds, 1e-5) > 1.05 * eps


def test_tiny_noise_falls_back_to_rdp_and_edges_hold() -> None:
    assert math.isfinite(dp_epsilon(1e-4, 5, 1e-5)) and dp_epsilon(1e-4, 5, 1e-5) > 1e8
    assert dp_epsilon(0.0, 3, 1e-5) == math.inf and dp_epsilon(5.0, 0, 1e-5) == 0.0


@pytest.mark.parametrize("changes,word", [({"dp_max_epsilon": -1.0}, "dp_max_epsilon must be >= 0"),
                                          ({"dp_max_epsilon": 2.0}, "set unify.dp_noise_multiplier > 0")])  # fmt: skip
def test_config_refuses_a_bad_budget(changes: dict, word: str) -> None:
    problems = dataclasses.replace(UnifyConfig(), **changes).problems()
    assert len(problems) == 1 and word in problems[0]


SMALL = ["train", "--config", "configs/demo_cpu.toml", "--set", "data.train_per_owner=300",
         "--set", "data.test_size=300", "--set", "output.progress=false", "--set", "unify.update_norm_bound=1.0",
         "--set", "unify.dp_noise_multiplier=20"]  # fmt: skip


def test_a_budget_that_affords_no_round_is_one_line(tmp_path: Path, data_root) -> None:
    done = cli([*SMALL, "--set", "unify.dp_max_epsilon=0.1", "--set", f"output.dir={tmp_path}"])
    assert done.returncode == 2, done.stderr[-2000:]
    assert "unify.dp_max_epsilon = 0.1 affords no round: one round (1 release(s)) costs epsilon 0.3407" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_budget_stops_before_the_round_that_would_pass_it_and_survives_resume(tmp_path: Path, data_root) -> None:
    run_dir = tmp_path / "run"
    common = [*SMALL, "--set", "train.max_rounds=5", "--set", f"output.dir={run_dir}"]
    # z = 20, one release a round: epsilon 0.341, 0.497, 0.620, 0.726 after rounds 1-4 (delta 1e-5)
    first = merged(cli_world([*common, "--set", "unify.dp_max_epsilon=0.55"], 2))
    assert first.returncode == 0, first.stderr[-3000:]
    said = [ln for ln in (first.stdout + first.stderr).splitlines() if "privacy budget:" in ln]
    assert len(said) == 1, said
    assert "round 3 would take every owner's epsilon to 0.62 > unify.dp_max_epsilon = 0.55 (delta 1e-05); stopping " \
           "after round 2, which is saved" in said[0]
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert records[-1]["dp_epsilon"] == pytest.approx(dp_epsilon(20, 2, 1e-5))
    for owner in ("rank0", "rank1"):
        saved = sorted(p.name for p in (run_dir / "checkpoints" / owner).glob("round_*.pt"))
        assert saved[-1] == "round_00002.pt"
        state = torch.load(run_dir / "checkpoints" / owner / saved[-1], weights_only=True)
        assert int(state["unifier"]["dp_releases"]) == 2  # the privacy spent is in the checkpoint
    final = torch.load(run_dir / "final.pt", weights_only=True)
    assert [r["round"] for r in final["metrics"]] == [1, 2]

    again = merged(cli_world([*common, "--set", "unify.dp_max_epsilon=0.7"], 2))  # resumes from round 2
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from round 2" in again.stdout + again.stderr
    assert "round 4 would take every owner's epsilon to 0.7255" in again.stdout + again.stderr
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    # spent before the resume counts: three rounds' releases, not one
    assert records[-1]["dp_epsilon"] == pytest.approx(dp_epsilon(20, 3, 1e-5))

    ranks = cli_world([*common, "--set", "unify.dp_max_epsilon=0.7"], 2)  # the same budget again: nothing left
    spent = merged(ranks)
    assert [p.returncode for p in ranks] == [2, 2], spent.stderr[-3000:]
    lines = [ln for ln in spent.stderr.splitlines() if ln.startswith("unify-dist: error:")]
    assert lines and all("the run's budget is spent after round 3; raise unify.dp_max_epsilon to go on" in ln
                         for ln in lines), spent.stderr[-3000:]  # fmt: skip


@pytest.mark.slow
def test_owners_with_different_budgets_stop_together_at_the_smaller(tmp_path: Path, data_root) -> None:
    """Two torchrun agents (one owner each, each its own budget): no owner is left waiting in a collective."""
    import subprocess
    import sys

    from tests.world import free_port

    port, agents = free_port(), []
    for node_rank, budget in ((0, 0.7), (1, 0.55)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
               "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=budget",
               "-m", "unify_dist", *SMALL, "--set", "train.max_rounds=5", "--set", f"output.dir={tmp_path}",
               "--set", "train.threads=1", "--set", f"unify.dp_max_epsilon={budget}"]  # fmt: skip
        agents.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [a.communicate(timeout=400) for a in agents]
    assert all(a.returncode == 0 for a in agents), outputs[0][1][-2000:] + outputs[1][1][-2000:]
    said = [ln for out, _ in outputs for ln in out.splitlines() if "privacy budget:" in ln]  # rank 0 speaks, once
    assert len(said) == 1 and re.search(r"privacy budget: round 3 would take rank[01]'s epsilon to 0.62 > "
                                        r"unify.dp_max_epsilon = 0.55 \(delta 1e-05\); stopping after round 2, "
                                        "which is saved", said[0]), said  # fmt: skip
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
