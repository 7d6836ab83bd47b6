"""Before any training, owners compare what must agree between them, and refuse to start if it doesn't."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from unify_dist import __version__
from unify_dist.app.config import RunConfig
from unify_dist.errors import UserError

__all__ = ["fingerprint", "check_consistency"]


def fingerprint(cfg: RunConfig, model: nn.Module, classes: list[str]) -> dict[str, Any]:
    """Everything two owners must share for unify to mean anything."""
    return {
        "package version": __version__,
        "model architecture": [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in model.state_dict().items()],
        "unify.rule": cfg.unify.rule,
        "unify.compare": list(cfg.unify.compare),
        "train.max_rounds": cfg.train.max_rounds,
        "train.local_epochs": cfg.train.local_epochs,
        "train.seed": cfg.train.seed,
        "data.dataset": cfg.data.dataset,
        "data.partition": cfg.data.partition,
        "class names": classes,
    }


def check_consistency(mine: dict[str, Any], world_size: int) -> None:
    """Gather every owner's fingerprint; raise a UserError naming each differing field and its ranks.

    A collective (all_gather_object): every rank calls it, and every rank raises the same error.
    """
    everyone: list[dict[str, Any] | None] = [None] * world_size
    dist.all_gather_object(everyone, mine)
    problems = []
    for key in mine:
        values = [fp[key] for fp in everyone]  # type: ignore[index]
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            shown = values[odd[0]]
            if isinstance(shown, list) and len(shown) > 4:
                shown = f"a different list of {len(shown)} entries"
            problems.append(f"'{key}' differs: rank 0 has {_short(values[0])}, rank(s) {odd} have {_short(shown)}")
    if problems:
        raise UserError("owners disagree before training: " + "; ".join(problems) + "; give every owner the same setting")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
