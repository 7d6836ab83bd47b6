"""Rules beyond the paper: robust rules, delta space, ties, clipping, serverless momentum, FedProx.

Pure references on hand-made tensors; the collective layer on real spawned gloo groups against them.
"""

from __future__ import annotations

import dataclasses
from functools import cache, partial

import pytest
import torch
from torch import nn

from tests.world import run_world
from unify_dist.config import TrainConfig, UnifyConfig
from unify_dist.flat import FlatState
from unify_dist.prox import proximal_term
from unify_dist.rules import RULES, SPECS, clip_update, register_rule, server_step, ties_merge, ties_trim
from unify_dist.collectives import tail_size, verify_identical
from unify_dist.unifier import Unifier

W = torch.ones(4)
X = torch.tensor([[1.0, -4.0, 2.0], [-2.0, 3.0, 9.0], [0.5, 1.0, 1.0], [7.0, 0.0, 1.0]])


# --- pure references ---------------------------------------------------------------------------


def test_median_averages_the_two_middle_values() -> None:
    assert torch.equal(RULES["median"](X, W), torch.tensor([0.75, 0.5, 1.5]))
    assert torch.equal(RULES["median"](X[:3], W[:3]), torch.tensor([0.5, 1.0, 2.0]))


def test_trimmed_mean_drops_each_end() -> None:
    assert torch.equal(RULES["trimmed_mean"](X, W), torch.tensor([0.75, 0.5, 1.5]))  # 4 owners: 1 each end
    torch.testing.assert_close(RULES["trimmed_mean"](X, W, trim_fraction=0.0), RULES["avg"](X, W))
    assert torch.equal(RULES["trimmed_mean"](X[:3], W[:3], trim_fraction=0.4), torch.tensor([0.5, 1.0, 2.0]))


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_robust_rules_keep_identical_owners(name: str) -> None:
    x = torch.randn(3, 5)
    torch.testing.assert_close(RULES[name](x[None].expand(5, 3, 5), torch.ones(5)), x)


def test_ties_trims_elects_and_averages_agreeing_owners() -> None:
    update = torch.tensor([0.1, -3.0, 0.5, 2.0, -0.2])
    assert torch.equal(ties_trim(update, 0.4), torch.tensor([0.0, -3.0, 0.0, 2.0, 0.0]))  # top 2 of 5
    stacked = torch.tensor([[1.0, -2.0, 0.0, 4.0], [3.0, 1.0, 0.0, -1.0], [-5.0, 0.5, 2.0, -1.0]])
    # column 0: +4 vs -5 -> minus wins, only -5; column 1: -2 vs 1.5 -> minus; column 3: +4 vs -2 -> plus
    assert torch.equal(ties_merge(stacked, W[:3]), torch.tensor([-5.0, -2.0, 2.0, 4.0]))
    # density 1 trims nothing: ties is then the sign-elected disjoint mean
    assert torch.equal(RULES["ties"](stacked, W[:3], ties_density=1.0), ties_merge(stacked, W[:3]))


def test_clip_and_server_step() -> None:
    u = torch.tensor([3.0, 4.0])
    assert torch.equal(clip_update(u, 10.0), u)
    torch.testing.assert_close(clip_update(u, 1.0), torch.tensor([0.6, 0.8]))
    step, m = server_step(torch.tensor([1.0]), torch.tensor([2.0]), beta=0.5, lr=0.1)
    torch.testing.assert_close((step, m), (torch.tensor([0.2]), torch.tensor([2.0])))


def test_registry_pairs_owner_step_with_combine() -> None:
    with pytest.raises(ValueError, match="go together"):
        register_rule("half_ties", owner_step=ties_trim)


def test_proximal_term_value_and_gradient() -> None:
    model = nn.Linear(3, 2)
    assert proximal_term(model, 0.0) is None
    term = proximal_term(model, mu=0.5)
    assert term is not None and float(term().detach()) == 0.0  # at the snapshot
    with torch.no_grad():
        model.weight.add_(1.0)
    loss = term()
    torch.testing.assert_close(loss, torch.tensor(0.5 / 2 * 6))
    loss.backward()
    torch.testing.assert_close(model.weight.grad, torch.full((2, 3), 0.5))  # mu * (w - w_start)
    assert model.bias.grad is not None and torch.all(model.bias.grad == 0)


