"""The outer optimizer (unify.outer): DiLoCo's Nesterov step on the pseudo-gradient, the same on every owner.

Pure maths against torch.optim.SGD; the Unifier on real spawned gloo groups against a reference computed
by hand on stacked tensors, digests equal on every rank, a resumed Unifier bit-identical, and the old
server_momentum / server_lr names the same bits as outer = "sgd".
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.world import run_world
from unify_dist.collectives import tail_size
from unify_dist.config import UnifyConfig
from unify_dist.flat import FlatState
from unify_dist.outer import outer_step
from unify_dist.unifier import Unifier

ROUNDS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same start on every rank
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _update(rank: int, n: int, round_: int) -> torch.Tensor:
    """What owner `rank` learns in round `round_`: different per owner and per round."""
    g = torch.Generator().manual_seed(1000 * round_ + rank)
    return torch.randn(n, generator=g) * (rank + 1) * 0.1


@pytest.mark.parametrize("nesterov", [False, True])
def test_outer_step_is_torch_sgd_with_the_signs_flipped(nesterov: bool) -> None:
    anchor = torch.randn(50)
    param = nn.Parameter(anchor.clone())
    sgd = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=nesterov)
    weights, momentum = anchor.clone(), torch.zeros(50)
    for round_ in range(5):
        unified = weights + torch.randn(50)  # the rule's result this round
        param.grad = param.detach() - unified  # DiLoCo's pseudo-gradient: anchor - unified
        sgd.step()
        step, momentum = outer_step(unified - weights, momentum, 0.7, 0.9, nesterov)
        weights = weights + step
        torch.testing.assert_close(weights, param.detach(), rtol=1e-6, atol=1e-6)


def test_outer_step_without_momentum_scales_the_update() -> None:
    u = torch.tensor([1.0, -2.0])
    step, m = outer_step(u, None, 0.5, 0.0, True)
    assert torch.equal(step, torch.tensor([0.5, -1.0])) and m is None


def _rounds(rank: int, world: int, cfg: UnifyConfig) -> dict:
    """ROUNDS rounds of local updates and unify; at round 3 the state is saved and a fresh Unifier
    (a restarted owner) replays rounds 3 and 4 from it."""
    flat = FlatState(_model(), tail=tail_size(world))
    unifier = Unifier.over(flat, cfg)
    history, digests, saved = [], [], None
    for round_ in range(1, ROUNDS + 1):
        flat.values.add_(_update(rank, flat.numel, round_))
        if round_ == 3:
            saved = ({k: v.clone() for k, v in unifier.state_dict().items()}, flat.values.clone())
        digests.append(unifier.unify().digest)
        history.append(flat.values.clone())
    assert saved is not None
    fresh = FlatState(_model(), tail=tail_size(world))
    restarted = Unifier.over(fresh, cfg)
    restarted.load_state_dict(saved[0])
    fresh.values.copy_(saved[1])
    resumed = []
    for round_ in range(3, ROUNDS + 1):
        if round_ > 3:
            fresh.values.add_(_update(rank, fresh.numel, round_))
        restarted.unify()
        resumed.append(fresh.values.clone())
    return {"history": history, "digests": digests, "resumed": resumed, "keys": sorted(unifier.state_dict())}


def _by_hand(world: int, nesterov: bool, lr: float = 0.7, beta: float = 0.9) -> list[torch.Tensor]:
    """DiLoCo's outer step written out on stacked tensors: g = anchor - mean; buf = beta buf + g; d = g +
    beta buf (Nesterov) or buf; anchor - lr d."""
    anchor = FlatState(_model()).values.clone()
    buf = torch.zeros_like(anchor)
    out = []
    for round_ in range(1, ROUNDS + 1):
        stacked = torch.stack([anchor + _update(r, anchor.numel(), round_) for r in range(world)])
        g = anchor - stacked.mean(0)
        buf = beta * buf + g
        d = g + beta * buf if nesterov else buf
        anchor = anchor - lr * d
        out.append(anchor)
    return out


def _outer_world(rank: int, world: int) -> dict:
    return {
        "nesterov": _rounds(rank, world, UnifyConfig(outer="nesterov")),
        "sgd": _rounds(rank, world, UnifyConfig(outer="sgd", outer_lr=0.5, outer_momentum=0.9)),
        "server": _rounds(rank, world, UnifyConfig(server_momentum=0.9, server_lr=0.5)),
        "plain": _rounds(rank, world, UnifyConfig()),
    }


@pytest.mark.parametrize("world", [2, 3])
def test_outer_optimizer_over_rounds_on_every_rank(world: int) -> None:
    results = run_world(_outer_world, world)
    expected = {"nesterov": _by_hand(world, True), "sgd": _by_hand(world, False, lr=0.5)}
    for kind, want in expected.items():
        for r in results:
            run = r[kind]
            for got, ref in zip(run["history"], want):
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=kind)
            assert run["digests"] == results[0][kind]["digests"]  # identical bits on every rank, every round
            assert all(torch.equal(a, b) for a, b in zip(run["resumed"], run["history"][2:]))  # resume: the same bits
            assert run["keys"] == ["anchor", "momentum"]
    for r in results:  # the old names are outer = sgd, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(r["server"]["history"], r["sgd"]["history"]))
        # the outer step changes the result: Nesterov's unified weights are not the plain rule's
        assert not torch.equal(r["nesterov"]["history"][-1], r["plain"]["history"][-1])
        assert r["plain"]["keys"] == []


@pytest.mark.parametrize(
    ("options", "words"),
    [({"outer": "adam"}, "unify.outer = 'adam' is not known"),
     ({"outer": "nesterov", "outer_lr": 0.0}, "unify.outer_lr must be > 0"),
     ({"outer": "sgd", "outer_momentum": 1.0}, "unify.outer_momentum must be in [0, 1)"),
     ({"outer": "nesterov", "server_momentum": 0.5}, "older names of outer = 'sgd'")],
)  # fmt: skip
def test_outer_config_mistakes_are_one_line(options: dict, words: str) -> None:
    problems = UnifyConfig(**options).problems()
    assert len(problems) == 1 and words in problems[0]
