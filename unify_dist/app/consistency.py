"""Before any training, owners compare what must agree between them, and refuse to start if it doesn't."""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from unify_dist import __version__
from unify_dist.app.config import RunConfig
from unify_dist.errors import UserError
from unify_dist.unifier import structure, structure_difference
from unify_dist.wire import WireError, gather_json

__all__ = ["fingerprint", "check_consistency", "difference", "shared_config", "LOCAL_KEYS"]

ARCHITECTURE = "model architecture"

LOCAL_KEYS = frozenset({
    "output", "dist", "trust", "imports",  # where this owner writes, how it joins, its own key and paths
    "data.root", "data.download", "data.folder", "data.workers", "data.pin_memory",  # where its data lies, how it is read
    "train.threads", "train.owner_wait_s",  # this machine's cores, this owner's patience
})  # fmt: skip
"""Config keys (sections, or section.key) that are each owner's own: left out of `shared_config`."""


def shared_config(cfg: RunConfig) -> str:
    """The config every owner must share, as canonical JSON: every section and key but LOCAL_KEYS.

    Admission binds its hash (unify_dist.trust.admission), so owners whose run directories, data roots or
    key files differ are admitted, and owners who would train something else are named before any
    signature is checked.
    """
    shared = {}
    for section, value in cfg.to_dict().items():
        if section in LOCAL_KEYS:
            continue
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if f"{section}.{k}" not in LOCAL_KEYS}
        shared[section] = value
    return json.dumps(shared, sort_keys=True, separators=(",", ":"))


def fingerprint(cfg: RunConfig, model: nn.Module, classes: list[str]) -> dict[str, Any]:
    """Everything two owners must share for unify to mean anything."""
    return {
        "package version": __version__,
        ARCHITECTURE: structure(model),
        "unify.rule": cfg.unify.rule,
        "unify.compare": list(cfg.unify.compare),
        # these two change which collectives a round runs: owners that differ would wait on each other forever
        "unify.overlap": cfg.unify.overlap,
        "unify.overlap_fragments": cfg.unify.overlap_fragments,
        "train.max_rounds": cfg.train.max_rounds,
        "train.local_epochs": cfg.train.local_epochs,
        "train.seed": cfg.train.seed,
        "data.dataset": cfg.data.dataset,
        "data.partition": cfg.data.partition,
        "class names": classes,
    }


def check_consistency(mine: dict[str, Any], world_size: int, reducer=None) -> None:
    """Gather every owner's fingerprint; raise a UserError naming each differing field and its ranks.

    A collective (the fingerprints cross as UTF-8 JSON, never a pickle; through `reducer` when given,
    with trust on sealed): every rank calls it, and every rank raises the same error.
    """
    everyone = gather_json(mine, reducer=reducer, what="a consistency fingerprint")  # collective
    odd = [r for r, fp in enumerate(everyone) if not isinstance(fp, dict)]
    if odd:
        raise WireError(f"rank {odd[0]} sent no fingerprint table; a peer is broken or the bytes were changed on the way")
    problems = []
    for key in mine:
        values = [fp.get(key, "<missing>") for fp in everyone]  # decoded JSON on every rank, this one's too
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            problems.append(f"'{key}' differs: {difference(key, values[0], values[odd[0]], odd)}")
    if problems:
        raise UserError("owners disagree before training: " + "; ".join(problems) + "; give every owner the same setting")


def difference(key: str, first: Any, other: Any, odd: list[int]) -> str:
    """Rank 0's value against the first differing rank's, in words; for long lists, only what differs.

    Ten class names that differ in one folder are named by that folder ('T-shirt_top' against 'tshirt'),
    an architecture by its first differing layer, so the user sees what to fix without diffing by hand.
    """
    if key == ARCHITECTURE:
        return structure_difference(first, other, odd[0]) + f" (rank(s) {odd} differ from rank 0)"
    plain = f"rank 0 has {_short(first)}, rank(s) {odd} have {_short(other)}"
    if not (isinstance(first, list) and isinstance(other, list)) or len(plain) <= 160:
        return plain
    only_first = [x for x in first if x not in other]
    only_other = [x for x in other if x not in first]
    if not (only_first or only_other):
        return f"rank 0 and rank(s) {odd} list the same {len(first)} entries in another order"
    return (f"rank 0 lists {len(first)} entries, rank(s) {odd} {len(other)}; only rank 0 has {_few(only_first)}, "
            f"only rank {odd[0]} has {_few(only_other)}")  # fmt: skip


def _few(items: list[Any]) -> str:
    shown = ", ".join(_short(x) for x in items[:3])
    return f"[{shown}{f', and {len(items) - 3} more' if len(items) > 3 else ''}]"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
