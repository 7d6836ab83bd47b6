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


def own_name(cfg: TrainConfig, ctx: Context, roster_name: str = "") -> str:
    """This owner's name: UNIFY_DIST_OWNER, else its name in the trust roster (trust on), else
    train.owners[rank] on a fixed group, else rank{R}."""
    env = os.environ.get(OWNER_ENV, "").strip()
    if roster_name and env and env != roster_name:  # trust on: the admitted identity is the name
        raise UserError(f"{OWNER_ENV}={env} but trust.owner is '{roster_name}'; an owner has one name: unset one")
    name = roster_name or env
    if name:
        return name
    if not cfg.owners:
        return f"rank{ctx.rank}"
    if os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0":
        raise UserError(
            f"train.owners names the owners, but this process has no name: set {OWNER_ENV} to one of "
            f"{', '.join(cfg.owners)} for each owner (under elastic torchrun a rank says nothing about who it is)"
        )
    if len(cfg.owners) != ctx.world_size:
        raise UserError(
            f"train.owners lists {len(cfg.owners)} owners but {ctx.world_size} are here, and {OWNER_ENV} is not set; "
            f"set {OWNER_ENV} to this owner's name (one of {', '.join(cfg.owners)})"
        )
    return cfg.owners[ctx.rank]


def agree_on_owners(
    cfg: TrainConfig, ctx: Context, say: Callable[[str], None], roster_name: str = "", sleep=time.sleep, reducer=None
) -> Membership:
    """Every rank's name, gathered and checked; too few owners waits, then stops. A collective.

    The same UserError is raised on every rank (they all see the same gathered names). The names travel
    as UTF-8 JSON (never a pickle), through `reducer` when given (trust on: sealed).
    """
    mine = own_name(cfg, ctx, roster_name)
    present = gather_json(mine, reducer=reducer, limit=4096, what="an owner's name")  # collective
    if not all(isinstance(n, str) for n in present):
        odd = next(r for r, n in enumerate(present) if not isinstance(n, str))
        raise WireError(f"rank {odd} sent {str(present[odd])[:40]!r} where its owner name belongs; a peer is broken "
                        "or the bytes were changed on the way")  # fmt: skip
    names = list(present)
    roster = list(cfg.owners) or names
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        ranks = {n: [r for r, m in enumerate(names) if m == n] for n in twice}
        raise UserError(f"owner name(s) used twice: {ranks}; give every owner its own {OWNER_ENV}")
    unknown = [n for n in names if n not in roster]
    if unknown:
        raise UserError(f"owner(s) {unknown} are not in train.owners ({', '.join(roster)}); add them there or fix {OWNER_ENV}")
    if ctx.world_size < cfg.min_owners:
        say(f"only {ctx.world_size} of train.min_owners = {cfg.min_owners} owners are here ({', '.join(names)}); "
            f"waiting up to {cfg.owner_wait_s:g} s for more")  # fmt: skip
        sleep(cfg.owner_wait_s)  # an owner that arrives meanwhile makes torchrun restart this group, bigger
        raise UserError(
            f"only {ctx.world_size} owner(s) ({', '.join(names)}) joined within {cfg.owner_wait_s:g} s but "
            f"train.min_owners = {cfg.min_owners}; start the missing owners' agents, or lower train.min_owners"
        )
    return Membership(mine, names, roster)
