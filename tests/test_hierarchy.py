"""Owners bigger than one process: 2 owners x 2 processes (data-parallel inside each owner) against the
same run as 2 single-process owners on the same data. Real gloo groups of 4 and 2 ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import unify_dist as ud
from tests.world import run_world


def _owner_data(owner: int, n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7 + owner)
    x = torch.randn(n, 10, generator=g) + owner
    return x, (x[:, :3].sum(1) > owner * 3).long()


def _train(rank: int, world: int, split: str) -> dict:
    """3 rounds of one SGD epoch each and an avg unify; split: none (one process per owner), half (each of an
    owner's 2 processes takes half of every batch), same (both take the whole batch: identical maths)."""
    procs = 1 if split == "none" else 2
    groups = ud.owner_groups(procs_per_owner=procs)
    torch.manual_seed(rank)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 2))
    ud.same_start(model)
    unifier = ud.HierarchicalUnifier(model, groups, rule="avg")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _owner_data(groups.owner_index)
    part = rank % procs
    digests = []
    for _ in range(3):
        for start in range(0, len(x), 32):
            xb, yb = x[start : start + 32], y[start : start + 32]
            if split == "half":
                xb, yb = xb[part::procs], yb[part::procs]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            if procs > 1:
                ud.average_gradients(model, groups.owner)  # collective inside the owner
            optimizer.step()
        digests.append(unifier.unify(weight=len(x)).digest)
    return {"weights": [p.detach().clone() for p in model.parameters()], "digests": digests,
            "leader": groups.is_leader, "owner": groups.owner_index}  # fmt: skip


@pytest.mark.parametrize("split", ["same", "half"])
def test_two_owners_of_two_processes_match_two_single_process_owners(split: str) -> None:
    single = run_world(_train, 2, "none")
    multi = run_world(_train, 4, split)
    assert [r["owner"] for r in multi] == [0, 0, 1, 1] and [r["leader"] for r in multi] == [True, False, True, False]
    for r in multi:  # every rank of every owner: the same bits, every round
        assert r["digests"] == multi[0]["digests"]
        assert all(torch.equal(a, b) for a, b in zip(r["weights"], multi[0]["weights"]))
    for a, b in zip(multi[0]["weights"], single[0]["weights"]):
        if split == "same":  # (g + g) / 2 == g exactly: the very same run
            assert torch.equal(a, b)
        else:  # the mean of two half-batch means is the batch mean, up to rounding
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if split == "same":
        assert multi[0]["digests"] == single[0]["digests"]


def _bad_split(rank: int, world: int) -> str:
    try:
        ud.owner_groups(procs_per_owner=2)
    except ValueError as e:
        return str(e)
    return ""


def test_owner_size_must_divide_the_processes() -> None:
    assert all("does not divide the 3 processes" in e for e in run_world(_bad_split, 3))
