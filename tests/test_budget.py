"""Round budgets (unify_dist.app.budget): which budget wins, replay files, config mistakes, and through the
real program: a wall-clock budget's step counts recorded per owner and replayed to the same digests, and
train.local_steps an exact per-round budget across epochs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.world import cli_world, merged
from unify_dist.app.budget import Budget, Deadline, plan, read_replay
from unify_dist.config import TrainConfig
from unify_dist.errors import UserError

SMALL = ["--set", "data.train_per_owner=600", "--set", "data.test_size=400", "--set", "train.threads=1",
         "--set", "output.progress=false", "--set", "output.local_metrics=false"]  # fmt: skip


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_budget_precedence() -> None:
    replay = {1: {"ana": 7, "bo": 3}}
    assert plan(TrainConfig(local_steps=5), 1, "ana", replay) == Budget("replay", steps=7)
    assert plan(TrainConfig(local_steps=5), 1, "bo") == Budget("steps", steps=5)
    assert plan(TrainConfig(round_seconds=2.5), 4, "bo") == Budget("seconds", seconds=2.5)
    assert plan(TrainConfig(local_epochs=2), 4, "bo") == Budget("epochs", epochs=2)
    # with overlap a time budget leaves room for the owner's own evaluation of the round before (records: state)
    records = [{"owners": [{"name": "ana", "eval_s": 2.0}, {"name": "bo", "eval_s": 0.5}]}]
    assert plan(TrainConfig(round_seconds=2.5), 4, "bo", None, records, True) == Budget("seconds", seconds=2.0)
    assert plan(TrainConfig(round_seconds=1.5), 4, "ana", None, records, True) == Budget("seconds", seconds=0.0)
    assert plan(TrainConfig(round_seconds=2.5), 4, "bo", None, records) == Budget("seconds", seconds=2.5)
    with pytest.raises(UserError, match="no step count for owner 'cy' in round 1 .* rounds 1..1"):
        plan(TrainConfig(replay_steps="m.jsonl"), 1, "cy", replay)
    with pytest.raises(UserError, match="in round 2"):
        plan(TrainConfig(replay_steps="m.jsonl"), 2, "ana", replay)


def test_deadline_stops_before_a_step_that_would_not_fit() -> None:
    assert Deadline(0.0)() is True  # at least one step, then stop
    patient = Deadline(60.0)
    assert patient() is False and not patient.done
    time.sleep(0.05)
    short = Deadline(0.08)
    time.sleep(0.05)  # one "step" of 50 ms: a second one would end at about 100 ms, past 80 ms
    assert short() is True and short.done


def test_read_replay(tmp_path: Path) -> None:
    good = tmp_path / "metrics.jsonl"
    rows = [{"round": r, "owners": [{"rank": 0, "name": "ana", "steps": r + 1}, {"rank": 1, "steps": 9}]} for r in (1, 2)]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_replay(str(good)) == {1: {"ana": 2, "rank1": 9}, 2: {"ana": 3, "rank1": 9}}
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"round": 1, "owners": [{"rank": 0, "name": "ana"}]}) + "\n")
    with pytest.raises(UserError, match="line 1: not a round record with every owner's 'steps'"):
        read_replay(str(old))


def test_budget_config_mistakes(tmp_path: Path) -> None:
    (problem,) = TrainConfig(round_seconds=3, local_steps=10).problems()
    assert "two budgets for the same round: set one of them to 0" in problem
    (problem,) = TrainConfig(round_seconds=-1).problems()
    assert "train.round_seconds must be >= 0" in problem
    (problem,) = TrainConfig(replay_steps=str(tmp_path / "nothing.jsonl")).problems()
    assert "is not a file" in problem


@pytest.mark.slow
def test_time_budget_recorded_and_replayed_to_the_same_digests(tmp_path: Path, data_root) -> None:
    timed, replayed, stepped = tmp_path / "timed", tmp_path / "replayed", tmp_path / "stepped"
    base = ["train", "--config", "configs/demo_cpu.toml", *SMALL, "--set", "train.max_rounds=2"]
    fednova = ["--set", "unify.normalize_steps=true"]  # owners' different counts, normalised (FedNova)
    proc = merged(cli_world([*base, *fednova, "--set", "train.round_seconds=0.3", "--set", f"output.dir={timed}"], 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the replay wins over any other budget in the config: local_steps here is ignored
    replay = ["--set", f"train.replay_steps={timed / 'metrics.jsonl'}"]
    proc = merged(cli_world([*base, *fednova, *replay, "--set", "train.local_steps=1",
                             "--set", f"output.dir={replayed}"], 2))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    stepped_args = [*base, "--set", "train.local_steps=12", "--set", f"output.dir={stepped}"]  # 9 steps an epoch
    proc = merged(cli_world(stepped_args, 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for t, r in zip(_records(timed), _records(replayed), strict=True):
        assert len({o["digest"] for o in t["owners"]}) == 1  # every owner identical, every round
        assert [o["digest"] for o in r["owners"]] == [o["digest"] for o in t["owners"]]  # the replay: the same bits
        assert [o["steps"] for o in r["owners"]] == [o["steps"] for o in t["owners"]]
        for o in t["owners"]:
            assert o["steps"] >= 1 and o["round_s"] >= o["train_s"] + o["eval_s"] and o["eval_s"] > 0
    for s in _records(stepped):
        assert [o["steps"] for o in s["owners"]] == [12, 12]  # a true per-round budget, across an epoch boundary


def test_weight_by_steps_weighs_owners_by_the_steps_they_took(tmp_path: Path, data_root) -> None:
    """Owner 1 holds three times the images, both take 3 steps: weighted_avg by steps is the plain mean,
    by data it leans 3:1 towards owner 1. Through the real program, one round."""
    env = {"UNEQUAL_BASE": "96", "UNIFY_DIST_DATA_ROOT": str(data_root)}
    base = ["train", "--config", "configs/demo_cpu.toml", "--set", "data.factory=benchmarks.unequal_owners:three_times_data",
            "--set", "train.threads=1", "--set", "output.progress=false", "--set", "output.local_metrics=false",
            "--set", "train.max_rounds=1", "--set", "train.local_steps=3"]  # fmt: skip
    runs = {"avg": ["--set", "unify.rule=avg"],
            "steps": ["--set", "unify.rule=weighted_avg", "--set", "unify.weight_by=steps"],
            "data": ["--set", "unify.rule=weighted_avg"]}  # fmt: skip
    final = {}
    for name, args in runs.items():
        proc = merged(cli_world([*base, *args, "--set", f"output.dir={tmp_path / name}"], 2, env=env))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert [o["steps"] for o in _records(tmp_path / name)[0]["owners"]] == [3, 3]
        final[name] = torch.load(tmp_path / name / "final.pt", weights_only=True)["model"]
    for key, value in final["avg"].items():
        if value.is_floating_point():
            torch.testing.assert_close(final["steps"][key], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(final["data"][k], v, rtol=1e-3, atol=1e-4)
               for k, v in final["avg"].items() if v.is_floating_point())


def test_weight_by_is_checked() -> None:
    from unify_dist.config import UnifyConfig

    (problem,) = UnifyConfig(weight_by="steps").problems()
    assert "unify.weight_by = 'steps' sets weighted_avg's weights, and unify rule 'avg' does not weigh owners" in problem
    (problem,) = UnifyConfig(rule="weighted_avg", weight_by="time").problems()
    assert "unify.weight_by must be 'data' or 'steps', got 'time'" in problem
    assert UnifyConfig(rule="weighted_avg", weight_by="steps").problems() == []