@pytest.mark.parametrize(
    "section,key,value",
    [(UnifyConfig, "space", "deltas"), (UnifyConfig, "trim_fraction", 0.5), (UnifyConfig, "ties_density", 0.0),
     (UnifyConfig, "update_norm_bound", -1.0), (UnifyConfig, "server_momentum", 1.0),
     (UnifyConfig, "server_lr", 0.0), (TrainConfig, "fedprox_mu", -0.1)],
)  # fmt: skip
def test_config_refuses_bad_values(section, key: str, value) -> None:
    assert section().problems() == []
    problems = dataclasses.replace(section(), **{key: value}).problems()
    assert len(problems) == 1 and key in problems[0]


# --- the collective layer against the references -------------------------------------------------
# Spawning a group costs seconds on a small machine, so each world size is spawned once (_world) and
# runs every scenario; the tests below check their part of its results.

CASES = [
    ("median", {}),
    ("trimmed_mean", {"trim_fraction": 0.25}),
    ("trimmed_mean", {"trim_fraction": 0.4}),
    ("median", {"space": "delta"}),
    ("ties", {"ties_density": 0.3}),
    ("avg", {"space": "delta", "update_norm_bound": 0.3}),
    ("weighted_avg", {"update_norm_bound": 0.3}),
    ("absmax", {"space": "delta"}),
    ("trimmed_mean", {"space": "delta", "update_norm_bound": 0.3, "trim_fraction": 0.3}),
]


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same start on every rank, as after the loop's broadcast
    return nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


def _update(rank: int, n: int, round_: int = 0) -> torch.Tensor:
    """A rank's local change: different sizes per rank, so a 0.3 norm bound clips some and not others."""
    g = torch.Generator().manual_seed(1000 * round_ + rank)
    return 0.02 * (rank + 1) * torch.randn(n, generator=g)


def _unify_cases(rank: int, world: int) -> list[dict]:
    flat = FlatState(_model(), tail=tail_size(world))
    start = flat.values.clone()
    out = []
    for rule, options in CASES:
        flat.values.copy_(start)
        unifier = Unifier.over(flat, UnifyConfig(rule=rule, chunk_elements=16, **options))  # many chunks
        flat.values.add_(_update(rank, flat.numel))
        unifier.unify(rule=rule, weight=float(rank + 1))
        out.append({"after": flat.values.clone(), "digests": verify_identical(flat)})
    return out


def _reference(rule: str, options: dict, start: torch.Tensor, world: int) -> torch.Tensor:
    cfg = UnifyConfig(rule=rule, **options)
    spec = SPECS[rule]
    fn = partial(RULES[rule], **{k: getattr(cfg, k) for k in spec.options})
    updates = torch.stack([clip_update(_update(r, start.numel()), cfg.update_norm_bound) for r in range(world)])
    weights = torch.arange(1, world + 1, dtype=torch.float64)
    if cfg.space == "delta" or spec.delta_only:
        return start + fn(updates, weights)
    return fn(start + updates, weights)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_collective_matches_reference(world: int) -> None:
    results = [r["cases"] for r in _world(world)]
    start = FlatState(_model()).values
    for i, (rule, options) in enumerate(CASES):
        expected = _reference(rule, options, start, world)
        for r in results:
            torch.testing.assert_close(r[i]["after"], expected, rtol=1e-6, atol=1e-7, msg=f"{rule} {options}")
            assert torch.equal(r[i]["after"], results[0][i]["after"])  # bit-identical on every rank
        assert not torch.equal(results[0][i]["after"], start)  # the unify did something


def _skip_sick_owner(rank: int, world: int) -> torch.Tensor:
    flat = FlatState(_model(), tail=tail_size(world))
    unifier = Unifier.over(flat, UnifyConfig(rule="median", space="delta", nonfinite="skip", chunk_elements=16))
    flat.values.add_(_update(rank, flat.numel))
    if rank == 0:
        flat.values[5] = float("nan")
    assert unifier.unify(rule="median").skipped == [0]
    return flat.values.clone()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_delta_space_skips_a_sick_owner(world: int) -> None:
    start = FlatState(_model()).values
    healthy = torch.stack([_update(r, start.numel()) for r in range(1, world)])
    for r in _world(world):
        torch.testing.assert_close(r["skip"], start + RULES["median"](healthy, torch.ones(world - 1)))


