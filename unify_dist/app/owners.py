"""Owners by name, not by rank: who is here this time, and which share of the data is whose.

torchrun's elastic mode (`--nnodes=MIN:MAX`) restarts every worker when an owner leaves or joins, with new
RANK and WORLD_SIZE values: a rank says nothing about who an owner is. So each owner carries a stable name
(the environment variable UNIFY_DIST_OWNER, else its name in the trust roster when trust is on, else its
place in `train.owners` on a fixed group, else "rank{R}" when no names are configured), and everything an owner keeps is keyed by it: its data share (its
index in `train.owners`), its checkpoints, its columns in the round records.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from unify_dist.config import TrainConfig
from unify_dist.distributed import Context
from unify_dist.errors import UserError
from unify_dist.wire import WireError, gather_json

__all__ = ["OWNER_ENV", "Membership", "agree_on_owners"]

OWNER_ENV = "UNIFY_DIST_OWNER"
"""The environment variable that names this owner (one name from train.owners)."""


@dataclass(frozen=True)
class Membership:
    """The owners present in this group (by rank), and this owner's place among all of them."""

    name: str
    """This owner's name."""
    present: list[str]
    """The names of the owners in this group, in rank order (the same list on every rank)."""
    roster: list[str]
    """Every owner of the project in a fixed order (train.owners, or the present ranks' names)."""

    @property
    def index(self) -> int:
        """This owner's place in the roster: the built-in partitions cut its share by it."""
        return self.roster.index(self.name)


def own_name(cfg: TrainConfig, ctx: Context, roster_name: str = "", procs: int = 1) -> str:
    """This owner's name: UNIFY_DIST_OWNER, else its name in the trust roster (trust on), else
    train.owners[R] on a fixed group, else rank{R}; R is the owner's rank among the owners (the process's
    rank // procs: an owner of `procs` processes is that many consecutive ranks)."""
    env = os.environ.get(OWNER_ENV, "").strip()
    if roster_name and env and env != roster_name:  # trust on: the admitted identity is the name
        raise UserError(f"{OWNER_ENV}={env} but trust.owner is '{roster_name}'; an owner has one name: unset one")
    name = roster_name or env
    if name:
        return name
    rank, owners = ctx.rank // procs, ctx.world_size // procs
    if not cfg.owners:
        return f"rank{rank}"
    if os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0":
        raise UserError(
            f"train.owners names the owners, but this process has no name: set {OWNER_ENV} to one of "
            f"{', '.join(cfg.owners)} for each owner (under elastic torchrun a rank says nothing about who it is)"
        )
    if len(cfg.owners) != owners:
        raise UserError(
            f"train.owners lists {len(cfg.owners)} owners but {owners} are here, and {OWNER_ENV} is not set; "
            f"set {OWNER_ENV} to this owner's name (one of {', '.join(cfg.owners)})"
        )
    return cfg.owners[rank]


def agree_on_owners(
    cfg: TrainConfig, ctx: Context, say: Callable[[str], None], roster_name: str = "", sleep=time.sleep, reducer=None,
    procs: int = 1,
) -> Membership:
    """Every rank's name, gathered and checked; too few owners waits, then stops. A collective.

    The same UserError is raised on every rank (they all see the same gathered names). The names travel
    as UTF-8 JSON (never a pickle), through `reducer` when given (trust on: sealed). With owners of `procs`
    processes (consecutive ranks), an owner's processes must carry its one name, and the names are the owners'.
    """
    mine = own_name(cfg, ctx, roster_name, procs)
    present = gather_json(mine, reducer=reducer, limit=4096, what="an owner's name")  # collective
    if not all(isinstance(n, str) for n in present):
        odd = next(r for r, n in enumerate(present) if not isinstance(n, str))
        raise WireError(f"rank {odd} sent {str(present[odd])[:40]!r} where its owner name belongs; a peer is broken "
                        "or the bytes were changed on the way")  # fmt: skip
    names = _owners_names(list(present), procs)
    roster = list(cfg.owners) or names
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        ranks = {n: [r for r, m in enumerate(names) if m == n] for n in twice}
        raise UserError(f"owner name(s) used twice: {ranks}; give every owner its own {OWNER_ENV}")
    unknown = [n for n in names if n not in roster]
    if unknown:
        raise UserError(f"owner(s) {unknown} are not in train.owners ({', '.join(roster)}); add them there or fix {OWNER_ENV}")
    if len(names) < cfg.min_owners:
        say(f"only {len(names)} of train.min_owners = {cfg.min_owners} owners are here ({', '.join(names)}); "
            f"waiting up to {cfg.owner_wait_s:g} s for more")  # fmt: skip
        sleep(cfg.owner_wait_s)  # an owner that arrives meanwhile makes torchrun restart this group, bigger
        raise UserError(
            f"only {len(names)} owner(s) ({', '.join(names)}) joined within {cfg.owner_wait_s:g} s but "
            f"train.min_owners = {cfg.min_owners}; start the missing owners' agents, or lower train.min_owners"
        )
    return Membership(mine, names, roster)


def _owners_names(by_rank: list[str], procs: int) -> list[str]:
    """Every rank's name -> the owners' names (rank order), each owner's `procs` processes carrying one name."""
    if procs == 1:
        return by_rank
    owners = [by_rank[i : i + procs] for i in range(0, len(by_rank), procs)]
    split = next(((o, names) for o, names in enumerate(owners) if len(set(names)) > 1), None)
    if split is not None:
        o, names = split
        raise UserError(f"ranks {o * procs}..{o * procs + procs - 1} are one owner (dist.procs_per_owner = {procs}) but "
                        f"carry the names {names}; start each owner's processes with one torchrun agent and one "
                        f"{OWNER_ENV}")  # fmt: skip
    return [names[0] for names in owners]
