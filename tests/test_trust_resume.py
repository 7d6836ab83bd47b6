"""A returning owner takes the unified model from a peer: with trust on, sealed through the ring, and the
result is the very bytes the plain broadcast gives. Real gloo groups; admission with fresh keys."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.trust_keys import fresh_keys, key, roster_of
from tests.world import run_world
from unify_dist.app.config import RunConfig
from unify_dist.app.loop import _take_from
from unify_dist.app.state import TrainState
from unify_dist.collectives import tail_size
from unify_dist.config import UnifyConfig
from unify_dist.flat import FlatState
from unify_dist.trust import SealedRing, admit
from unify_dist.unifier import Unifier


def _hand_over(rank: int, world: int, raws: list[bytes] | None) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    flat = FlatState(model, tail=tail_size(world, model))
    cfg = RunConfig(unify=UnifyConfig(space="delta", server_momentum=0.5))
    state = TrainState(cfg, model, Unifier.over(flat, cfg.unify))
    if rank == 1:  # the owner that has the round: trained weights, momentum, two rounds of records
        with torch.no_grad():
            flat.values.add_(torch.arange(flat.numel, dtype=torch.float32) / 7)
            flat.ints.add_(5)
        state.unifier.unified_steps[0].momentum.fill_(0.25)
        state.records[:] = [{"round": 1}, {"round": 2, "participants": ["a", "b"]}]
    reducer = SealedRing(admit(key(raws[rank]), f"owner{rank}", roster_of(raws), run_id="resume")) if raws else None
    _take_from(1, state, needed=rank != 1, reducer=reducer)
    return {"values": flat.values.clone(), "ints": flat.ints.clone(), "records": state.records,
            "momentum": state.unifier.state_dict()["momentum"].clone()}  # fmt: skip


@pytest.mark.parametrize("world", [2, 3])
def test_sealed_hand_over_equals_the_plain_broadcast(world: int) -> None:
    plain = run_world(_hand_over, world, None)
    sealed = run_world(_hand_over, world, fresh_keys(world))
    for p, s in zip(plain, sealed):
        assert torch.equal(p["values"], s["values"]) and torch.equal(p["ints"], s["ints"])
        assert torch.equal(s["values"], sealed[1]["values"]) and int(s["ints"][0]) == 5
        assert s["records"] == [{"round": 1}, {"round": 2, "participants": ["a", "b"]}]
        assert float(s["momentum"].max()) == 0.25
