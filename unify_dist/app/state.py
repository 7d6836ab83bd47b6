"""Everything of one owner that lives across rounds, as one Stateful object: a checkpoint is its state_dict().

torchtitan's CheckpointManager takes a dict of Stateful objects; here it is the model, the local optimizer,
the Unifier (anchor, momentum, privacy spent), SCAFFOLD's control variates, the torch RNG and the records
of the rounds so far. Data order and learning rate are pure functions of (seed, round, owner): nothing
to store.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from unify_dist.app.config import RunConfig
from unify_dist.scaffold import Scaffold
from unify_dist.train import make_optimizer
from unify_dist.unifier import Unifier

__all__ = ["TrainState"]


class TrainState:
    """One owner's model, optimizer, unifier, control variates and per-round records."""

    def __init__(self, cfg: RunConfig, model: nn.Module, unifier: Unifier):
        self.cfg, self.model, self.unifier = cfg, model, unifier
        self.optimizer = make_optimizer(model, cfg.train)
        self.scaffold = Scaffold(model) if cfg.train.scaffold else None
        self.records: list[dict[str, Any]] = []

    def reset_optimizer(self) -> None:
        """train.optimizer_state = reset: a fresh optimizer after every unify."""
        self.optimizer = make_optimizer(self.model, self.cfg.train)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "unifier": self.unifier.state_dict(),
            "scaffold": self.scaffold.state_dict() if self.scaffold is not None else {},
            "rng": {"torch": torch.get_rng_state()},
            "metrics": self.records,
            "config": self.cfg.to_dict(),
        }

    def load_own_state(self, state: dict[str, Any] | None) -> None:
        """Only what is this owner's own (optimizer, control variates, RNG) from an older checkpoint, for an
        owner that comes back after rounds it missed; None (a new owner): fresh optimizer, nothing else."""
        if state is None:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaffold is not None and state.get("scaffold"):
            self.scaffold.load_state_dict(state["scaffold"])
        torch.set_rng_state(state["rng"]["torch"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """In place: the model's tensors stay the Unifier's flat views."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.unifier.load_state_dict(state.get("unifier", {}))  # after the model: a missing anchor takes it
        if self.scaffold is not None and state.get("scaffold"):
            self.scaffold.load_state_dict(state["scaffold"])
        torch.set_rng_state(state["rng"]["torch"])
        self.records[:] = state["metrics"]
