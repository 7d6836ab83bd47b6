"""A hostile owner (the [attack] simulation) and differential privacy (clip + Gaussian noise + accountant).

The robust-rule claim is checked through the program: 4 owners in one real group (forked ranks), one of
them sending its weights x -10 every round; the robust rules must stay near the clean run while avg
collapses (so the attack is real and the test can fail). The model is the small MLP: the claim is about the
rules, not the model.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from tests.world import cli_world, merged, run_world
from benchmarks.attack import corrupt_
from benchmarks.attack import AttackConfig
from unify_dist.config import UnifyConfig
from unify_dist.flat import FlatState
from unify_dist.privacy import RDP_ORDERS, dp_epsilon
from unify_dist.collectives import tail_size, verify_identical
from unify_dist.unifier import Unifier


def _flat(seed: int = 0, width: int = 200) -> FlatState:
    torch.manual_seed(seed)
    return FlatState(nn.Sequential(nn.Linear(width, 100), nn.Linear(100, 10)), tail=tail_size(4))


def test_attack_corrupts_only_the_hostile_owner() -> None:
    clean = _flat().values.clone()
    cfg = AttackConfig(owner=1, kind="scale", scale=-10.0, from_round=2)
    for rank, round_, hit in ((0, 3, False), (1, 1, False), (1, 2, True)):
        flat = _flat()
        assert corrupt_(flat, cfg, rank, round_) is hit
        assert torch.equal(flat.values, clean * -10.0 if hit else clean)
    flat = _flat()
    corrupt_(flat, dataclasses.replace(cfg, kind="noise", noise_std=2.0), 1, 5)
    assert abs(float(flat.values.std()) - 2.0) < 0.05 and not torch.equal(flat.values, clean)


@pytest.mark.parametrize(
    "section,key,value",
    [(AttackConfig, "kind", "flip"), (AttackConfig, "owner", -2), (AttackConfig, "noise_std", 0.0),
     (UnifyConfig, "dp_noise_multiplier", -1.0), (UnifyConfig, "dp_delta", 1.0)],
)  # fmt: skip
def test_config_refuses_bad_attack_and_dp_values(section, key: str, value) -> None:
    problems = dataclasses.replace(section(), **{key: value}).problems()
    assert len(problems) == 1 and key in problems[0]


def test_dp_needs_a_clipping_norm() -> None:
    problems = UnifyConfig(dp_noise_multiplier=1.0).problems()
    assert len(problems) == 1 and "update_norm_bound" in problems[0]
    assert UnifyConfig(dp_noise_multiplier=1.0, update_norm_bound=1.0).problems() == []


def test_dp_epsilon_grows_with_releases_and_shrinks_with_noise() -> None:
    eps = [[dp_epsilon(z, t, 1e-5) for t in (1, 10, 30)] for z in (1.0, 5.0, 20.0)]
    for row in eps:
        assert row == sorted(row) and row[0] > 0
    for col in zip(*eps):
        assert list(col) == sorted(col, reverse=True)
    assert dp_epsilon(0.0, 1, 1e-5) == math.inf and dp_epsilon(1.0, 0, 1e-5) == 0.0
    # Never above the classic RDP conversion (Mironov 2017): rdp(a) + log(1/delta) / (a - 1).
    classic = min(30 * a * 2 / 5.0**2 + math.log(1e5) / (a - 1) for a in RDP_ORDERS)
    assert eps[1][2] <= classic


def _dp_unify(rank: int, world: int, z: float, bound: float) -> dict:
    flat = _flat()
    start = flat.values.clone()
    g = torch.Generator().manual_seed(rank)
    update = torch.randn(flat.numel, generator=g)
    update *= 0.5 * bound / float(update.norm())  # inside the bound: clipping changes nothing
    flat.values.add_(update)
    Unifier.over(flat, UnifyConfig(rule="avg", update_norm_bound=bound, dp_noise_multiplier=z)).unify(rule="avg")
    return {"after": flat.values.clone(), "start": start, "update": update, "digests": verify_identical(flat)}


def test_dp_noise_has_the_promised_size_and_ranks_stay_identical() -> None:
    world, z, bound = 3, 0.01, 1.0
    out = run_world(_dp_unify, world, z, bound)
    assert len(set(out[0]["digests"])) == 1
    assert all(torch.equal(o["after"], out[0]["after"]) for o in out)
    clean = out[0]["start"] + torch.stack([o["update"] for o in out]).mean(0)
    noise = out[0]["after"] - clean  # the mean of the owners' independent noises: std z C / sqrt(owners)
    expected = z * bound / math.sqrt(world)
    assert abs(float(noise.std()) / expected - 1) < 0.05
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(noise.numel())


def _final(run_dir) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.slow
def test_robust_rules_survive_a_hostile_owner(tmp_path, data_root) -> None:
    common = ["train", "--config", "configs/paper_v.toml", "--set", "model.name=mlp",
              "--set", "data.train_per_owner=1500", "--set", "data.test_size=2000", "--set", "train.max_rounds=3",
              "--set", "output.progress=false"]  # fmt: skip
    clean = merged(cli_world([*common, "--set", f"output.dir={tmp_path / 'clean'}"], 4))
    assert clean.returncode == 0, clean.stderr[-2000:]
    attacked = merged(cli_world(
        [*common, "--set", f"output.dir={tmp_path / 'attacked'}", "--set", "unify.rule=median",
         "--set", "unify.compare=avg,absmax,trimmed_mean", "--set", "attack.owner=3"], 4,
        module="benchmarks.attack",
    ))  # fmt: skip
    assert attacked.returncode == 0, attacked.stderr[-2000:]
    assert "attack simulation: owner 3" in attacked.stdout + attacked.stderr
    base, hit = _final(tmp_path / "clean"), _final(tmp_path / "attacked")
    reference = base["unified_test_acc"]
    assert reference > 0.7
    assert hit["unified_test_acc"] >= reference - 0.03  # median's own trajectory under attack
    assert hit["candidates"]["trimmed_mean"]["test_acc"] >= reference - 0.03
    assert hit["candidates"]["avg"]["test_acc"] < reference - 0.2  # the attack is real
    assert hit["candidates"]["absmax"]["test_acc"] < reference - 0.2


def test_hostile_owner_must_be_a_rank(tmp_path) -> None:
    from tests.world import cli

    done = cli(["train", "--set", "attack.owner=1", "--set", f"output.dir={tmp_path}"], module="benchmarks.attack")
    assert done.returncode == 2
    assert "attack.owner = 1 but there are only 1 owners" in done.stderr and "Traceback" not in done.stderr
