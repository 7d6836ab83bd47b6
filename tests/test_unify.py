"""The collective layer against the pure reference rules, on real spawned gloo groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.world import run_world
from unify_dist.config import UnifyConfig
from unify_dist.flat import FlatState
from unify_dist.rules import RULES
from unify_dist.collectives import tail_size, verify_identical
from unify_dist.unifier import Unifier

CASES = [
    ("avg", "reduce"), ("weighted_avg", "reduce"), ("max", "reduce"), ("absmax", "reduce"), ("absmax", "gather"),
    ("secure_avg", "reduce"),
]  # fmt: skip
EXACT = {"max", "absmax"}


def _model(rank: int) -> nn.Module:
    """A small model with BatchNorm (float running stats + an int64 counter), different on every rank."""
    torch.manual_seed(100 + rank)
    model = nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].num_batches_tracked.fill_(10 * rank + (rank == 1) * (3 << 24))  # beyond float32's exact range
        model[2].weight[0, 0] = 0.75 * (-1) ** rank  # an exact +/- magnitude tie, for absmax's tie rule
        # signed zeros, a subnormal and magnitudes >= 2: the corners of absmax's integer keys
        model[0].weight[0, :4] = torch.tensor([0.0, -0.0, 1e-40, -3.5]) * (-1) ** rank
    return model


def _unify(rank: int, world: int, rule: str, impl: str) -> dict:
    model = _model(rank)
    flat = FlatState(model, tail=tail_size(world, model))  # integer buffers ride in the tail
    before = flat.values.clone()
    unifier = Unifier.over(flat, UnifyConfig(rule=rule, absmax_impl=impl, chunk_elements=16))  # many chunks
    outcome = unifier.unify(rule=rule, weight=float(rank + 1))
    digests = verify_identical(flat)
    return {"before": before, "after": flat.values.clone(), "ints": flat.ints.clone(), "digests": digests,
            "skipped": outcome.skipped, "state": {k: v.clone() for k, v in model.state_dict().items()}}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("rule,impl", CASES)
def test_collective_matches_reference(rule: str, impl: str, world: int) -> None:
    results = run_world(_unify, world, rule, impl)
    stacked = torch.stack([r["before"] for r in results])
    weights = torch.arange(1, world + 1, dtype=torch.float64)
    expected = RULES[rule](stacked, weights)
    for r in results:
        if rule == "absmax":
            assert torch.equal(r["after"].view(torch.int32), expected.view(torch.int32))  # bits: signed zeros too
        elif rule in EXACT:
            assert torch.equal(r["after"], expected)
        else:
            torch.testing.assert_close(r["after"], expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(r["after"], results[0]["after"])  # bit-identical on every rank
        assert r["digests"] == [results[0]["digests"][0]] * world
        assert r["skipped"] == []
        assert r["ints"].tolist() == [(3 << 24) + 10]  # integer buffers take the max, exactly
    # the unified values really are inside the model, not only in the buffer
    first = results[0]
    assert torch.equal(first["state"]["0.weight"].flatten(), first["after"][: 7 * 5])


def test_absmax_tie_prefers_positive() -> None:
    results = run_world(_unify, 2, "absmax", "reduce")
    state = results[0]["state"]
    assert state["2.weight"][0, 0].item() == 0.75


def test_weighted_avg_uses_weights() -> None:
    stacked = torch.tensor([[0.0, 1.0], [3.0, 5.0]])
    out = RULES["weighted_avg"](stacked, torch.tensor([1.0, 3.0]))
    assert torch.equal(out, torch.tensor([2.25, 4.0]))


def _diverge(rank: int, world: int) -> str:
    model = _model(0)
    flat = FlatState(model, tail=tail_size(world))
    if rank == 1:
        flat.values[3] += 1e-6  # one element, one rank
    try:
        verify_identical(flat)
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_divergence_names_the_rank() -> None:
    messages = run_world(_diverge, 3)
    for m in messages:
        assert "ranks [1]" in m and "different weights" in m


def test_flat_state_is_a_view_of_the_model() -> None:
    model = _model(0)
    flat = FlatState(model, tail=3)
    flat.values.fill_(2.0)
    assert all(torch.all(p == 2.0) for p in model.parameters())
    assert torch.all(model[1].running_var == 2.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(4, 7)).sum().backward()
    opt.step()  # optimizer updates land in the flat buffer
    assert not torch.all(flat.values == 2.0)
    assert flat.tail.numel() == 3
