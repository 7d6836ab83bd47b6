"""Owners bigger than one process: G processes train data-parallel inside an owner, owners unify across.

torchrun numbers ranks machine by machine, so with `--nproc_per_node=G` each machine's G consecutive ranks
are one owner. Inside an owner the processes average their gradients every step (the owner's own
data-parallel training, e.g. DistributedDataParallel on `groups.owner`); after each local epoch only the
owners' first processes (the leaders) take part in the cross-owner unify, and each leader then hands the
unified weights to its own processes. Every rank of every owner ends with the same bits, proven by one
digest check over all ranks.

Example (2 machines x 2 GPUs = 2 owners)::

    groups = ud.owner_groups(procs_per_owner=2)      # collective, on every rank
    ud.same_start(model)
    unifier = ud.HierarchicalUnifier(model, groups, rule="avg")
    ddp = DistributedDataParallel(model, process_group=groups.owner)
    for epoch in range(epochs):
        train_one_epoch(ddp, my_half_of_the_owners_data)
        unifier.unify(weight=len(owners_dataset))
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from unify_dist.collectives import tail_size, verify_identical
from unify_dist.config import UnifyConfig
from unify_dist.flat import FlatState
from unify_dist.roles import LOCAL
from unify_dist.unifier import Unifier, UnifyOutcome
from unify_dist.wire import WireError, broadcast_bytes

__all__ = ["OwnerGroups", "owner_groups", "HierarchicalUnifier", "average_gradients"]


@dataclass(frozen=True)
class OwnerGroups:
    """Which owner this process belongs to, and the process groups of the two levels."""

    owner: dist.ProcessGroup
    """This owner's G processes (data-parallel training and the hand-over of unified weights)."""
    leaders: dist.ProcessGroup | None
    """One process per owner (its first); None on the other processes, which never join it."""
    owner_index: int
    """Which owner, 0 .. owners - 1."""
    owners: int
    """How many owners."""
    procs: int
    """Processes per owner (G)."""
    leader: int
    """The global rank of this owner's leader."""

    @property
    def is_leader(self) -> bool:
        return dist.get_rank() == self.leader


def owner_groups(procs_per_owner: int) -> OwnerGroups:
    """Split WORLD into owners of `procs_per_owner` consecutive ranks. A collective: every rank calls it."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if procs_per_owner < 1 or world % procs_per_owner:
        raise ValueError(
            f"procs_per_owner = {procs_per_owner} does not divide the {world} processes into owners; "
            f"launch owners x procs_per_owner processes (e.g. torchrun --nproc_per_node={procs_per_owner} per owner)"
        )
    owner, _ = dist.new_subgroups(group_size=procs_per_owner)  # collective
    leaders_ranks = list(range(0, world, procs_per_owner))
    leaders = dist.new_group(ranks=leaders_ranks)  # collective: every rank calls it, members or not
    index = rank // procs_per_owner
    is_leader = rank in leaders_ranks
    return OwnerGroups(owner, leaders if is_leader else None, index, world // procs_per_owner, procs_per_owner,
                       leaders_ranks[index])  # fmt: skip


def average_gradients(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Data-parallel inside an owner: every process's gradients become their mean (one all_reduce).

    Every parameter that requires grad takes part, a missing gradient as zeros (a process whose share of a
    batch was empty): the processes must put the same layout into the all_reduce."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)  # collective over the owner's processes
    flat.div_(dist.get_world_size(group))
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


class HierarchicalUnifier:
    """Unify across owners that each run several processes: leaders unify, then hand the result on.

    Build it on every rank, after `same_start(model)` over all ranks. The processes of one owner must hold
    the same weights when `unify` is called (they do when they average gradients every step). `unify` is a
    collective over all ranks and returns the leaders' outcome on every rank, with the digest checked over
    every rank of every owner (`digests`: every rank's, rank order).
    """

    def __init__(self, model: nn.Module, groups: OwnerGroups, rule: str = "avg", **options: Any):
        self.groups = groups
        if groups.leaders is not None:
            self.unifier: Unifier | None = Unifier(model, rule, group=groups.leaders, **options)  # collective
            self.flat = self.unifier.flat
        else:  # the same layout as the leader's (same model): the hand-over is one broadcast of the buffer
            self.unifier = None
            self.flat = FlatState(model, tail=tail_size(groups.owners, model))

    @classmethod
    def over(cls, flat: FlatState, cfg: UnifyConfig, groups: OwnerGroups) -> "HierarchicalUnifier":
        """Over an existing FlatState (laid out with tail_size(groups.owners)) whose ranks already hold the same
        weights (the program's round loop): no check, no collective. The leaders' Unifier takes `cfg`."""
        self = cls.__new__(cls)
        self.groups, self.flat = groups, flat
        self.unifier = Unifier.over(flat, cfg, group=groups.leaders) if groups.leaders is not None else None
        return self

    @property
    def owner_steps(self) -> list[Any]:
        """The leader's owner-side steps (clipping, DP noise): an owner releases its update once, from its leader."""
        return self.unifier.owner_steps if self.unifier is not None else []

    def unify(self, weight: float = 1.0, *, verify: bool = True, **kwargs: Any) -> UnifyOutcome:
        """Leaders unify across owners; each owner's processes take their leader's result. A collective.

        kwargs go to the leaders' Unifier.unify (rule, commit, steps). The hand-over carries every tensor the
        leader's unify may change (the float, narrow and integer buffers) and the tensors each owner keeps
        local: an owner's processes leave the call with their leader's bits, local ones included."""
        mine = None
        if self.unifier is not None:
            mine = self.unifier.unify(weight, verify=False, **kwargs)  # collective over the leaders
        src, owner = self.groups.leader, self.groups.owner
        for t in (self.flat.values, *self.flat.narrow.values(), self.flat.ints):
            dist.broadcast(t, src=src, group=owner)  # collective over the owner's processes
        self.flat.push_ints()  # the leader's integer buffers (int32, ...) into this process's tensors
        for name in self.flat.roles.names(LOCAL):
            dist.broadcast(self.flat.roles.tensors[name].data, src=src, group=owner)  # collective
        # the leader's outcome as JSON (never a pickle); the leader is rank 0 of its owner group
        text = json.dumps(dataclasses.asdict(mine)).encode() if mine is not None else None
        outcome = _outcome(broadcast_bytes(text, 0, owner, limit=1 << 20, what="a unify outcome"))  # collective
        if not verify:
            return outcome
        digests = verify_identical(self.flat)  # collective over every rank of every owner
        return replace(outcome, digest=digests[0], digests=digests)

    def state_dict(self) -> dict[str, Any]:
        return self.unifier.state_dict() if self.unifier is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.unifier is not None:
            self.unifier.load_state_dict(state)


def _outcome(raw: bytes) -> UnifyOutcome:
    """The leader's UnifyOutcome from its JSON, every field checked for its type."""
    try:
        fields = json.loads(raw.decode())
        outcome = UnifyOutcome(**fields)
        ok = (isinstance(outcome.rule, str) and isinstance(outcome.skipped, list)
              and all(isinstance(r, int) for r in outcome.skipped) and isinstance(outcome.seconds, (int, float))
              and isinstance(outcome.bytes_sent, int))  # fmt: skip
    except (UnicodeDecodeError, ValueError, TypeError):
        ok = False
    if not ok:
        raise WireError("the owner leader's unify outcome does not parse; a process is broken or the bytes were changed on the way")
    return outcome
