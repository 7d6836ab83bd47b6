"""FedNova's normalisation (unify.normalize_steps): pure maths against numbers worked by hand, and the Unifier on
real spawned gloo groups against the pure function, every rank with the same digest."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.world import run_world
from unify_dist.collectives import tail_size
from unify_dist.config import UnifyConfig
from unify_dist.fednova import fednova, mean_steps
from unify_dist.flat import FlatState
from unify_dist.rules import RULES
from unify_dist.unifier import Unifier

STEPS = [1, 3, 7, 2]
SAMPLES = [100.0, 300.0, 50.0, 80.0]


def test_fednova_by_hand() -> None:
    updates = torch.tensor([[2.0, 4.0], [6.0, 0.0]])
    # per step: [2, 4] and [2, 0]; their mean [2, 2]; times the mean step count 2
    assert torch.equal(fednova(updates, torch.ones(2), torch.tensor([1, 3])), torch.tensor([4.0, 4.0]))
    # weights 1:3 -> p = 1/4, 3/4: per-step mean [2, 1], mean steps 1/4 + 9/4 = 2.5
    assert torch.equal(fednova(updates, torch.tensor([1.0, 3.0]), torch.tensor([1, 3])), torch.tensor([5.0, 2.5]))
    assert mean_steps(torch.tensor([1, 3]), torch.tensor([1.0, 3.0])) == 2.5


def test_equal_steps_are_the_rule_itself() -> None:
    x, w = torch.randn(4, 10), torch.tensor(SAMPLES)
    torch.testing.assert_close(fednova(x, torch.ones(4), torch.full((4,), 5)), RULES["avg"](x, w))
    torch.testing.assert_close(fednova(x, w, torch.full((4,), 5)), RULES["weighted_avg"](x, w))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 2))


def _update(rank: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(rank)) * STEPS[rank] * 0.01


def _normalized(rank: int, world: int) -> dict:
    out = {}
    for rule in ("avg", "weighted_avg"):
        flat = FlatState(_model(), tail=tail_size(world))
        unifier = Unifier.over(flat, UnifyConfig(rule=rule, normalize_steps=True))
        flat.values.add_(_update(rank, flat.numel))
        outcome = unifier.unify(SAMPLES[rank], steps=STEPS[rank])
        out[rule] = {"values": flat.values.clone(), "digest": outcome.digest}
    flat = FlatState(_model(), tail=tail_size(world))
    unifier = Unifier.over(flat, UnifyConfig(normalize_steps=True))
    try:  # one owner forgets its count: the same error on every rank, nobody left waiting
        unifier.unify(steps=0 if rank == 1 else 4)
        out["missing"] = None
    except ValueError as e:
        out["missing"] = str(e)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_unifier_normalizes_by_steps_on_every_rank(world: int) -> None:
    results = run_world(_normalized, world)
    start = FlatState(_model()).values
    updates = torch.stack([_update(r, start.numel()) for r in range(world)])
    steps = torch.tensor(STEPS[:world])
    for rule, weights in (("avg", torch.ones(world)), ("weighted_avg", torch.tensor(SAMPLES[:world]))):
        want = start + fednova(updates, weights, steps)
        plain = start + RULES[rule](updates, weights)
        for r in results:
            torch.testing.assert_close(r[rule]["values"], want, rtol=1e-5, atol=1e-7)
            assert r[rule]["digest"] == results[0][rule]["digest"]
        assert not torch.allclose(want, plain)  # the normalisation changed the result
    assert all("owner(s) [1] passed none" in r["missing"] for r in results)


def test_normalize_steps_refuses_rules_it_cannot_serve() -> None:
    (problem,) = UnifyConfig(rule="median", normalize_steps=True).problems()
    assert "serves avg and weighted_avg, not unify rule 'median'" in problem
    (problem,) = UnifyConfig(rule="avg", compare=["max"], normalize_steps=True).problems()
    assert "unify.compare" in problem