def _momentum_rounds(rank: int, world: int) -> dict:
    cfg = UnifyConfig(rule="avg", space="delta", server_momentum=0.9, server_lr=0.5, compare=["median"])
    flat = FlatState(_model(), tail=tail_size(world))
    unifier = Unifier.over(flat, cfg)
    history = []
    for round_ in range(1, 4):
        flat.values.add_(_update(rank, flat.numel, round_))
        local = flat.values.clone()
        unifier.unify(rule="median", commit=False)  # a side-by-side candidate, then thrown away
        flat.values.copy_(local)
        if round_ == 3:  # checkpoint, "crash", resume into a fresh Unifier: the same round 3
            saved = {k: v.clone() for k, v in unifier.state_dict().items()}
            restarted = Unifier.over(flat, cfg)
            restarted.load_state_dict(saved)
            restarted.unify(rule="avg")
            history.append(flat.values.clone())
            flat.values.copy_(local)
        unifier.unify(rule="avg")
        history.append(flat.values.clone())
    return {"history": history, "state": unifier.state_dict()}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_server_momentum_over_rounds_and_resume(world: int) -> None:
    results = [r["momentum"] for r in _world(world)]
    weights = start = FlatState(_model()).values.clone()
    momentum = torch.zeros_like(start)
    expected = []
    for round_ in range(1, 4):
        delta = torch.stack([_update(r, start.numel(), round_) for r in range(world)]).mean(0)
        step, momentum = server_step(delta, momentum, 0.9, 0.5)
        weights = weights + step
        expected.append(weights)
    for r in results:
        history = r["history"]
        for got, want in zip([history[0], history[1], history[3]], expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(history[2], history[3])  # the resumed Unifier continues exactly
        assert torch.equal(r["state"]["anchor"], history[3])
        assert torch.equal(history[3], results[0]["history"][3])


def _plain_state(rank: int, world: int) -> dict:
    flat = FlatState(_model(), tail=tail_size(world))
    return Unifier.over(flat, UnifyConfig(rule="avg", compare=["median", "max"])).state_dict()


def test_plain_rules_keep_no_state() -> None:
    # no anchor copy, no momentum: with the new options off the plain paths are untouched
    assert [r["plain_state"] for r in _world(2)] == [{}, {}]


# --- one hostile owner among four ---------------------------------------------------------------


def _trained(rank: int) -> torch.Tensor:
    """Logistic regression trained briefly from a shared start on this owner's own synthetic samples."""
    torch.manual_seed(0)
    model, teacher = nn.Linear(20, 4), torch.randn(20, 4)
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(256, 20, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(256, 4, generator=g)).argmax(1)
    for _ in range(30):  # plain gradient descent (a torch.optim first step costs seconds of imports)
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
        with torch.no_grad():
            for p, g_ in zip(model.parameters(), grads):
                p.sub_(0.5 * g_)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _hostile(rank: int, world: int) -> dict:
    model = nn.Linear(20, 4)
    flat = FlatState(model, tail=tail_size(world))
    honest = _trained(rank)
    out: dict = {"honest": honest}
    for kind in ("scaled", "noise"):
        mine = honest
        if rank == world - 1:
            noise = 10 * torch.randn(honest.shape, generator=torch.Generator().manual_seed(5))
            mine = -10 * honest if kind == "scaled" else noise
        for rule in ("avg", "median", "trimmed_mean"):
            flat.values.copy_(mine)
            Unifier.over(flat, UnifyConfig(rule=rule, trim_fraction=0.25)).unify(rule=rule)
            out[kind, rule] = flat.values.clone()
    return out


def test_robust_rules_resist_one_hostile_owner() -> None:
    results = [r["hostile"] for r in _world(4)]
    honest = torch.stack([r["honest"] for r in results[:3]])
    clean = honest.mean(0)
    spread = float((honest - clean).norm(dim=1).max())  # how far an honest owner sits from the clean result
    for kind in ("scaled", "noise"):
        avg_error = float((results[0][kind, "avg"] - clean).norm())
        assert avg_error > 5 * spread  # one owner drags the average far away
        for rule in ("median", "trimmed_mean"):
            robust = results[0][kind, rule]
            robust_error = float((robust - clean).norm())
            assert robust_error <= spread and 10 * robust_error < avg_error  # no further than an honest owner
            # per element, it never leaves the honest owners' range: the hostile value is outvoted
            assert torch.all(robust >= honest.amin(0) - 1e-6) and torch.all(robust <= honest.amax(0) + 1e-6)


def _everything(rank: int, world: int) -> dict:
    out = {"cases": _unify_cases(rank, world), "momentum": _momentum_rounds(rank, world)}
    out["plain_state"] = _plain_state(rank, world)
    out["skip"] = _skip_sick_owner(rank, world)
    if world == 4:
        out["hostile"] = _hostile(rank, world)
    return out


@cache
def _world(world: int) -> list[dict]:
    return run_world(_everything, world)
