"""Owners with NaN/Inf weights, on real gloo groups of 2 and 3 ranks, for every fast and gather path.

Policy `fail`: every rank raises NonFiniteError naming the sick owner(s). Policy `skip`: the result is
exactly the pure reference rule over the healthy owners only (a sick owner is left out, not zero-filled).
One spawned group per world size runs every case (spawning is the slow part); the parametrized tests
then check each case's result. The CLI half (the `nan` fault hook) is in test_reliability.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from tests.world import run_world
from unify_dist.config import UnifyConfig
from unify_dist.flat import FlatState
from unify_dist.rules import RULES
from unify_dist.collectives import NonFiniteError, tail_size
from unify_dist.unifier import Unifier

# (rule, absmax_impl): every implementation the Unifier has for the paper's rules.
PATHS = [("avg", "reduce"), ("weighted_avg", "reduce"), ("max", "reduce"), ("absmax", "reduce"), ("absmax", "gather")]
SICK = {2: [(1,), (0,)], 3: [(1,), (0, 2)]}  # which owners go bad, per world size


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def _owner_values(rank: int, n: int, sick: tuple[int, ...]) -> torch.Tensor:
    """Owner `rank`'s weights: reproducible on every rank, so each rank can build the reference itself."""
    g = torch.Generator().manual_seed(1000 + rank)
    values = torch.randn(n, generator=g)
    values[::5] = values[::5].round()  # exact ties in magnitude and value exercise absmax's tie rule
    if rank in sick:
        values[rank % n] = float("nan") if rank % 2 else float("inf")
    return values


def _cases(world: int) -> list[tuple[str, str, str, tuple[int, ...]]]:
    return [(rule, impl, policy, sick) for rule, impl in PATHS for policy in ("fail", "skip") for sick in SICK[world]]


def _run_cases(rank: int, world: int) -> dict[tuple | str, object]:
    """On every rank: each case's unified values (skip), or the NonFiniteError text (fail)."""
    results: dict[tuple | str, object] = {}
    for case in _cases(world):
        rule, impl, policy, sick = case
        flat = FlatState(_model(), tail=tail_size(world))
        flat.values.copy_(_owner_values(rank, flat.numel, sick))
        unifier = Unifier.over(flat, UnifyConfig(rule=rule, absmax_impl=impl, nonfinite=policy, chunk_elements=7))
        try:
            outcome = unifier.unify(rule=rule, weight=float(10 * (rank + 1)))
            results[case] = (flat.values.clone(), outcome.skipped)
        except NonFiniteError as e:
            results[case] = str(e)
    results["all sick"] = _every_owner_sick(world)
    return results


def _every_owner_sick(world: int) -> str:
    """With skip, a round where nobody is healthy still fails: there is nothing to unify."""
    flat = FlatState(_model(), tail=tail_size(world))
    flat.values.fill_(float("nan"))
    try:
        Unifier.over(flat, UnifyConfig(nonfinite="skip")).unify(rule="avg")
    except NonFiniteError as e:
        return str(e)
    return "no error"


@functools.cache
def _results(world: int) -> list[dict[tuple | str, object]]:
    return run_world(_run_cases, world)


def _reference(rule: str, world: int, sick: tuple[int, ...], n: int) -> torch.Tensor:
    healthy = [r for r in range(world) if r not in sick]
    stacked = torch.stack([_owner_values(r, n, sick) for r in healthy])
    weights = torch.tensor([float(10 * (r + 1)) for r in healthy])
    return RULES[rule](stacked, weights)


CASES = [(world, *case) for world in (2, 3) for case in _cases(world)]


@pytest.mark.parametrize("world,rule,impl,policy,sick", CASES)
def test_nonfinite_policy(world: int, rule: str, impl: str, policy: str, sick: tuple[int, ...]) -> None:
    per_rank = [r[(rule, impl, policy, sick)] for r in _results(world)]
    if policy == "fail":
        for rank, message in enumerate(per_rank):
            assert isinstance(message, str), f"rank {rank} did not raise NonFiniteError"
            if rank in sick:  # the sick owner names itself and the bad tensor
                assert f"owner {rank} has non-finite weights in '" in message
            else:  # the healthy ones name every sick owner
                assert f"owner(s) {list(sick)} have non-finite" in message, message
            assert "unify.nonfinite=skip" in message  # the message says what to do
        return
    n = FlatState(_model()).numel
    expected = _reference(rule, world, sick, n)
    for rank, result in enumerate(per_rank):
        assert not isinstance(result, str), f"rank {rank}: {result}"
        values, skipped = result
        assert skipped == list(sick)
        assert torch.isfinite(values).all()
        if rule in ("max", "absmax"):
            assert torch.equal(values, expected), f"rank {rank}"
        else:
            torch.testing.assert_close(values, expected, rtol=1e-6, atol=1e-6)


def test_skip_with_every_owner_sick_fails_on_every_rank() -> None:
    for rank_results in _results(2):
        assert "every owner has non-finite weights" in rank_results["all sick"]
