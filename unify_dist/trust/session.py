"""Joining a run with trust on: load this owner's identity and the roster, pass admission, get the ring.

The one place the program calls (unify_dist.app.loop): a file problem on any owner stops every owner
with that owner's words (an agreement, so nobody waits in admission until the timeout), and admission
itself stops every honest owner with the slot and the reason.
"""

from __future__ import annotations

import hashlib

import torch.distributed as dist

from unify_dist.distributed import Context, agree, stage
from unify_dist.errors import UserError
from unify_dist.trust.admission import Admission, admit
from unify_dist.trust.identity import load_private_key, load_roster
from unify_dist.trust.ring import SealedRing

__all__ = ["join", "describe"]


def join(roster: str, key: str, owner: str, run_id: str, ctx: Context, group: dist.ProcessGroup | None = None) -> SealedRing:
    """Admission for this rank (a collective), then the sealed reducer every unify goes through.

    '{rank}' in `key` and `owner` becomes this rank (several owners on one machine, one config).
    """
    key, owner = key.replace("{rank}", str(ctx.rank)), owner.replace("{rank}", str(ctx.rank))
    identity, members, error = None, None, None
    try:
        identity, members = load_private_key(key), load_roster(roster)
    except UserError as e:
        error = str(e)
    with stage("trust key and roster check", ctx):
        agree(error, ctx, "loading the trust key and roster")  # collective: flags only
    with stage("admission", ctx):
        admission = admit(identity, owner, members, run_id, group)  # collective: public values and signatures
    return SealedRing(admission, group)


def describe(admission: Admission) -> str:
    """The start-up line of a run with trust on."""
    session = hashlib.sha256(admission.transcript_hash).hexdigest()[:12]
    slots = ", ".join(f"{slot}={name}" for slot, name in enumerate(admission.owners))
    return (f"trust: on: admitted roster owners {slots} (session {session}); every message after admission is sealed "
            "(AES-256-GCM, keys from X25519 per pair and direction)")  # fmt: skip
