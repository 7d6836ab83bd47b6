"""Owners of several processes in the program (dist.procs_per_owner = G): who is whose, and per-owner rows.

torchrun numbers ranks agent by agent, so with `--nproc_per_node=G` an owner is G consecutive ranks
(unify_dist.hierarchy.owner_groups). The program keeps every collective that checks or agrees (config,
start weights, roles, names, errors) over every process, and folds what it records to one row per owner:
the owner's first process (its leader) speaks for it, since every process of an owner holds the same
weights and the same data. With G = 1 nothing here makes a collective or changes a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch.distributed as dist

from unify_dist.config import DistConfig
from unify_dist.distributed import Context, agree, all_gather_floats, stage
from unify_dist.errors import UserError
from unify_dist.hierarchy import OwnerGroups, average_gradients, owner_groups

__all__ = ["Procs", "owner_layout"]

Row = TypeVar("Row")


@dataclass(frozen=True)
class Procs:
    """This process's place in its owner, and the owners' groups (None with one process per owner)."""

    per_owner: int
    """G: processes per owner."""
    owners: int
    """How many owners the group holds (WORLD_SIZE / G)."""
    owner: int
    """Which owner this process belongs to (0 .. owners - 1): its rank among the owners."""
    part: int
    """This process's place inside its owner (0 .. G - 1): which share of every batch it trains on."""
    groups: OwnerGroups | None = None

    @property
    def is_leader(self) -> bool:
        """The owner's first process: it unifies for the owner and writes the owner's checkpoints."""
        return self.part == 0

    def leaders(self, rows: list[Row]) -> list[Row]:
        """Per-process rows (rank order) -> one per owner, its leader's."""
        return rows[:: self.per_owner]

    def names_by_rank(self, owners: list[str]) -> list[str]:
        """Owner names (owner order) -> the owner's name for every rank, so a dead process is named by its owner."""
        return [name for name in owners for _ in range(self.per_owner)]

    def average_gradients(self, model) -> None:
        """The owner's processes' gradients become their mean (a collective inside the owner; nothing with G = 1)."""
        if self.groups is not None:
            average_gradients(model, self.groups.owner)


def owner_layout(cfg: DistConfig, ctx: Context, sealed: bool = False) -> Procs:
    """Check that the processes divide into owners of dist.procs_per_owner, then build the owners' groups.

    Collectives on every rank of a group of two or more, trust off (`sealed` False): first every process's
    G, since a process that counted differently would join other collectives than its peers; with G > 1 the
    division is agreed on (machines may differ in their process count, so one machine's refusal stops the
    others too, in the same words), then the groups are made. With trust on G is 1 (refused otherwise on
    load) and nothing crosses before admission.
    """
    g = cfg.procs_per_owner
    if ctx.world_size > 1 and not sealed:
        with stage("processes per owner", ctx):
            said = [int(v) for (v,) in all_gather_floats([float(g)], ctx)]  # collective
        if len(set(said)) > 1:
            by_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(said))
            raise UserError(f"dist.procs_per_owner differs between processes ({by_rank}); every owner must set the "
                            "same, and start that many processes")  # fmt: skip
    if g == 1:
        return Procs(1, ctx.world_size, ctx.rank, 0)
    error = None
    if ctx.world_size % g or ctx.local_world_size % g:
        error = (f"dist.procs_per_owner = {g} but {ctx.world_size} processes ({ctx.local_world_size} on this machine) "
                 f"do not divide into owners of {g}: start every owner with torchrun --nproc_per_node={g} (or a "
                 f"multiple of {g} per machine), or set dist.procs_per_owner to the processes per owner")  # fmt: skip
    agree(error, ctx, "dividing the processes into owners")  # collective: UserError on every rank, or none
    groups = owner_groups(g)  # collective: the owners' groups and the leaders' group
    assert groups.owner_index == ctx.rank // g and dist.get_rank(groups.owner) == ctx.rank % g
    return Procs(g, groups.owners, groups.owner_index, ctx.rank % g, groups)
