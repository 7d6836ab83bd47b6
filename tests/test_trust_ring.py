"""The sealed ring on real gloo groups: every rule through a Collective whose reducer is a SealedRing
equals the plain gloo path (bits for max/absmax/gathers, float tolerance for sums in another order),
with digests identical on every rank; a flipped byte stops every rank, naming the link."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.trust_keys import fresh_keys, key, roster_of
from tests.world import run_world
from unify_dist.collectives import tail_size
from unify_dist.config import UnifyConfig
from unify_dist.flat import FlatState
from unify_dist.rules import LORA_RULES, RULES

# the built-in rules (other test files register rules of their own in this process; spawned ranks lack them),
# less the LoRA rules, which need a model with adapters (sealed, in tests/test_lora.py)
BUILT_IN = [r for r in RULES if RULES[r].__module__ == "unify_dist.rules" and r not in LORA_RULES]
from unify_dist.trust import IntegrityError, SealedRing, admit
from unify_dist.unifier import Unifier

EXACT = {"max", "absmax", "median", "trimmed_mean", "ties"}  # same reduction order on both paths


def _model() -> nn.Module:
    """The owners' common start: a BatchNorm (int64 counter) between two layers."""
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(9, 30), nn.BatchNorm1d(30), nn.Linear(30, 4))


def _train_a_little(flat: FlatState, rank: int) -> None:
    """Each owner moves away from the common start differently; absmax's corners (a +/- tie, signed zero,
    a subnormal) are in every owner's first entries."""
    g = torch.Generator().manual_seed(rank)
    flat.values.add_(torch.randn(flat.values.shape, generator=g) * 0.1)
    flat.values[:3] = torch.tensor([0.75, -0.0, 1e-40]) * (-1) ** rank
    flat.ints.fill_(5 * rank)


def _ring(rank: int, raws: list[bytes], segment_bytes: int) -> SealedRing:
    admission = admit(key(raws[rank]), f"owner{rank}", roster_of(raws), run_id="test")
    return SealedRing(admission, segment_bytes=segment_bytes)


def _every_rule(rank: int, world: int, raws: list[bytes]) -> dict:
    ring = _ring(rank, raws, segment_bytes=96)  # many segments per chunk: the pipeline is exercised
    out = {}
    for rule in BUILT_IN:
        for sealed in (False, True):
            model = _model()
            flat = FlatState(model, tail=tail_size(world, model))
            unifier = Unifier.over(flat, UnifyConfig(rule=rule, chunk_elements=50))  # delta rules: anchor = start
            _train_a_little(flat, rank)
            if sealed:
                unifier.core.reducer = ring
            outcome = unifier.unify(weight=float(rank + 1))
            out[rule, sealed] = (flat.values.clone(), flat.ints.clone(), outcome.digest)
    return out


def _everything(rank: int, world: int, raws: list[bytes]) -> dict:
    """Every check's worker in one group (spawning a group costs more than all the checks together)."""
    return {"rules": _every_rule(rank, world, raws), "raw": _raw_ring(rank, world, raws),
            "tampered": _tampered(rank, world, raws, bad_rank=world - 1)}  # last: it stops the ring


@functools.cache
def _results(world: int) -> list[dict]:
    return run_world(_everything, world, fresh_keys(world))


WORLDS = [2, 3, pytest.param(4, marks=pytest.mark.slow)]


@pytest.mark.parametrize("world", WORLDS)
def test_every_rule_sealed_equals_plain(world: int) -> None:
    results = [r["rules"] for r in _results(world)]
    for rule in BUILT_IN:
        sealed = [r[rule, True] for r in results]
        plain = [r[rule, False] for r in results]
        assert len({d for _, _, d in sealed}) == 1, f"{rule}: digests differ across ranks"
        values, ints, _ = sealed[0]
        assert torch.equal(ints, plain[0][1])
        if rule in EXACT:
            assert torch.equal(values.view(torch.int32), plain[0][0].view(torch.int32)), rule
        else:
            torch.testing.assert_close(values, plain[0][0], rtol=1e-6, atol=1e-7)


def _raw_ring(rank: int, world: int, raws: list[bytes]) -> dict:
    """The ring's own calls on odd sizes (fewer elements than ranks, empty chunks) and dtypes."""
    ring = _ring(rank, raws, segment_bytes=40)
    g = torch.Generator().manual_seed(rank)
    out = {}
    for n in (1, world - 1, 1000):
        for dtype in (torch.float32, torch.float64, torch.int64):
            x = (torch.randn(n, generator=g) * 1000).to(dtype)
            for op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX):
                mine, ref = x.clone(), x.clone()
                ring.all_reduce(mine, op)
                dist.all_reduce(ref, op)
                out[n, dtype, op] = (mine, ref)
    gathered = [torch.empty(3, dtype=torch.int64) for _ in range(world)]
    ring.all_gather(gathered, torch.full((3,), rank))
    out["gather"] = torch.stack(gathered)
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_ring_calls_match_gloo(world: int) -> None:
    results = [r["raw"] for r in _results(world)]
    for result in results:
        assert torch.equal(result["gather"], torch.arange(world).repeat_interleave(3).view(world, 3))
        for k, v in result.items():
            if k == "gather":
                continue
            mine, ref = v
            assert torch.equal(mine.view(-1).view(torch.uint8), results[0][k][0].view(-1).view(torch.uint8)), k  # same bits everywhere
            if mine.is_floating_point() and k[2] == dist.ReduceOp.SUM:
                torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-3)  # values ~1000, summed in another order
            else:
                assert torch.equal(mine, ref), k


def _tampered(rank: int, world: int, raws: list[bytes], bad_rank: int) -> str:
    """`bad_rank` flips one byte of a sealed segment after sealing it, as a relay on the path would."""
    ring = _ring(rank, raws, segment_bytes=64)
    values = torch.full((500,), float(rank))
    before = values.clone()
    ring.all_reduce(values)  # a clean call first: the flip below hits a link already in use
    if rank == bad_rank:
        link = ring.links[(rank + 1) % world]
        seal = link.seal_into

        def flipping(data, label, out):
            seal(data, label, out)
            if "call 2 reduce 0 segment 1" in label:
                out[5] ^= 0x01

        link.seal_into = flipping
    try:
        ring.all_reduce(before)
    except IntegrityError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("world", WORLDS)
def test_flipped_byte_stops_every_rank_naming_the_link(world: int) -> None:
    bad = world - 1
    messages = [r["tampered"] for r in _results(world)]
    for m in messages:
        assert f"from rank {bad} to rank {(bad + 1) % world} failed authentication" in m, m
