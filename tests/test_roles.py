"""Roles (unified / frozen / local) and the state a model really has: real gloo groups of 3 owners.

Frozen tensors must stay bit-exact over rounds, local ones stay each owner's, only unified ones cost
bytes; bool / int32 / int64 buffers keep dtype and exact value; bf16 weights beside fp32 norms are unified
with fp32 arithmetic, the same bits on every owner as the pure rule's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unify_dist as ud
from tests.world import run_world
from unify_dist.roles import FROZEN, LOCAL, UNIFIED, role_table
from unify_dist.rules import RULES


class Pretrained(nn.Module):
    """A frozen 'pretrained' body with a causal mask, BatchNorm, integer buffers and a trainable head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.body.requires_grad_(False)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        self.register_buffer("mask", torch.ones(4, 4, dtype=torch.bool).tril())
        self.register_buffer("positions", torch.arange(4, dtype=torch.int32))
        self.register_buffer("big", torch.tensor([2**60 + 7, -(2**50) - 3], dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(4, 4).masked_fill_(~self.mask, float("-inf"))  # needs a bool mask
        h = torch.relu(self.norm(self.body(x)))
        return self.head(h) + scores.softmax(-1)[self.positions % 4].sum() * 0.0


def test_default_roles_follow_requires_grad_and_patterns_override():
    model = Pretrained()
    table = role_table(model)
    roles = {e.name: e.role for e in table.entries}
    assert roles["body.weight"] == FROZEN and roles["head.weight"] == UNIFIED and roles["mask"] == FROZEN
    assert roles["norm.running_mean"] == UNIFIED and roles["positions"] == UNIFIED and roles["big"] == UNIFIED
    table = role_table(model, frozen=["head.bias"], local=["norm.running_*", "norm.num_batches_tracked"])
    roles = {e.name: e.role for e in table.entries}
    assert roles["head.bias"] == FROZEN and roles["norm.running_var"] == LOCAL and roles["head.weight"] == UNIFIED
    with pytest.raises(ValueError, match=r"local pattern 'classifier\.\*' matches no tensor.*'body\.weight'"):
        role_table(model, local=["classifier.*"])
    with pytest.raises(ValueError, match="'head.bias' matches frozen pattern 'head.\\*' and local pattern"):
        role_table(model, frozen=["head.*"], local=["*.bias"])


def _rounds(rank: int, world: int, options: dict, rounds: int) -> dict:
    torch.manual_seed(rank)
    model = Pretrained()
    ud.same_start(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    unifier = ud.Unifier(model, rule="avg", **options)
    model.big.add_(rank)  # owners' counters drift apart, far above 2^48
    model.positions.add_(rank)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(rank)
    outcomes = []
    for _ in range(rounds):
        x, y = torch.randn(32, 6, generator=g) + rank, torch.randint(0, 3, (32,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        outcomes.append(unifier.unify())
    model(torch.randn(2, 6))  # the causal-mask forward still runs
    return {"start": start, "end": {k: v.clone() for k, v in model.state_dict().items()}, "outcomes": outcomes,
            "numel": unifier.flat.numel, "buffer": unifier.flat.buffer.numel()}  # fmt: skip


def test_frozen_stays_bit_exact_local_stays_own_and_only_unified_bytes_travel():
    world, rounds = 3, 10
    results = run_world(_rounds, world, {"local": ["norm.running_*"]}, rounds)
    first = results[0]
    for r in results:
        for name in ("body.weight", "body.bias", "mask"):  # frozen: the start's bits after 10 rounds
            assert torch.equal(r["end"][name], first["start"][name]), name
        for name in ("head.weight", "norm.weight", "norm.num_batches_tracked", "positions", "big"):
            assert torch.equal(r["end"][name], first["end"][name]), name
        assert r["end"]["mask"].dtype == torch.bool and r["end"]["positions"].dtype == torch.int32
        assert [o.digest for o in r["outcomes"]] == [o.digest for o in first["outcomes"]]
    # integers: exact at any magnitude, the largest over owners (int_rule max)
    assert first["end"]["big"].tolist() == [2**60 + 7 + world - 1, -(2**50) - 3 + world - 1]
    assert first["end"]["positions"].tolist() == [world - 1 + i for i in range(4)]
    assert not torch.equal(results[0]["end"]["norm.running_mean"], results[1]["end"]["norm.running_mean"])  # local
    # the wire carries the unified part only: head (27) + norm affine (16), not the frozen body (56)
    assert first["numel"] == 8 * 3 + 3 + 8 + 8
    ring = 2 * (world - 1) * first["buffer"] * 4 // world
    assert all(o.bytes_sent == ring for o in first["outcomes"])


def test_int_rule_min_and_a_selection_that_differs_between_owners():
    results = run_world(_rounds, 3, {"int_rule": "min"}, 1)
    assert results[0]["end"]["big"].tolist() == [2**60 + 7, -(2**50) - 3]
    errors = run_world(_differ, 2)
    assert all("'head.bias' is unified on rank 0 but frozen on rank 1" in e for e in errors)


def _differ(rank: int, world: int) -> str:
    model = Pretrained()
    ud.same_start(model)
    if rank == 1:
        model.head.bias.requires_grad_(False)
    try:
        ud.Unifier(model)
    except ValueError as e:
        return str(e)
    return "no error"


def _refrozen(rank: int, world: int) -> str:
    model = Pretrained()
    ud.same_start(model)
    unifier = ud.Unifier(model)
    model.body.requires_grad_(True)  # unfrozen after the Unifier was built
    try:
        unifier.unify()
    except ValueError as e:
        return str(e)
    return "no error"


def test_unfreezing_after_construction_is_one_line():
    assert all("'body.weight' was frozen when the Unifier was built" in e for e in run_world(_refrozen, 2))


class Mixed(nn.Module):
    """Pretrained-style dtypes: bf16 linear weights, an fp32 LayerNorm."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 32).to(torch.bfloat16)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 4).to(torch.float16)


def _mixed(rank: int, world: int, rule: str) -> dict:
    model = Mixed()
    ud.same_start(model)
    unifier = ud.Unifier(model, rule=rule, chunk_elements=100)  # several chunks per narrow buffer
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outcome = unifier.unify(weight=float(rank + 1))
    after = {k: v.clone() for k, v in model.state_dict().items()}
    return {"before": before, "after": after, "digest": outcome.digest, "narrow": list(unifier.flat.narrow)}


@pytest.mark.parametrize("rule", ["avg", "weighted_avg", "absmax", "median"])
def test_several_float_dtypes_unify_in_fp32_to_the_same_bits(rule):
    world = 3
    results = run_world(_mixed, world, rule)
    assert results[0]["narrow"] == [torch.bfloat16, torch.float16]
    weights = torch.tensor([1.0, 2.0, 3.0])
    for name, value in results[0]["after"].items():
        stacked = torch.stack([r["before"][name] for r in results])
        if stacked.dtype in (torch.bfloat16, torch.float16):  # the pure rule in fp32, rounded back once
            expected = RULES[rule](stacked.float(), weights).to(stacked.dtype)
            assert torch.equal(value, expected), name
        else:
            torch.testing.assert_close(value, RULES[rule](stacked, weights), rtol=1e-6, atol=1e-6)
        assert value.dtype == stacked.dtype
        assert all(torch.equal(r["after"][name], value) for r in results), name
    assert len({r["digest"] for r in results}) == 1


def _bf16_only(rank: int, world: int, sick_rank: int) -> dict:
    model = nn.Sequential(nn.Linear(40, 25), nn.Linear(25, 7)).to(torch.bfloat16)  # 1,207 elements, no fp32
    ud.same_start(model)
    unifier = ud.Unifier(model, rule="avg", chunk_elements=300, nonfinite="skip")  # 5 chunks, the last short
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
        if rank == sick_rank:
            model[0].bias[3] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outcome = unifier.unify()
    return {"before": before, "after": dict(model.state_dict()), "sent": outcome.bytes_sent, "digest": outcome.digest}


@pytest.mark.parametrize("world,sick_rank", [(4, -1), (3, 1)])
def test_narrow_buffers_send_an_all_reduces_bytes_and_unify_to_the_pure_rule(world, sick_rank):
    """3+ owners: each owner combines one shard (all_to_all, then all_gather), 2 (W-1)/W x 2 bytes per
    element; the same bits as the pure rule in fp32 over the healthy owners, on every owner."""
    results = run_world(_bf16_only, world, sick_rank)
    healthy = [r for r in range(world) if r != sick_rank]
    for name, value in results[0]["after"].items():
        stacked = torch.stack([results[r]["before"][name] for r in healthy])
        assert torch.equal(value, RULES["avg"](stacked.float(), torch.ones(len(healthy))).to(torch.bfloat16)), name
        assert all(torch.equal(r["after"][name], value) for r in results), name
    payload = 1207 * 2
    # the narrow part at the all_reduce's 2 (W-1)/W (padding: under 1%), plus the small tail and weights
    bound = 1.01 * 2 * (world - 1) / world * payload + 200
    assert all(r["sent"] < bound for r in results), [r["sent"] for r in results]
    assert len({r["digest"] for r in results}) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_nonfinite_narrow_value_is_named_and_a_large_finite_one_is_not(bad: float) -> None:
    """find_nonfinite_narrow: exact in the buffer's own dtype; fp16 values whose sum overflows are finite."""
    from unify_dist.flat import FlatState

    model = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 10), nn.LayerNorm(10))
    model[0].to(torch.float16)
    model[1].to(torch.bfloat16)
    flat = FlatState(model, tail=8)
    assert set(flat.narrow) == {torch.float16, torch.bfloat16}
    with torch.no_grad():
        model[0].weight.fill_(60000.0)  # the fp16 buffer's sum overflows; every value is finite
        assert flat.find_nonfinite_narrow() is None
        model[1].bias[4] = bad
        assert flat.find_nonfinite_narrow() == "1.bias"
        model[1].bias[4] = 0.0
        model[0].weight[3, 7] = bad
        assert flat.find_nonfinite_narrow() == "0.weight"
