"""Trust on, from admission to the last unify, on real gloo groups (no program):

- owners who must share something and do not (the run id: the program's shared config; the roster) are
  refused on every rank with the mismatch named, not as a forgery;
- `same_start` through the sealed ring: rank 0's exact weights everywhere, nothing in the clear;
- a sealed unify that fails (one rank's link key is wrong) leaves every owner's model, anchor and momentum
  exactly as they were before the call, through the public API, and the error says so.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import unify_dist as ud
from tests.trust_keys import fresh_keys, key, roster_of
from tests.world import run_world
from unify_dist.trust import AdmissionError, IntegrityError, Link, SealedRing, admit
from unify_dist.trust.identity import Roster


def _mismatch(rank: int, world: int, raws: list[bytes], outsider: bytes) -> dict:
    out = {}
    roster = roster_of(raws)
    cases = {
        "config": (roster, "run id 'B'" if rank == 2 else "run id 'A'"),
        "roster": (Roster({**roster.owners, "zed": key(outsider).public_key().public_bytes_raw()}) if rank == 2 else roster, "A"),
    }
    for case, (members, run_id) in cases.items():
        try:
            admit(key(raws[rank]), f"owner{rank}", members, run_id)
            out[case] = "admitted"
        except AdmissionError as e:
            out[case] = str(e)
    return out


def test_a_mismatch_in_what_owners_share_is_named_as_one_on_every_rank() -> None:
    for said in run_world(_mismatch, 3, fresh_keys(3), fresh_keys(1)[0]):
        assert said["config"].startswith("admission refused: rank slot 2 runs another configuration: its shared-config hash "), said
        assert said["roster"].startswith("admission refused: rank slot 2 holds another roster: hash "), said
        for text in said.values():
            assert "forged" not in text and "signature" not in text
            assert text.endswith("no weight was sent (give every owner the same config and roster)")


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _watch() -> list[str]:
    """Record gloo's own collectives from here on (each still runs): what crosses in the clear."""
    plain: list[str] = []
    for name in ("all_gather", "broadcast", "all_reduce", "all_gather_object", "broadcast_object_list"):
        real = getattr(dist, name)
        setattr(dist, name, lambda *a, _real=real, _name=name, **k: (plain.append(_name), _real(*a, **k))[1])
    return plain


def _sealed_start_then_tamper(rank: int, world: int, raws: list[bytes]) -> dict:
    ring = SealedRing(admit(key(raws[rank]), f"owner{rank}", roster_of(raws), run_id="whole"), segment_bytes=512)
    plain = _watch()
    model = _model(seed=rank)  # every owner starts from its own random weights
    digest = ud.same_start(model, reducer=ring)  # collective, sealed
    started = {k: v.clone() for k, v in model.state_dict().items()}
    unifier = ud.Unifier(model, rule="avg", reducer=ring, space="delta", server_momentum=0.5)  # collective, sealed
    model(torch.randn(8, 6)).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=0.1 * (rank + 1))  # a local step: owners now differ
    first = unifier.unify(weight=1.0)  # collective, sealed: works
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * (rank + 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = {k: v.clone() for k, v in unifier.state_dict().items()}
    if rank == 0:  # rank 0 seals what it sends to rank 1 with a key rank 1 does not hold
        send, recv = ring.admission.link_keys[1]
        ring.links[1] = Link(0, 1, bytes(32), recv)
    error = None
    try:
        unifier.unify(weight=1.0)  # collective: fails on every rank
    except IntegrityError as e:
        error = str(e)
    after = model.state_dict()
    return {
        "digest": digest, "started": started, "first": first.digest, "error": error, "plain": plain,
        "weights kept": all(torch.equal(before[k], after[k]) for k in before),
        "state kept": set(kept) == set(unifier.state_dict()) and all(torch.equal(kept[k], v) for k, v in unifier.state_dict().items()),
        "changed by the step": any(not torch.equal(before[k], started[k]) for k in before),
    }  # fmt: skip


@pytest.mark.parametrize("world", [2, 3])
def test_sealed_start_and_a_failed_sealed_unify_leaves_the_model_whole(world: int) -> None:
    results = run_world(_sealed_start_then_tamper, world, fresh_keys(world))
    reference = _model(seed=0).state_dict()
    for r in results:
        assert r["digest"] == results[0]["digest"] and r["first"] == results[0]["first"]
        assert all(torch.equal(r["started"][k], reference[k]) for k in reference)  # rank 0's exact initial weights
        assert r["plain"] == [], r["plain"]  # structure, weights, digests, unify: nothing crossed in the clear
        assert r["error"] is not None and "failed authentication" in r["error"], r["error"]
        assert r["error"].endswith("this owner's model holds exactly its weights from before this unify (nothing of it was applied)")
        assert r["changed by the step"]  # the weights kept are not merely the start again
        assert r["weights kept"] and r["state kept"]  # model, anchor and momentum exactly as before the failed call
