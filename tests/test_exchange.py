"""unify_dist.exchange on real gloo groups: the receive-first all_gather (itself and through HostStaged)
against torch's, and the two-owner integer sum against torch's all_reduce, on WORLD and on a subgroup whose ranks are not the
global ones; the async all_to_all and all_gather, several in flight at once, each kept apart by its tag.
(Their speed over a slow link is `make bench-compress`'s and `make bench-lora-links`' to show, not a test's.)"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from tests.world import run_world
from unify_dist import exchange
from unify_dist.staging import HostStaged

DTYPES = (torch.float32, torch.bfloat16, torch.uint8, torch.int64)


def _row(rank: int, dtype: torch.dtype, n: int = 1000) -> torch.Tensor:
    g = torch.Generator().manual_seed(7 + rank)
    return (torch.randn(n, generator=g) * 50).to(dtype)


def _gathers(rank: int, world: int) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """(ours, torch's) for each dtype, on WORLD and, for 3 ranks, on the subgroup of ranks 2 and 0."""
    groups = [None]
    if world == 3:
        sub = dist.new_group([2, 0])  # every rank makes it; global rank 2 is the subgroup's rank 0 or 1
        groups += [sub] if rank in (0, 2) else []
    out = []
    for group in groups:
        size = dist.get_world_size(group)
        for dtype in DTYPES:
            mine = _row(rank, dtype)
            ours = [torch.full_like(mine, 3) for _ in range(size)]
            exchange.all_gather(ours, mine, group)
            assert torch.equal(mine, _row(rank, dtype))  # the sent tensor is left as it was
            theirs = [torch.empty_like(mine) for _ in range(size)]
            dist.all_gather(theirs, mine, group=group)
            out.append((ours, theirs))
            staged = [torch.full_like(mine, 5) for _ in range(size)]
            HostStaged(None, group).all_gather(staged, mine)  # GPU owners' reducer over plain gloo: the same path
            out.append((staged, theirs))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_all_gather_equals_torchs(world: int) -> None:
    for rank, pairs in enumerate(run_world(_gathers, world)):
        assert len(pairs) == 2 * len(DTYPES) * (2 if world == 3 and rank != 1 else 1)
        for ours, theirs in pairs:
            assert len(ours) == len(theirs)
            for a, b in zip(ours, theirs):
                assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _pairwise(rank: int, world: int) -> tuple[bool, torch.Tensor, torch.Tensor, bool, torch.Tensor]:
    q = torch.randint(-63, 64, (5000,), generator=torch.Generator().manual_seed(rank), dtype=torch.int8)
    expected = q.clone()
    dist.all_reduce(expected)
    ours = q.clone()
    done = exchange.pairwise_sum_(ours, torch.empty_like(ours))
    floats = torch.randn(10)
    untouched = floats.clone()
    refused = exchange.pairwise_sum_(floats, torch.empty_like(floats))  # not exact in any order: refused
    return done, ours, expected, refused, floats - untouched


@pytest.mark.parametrize("world", [2, 3])
def test_pairwise_sum_of_two_owners_equals_all_reduce(world: int) -> None:
    results = run_world(_pairwise, world)
    for done, ours, expected, refused, change in results:
        assert done == (world == 2)  # another world size: the caller all_reduces
        assert not refused and not change.any()
        if done:
            assert torch.equal(ours, expected)
    if world == 2:
        assert torch.equal(results[0][1], results[1][1])


def _value(src: int, dst: int, exchange_id: int, dtype: torch.dtype, n: int) -> torch.Tensor:
    """What rank `src` sends rank `dst` in one exchange: different for every (src, dst, exchange)."""
    g = torch.Generator().manual_seed(1000 * exchange_id + 10 * src + dst)
    return (torch.randn(n, generator=g) * 50).to(dtype)


def _in_flight(rank: int, world: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two all_to_alls and two all_gathers in flight at once, each with its own tag, of equal sizes (so a
    message matched to the wrong exchange lands silently, and only its values can tell): issued in one
    order on even ranks and in the reverse order on odd ones, which only the tags can keep apart.
    Returns (got, expected) pairs."""
    n = 257  # odd: no tidy alignment
    jobs = []
    for e in range(4):
        if e % 2 == 0:  # an all_to_all: part r for rank r
            send = torch.cat([_value(rank, dst, e, dtype, n) for dst in range(world)])
            out = torch.full_like(send, 7)
            expected = torch.cat([_value(src, rank, e, dtype, n) for src in range(world)])
            start = functools.partial(exchange.all_to_all, out, send, async_op=True, tag=e + 1)
            jobs.append((start, out, expected, send.clone(), send))
        else:  # an all_gather: the same row to every rank, views of one buffer as narrow.py gathers
            mine = _value(rank, 0, e, dtype, world * n)[:n]
            rows = torch.full((world * n,), 7, dtype=dtype)
            parts = list(rows.split(n))
            expected = torch.cat([_value(src, 0, e, dtype, world * n)[:n] for src in range(world)])
            start = functools.partial(exchange.all_gather, parts, mine, async_op=True, tag=e + 1)
            jobs.append((start, rows, expected, mine.clone(), mine))
    order = jobs if rank % 2 == 0 else jobs[::-1]
    pending = [start() for start, *_ in order]
    for p in pending[::-1]:  # waited in another order again
        p.wait()
    out = []
    for _, got, expected, before, sent in jobs:
        out.append((got, expected))
        out.append((sent, before))  # what was sent is left as it was
    # and the same exchanges through torch's collectives, for the bits
    theirs = torch.empty_like(jobs[0][1])
    dist.all_to_all_single(theirs, jobs[0][4])
    out.append((jobs[0][1], theirs))
    return out


@pytest.mark.parametrize("world", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_async_exchanges_in_flight_together_each_get_their_own_messages(world: int, dtype: torch.dtype) -> None:
    for pairs in run_world(_in_flight, world, dtype):
        assert len(pairs) == 9
        for got, expected in pairs:
            assert got.dtype == expected.dtype and torch.equal(got.view(torch.uint8), expected.view(torch.uint8))

