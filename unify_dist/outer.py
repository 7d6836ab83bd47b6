"""The outer optimizer: every owner applies the same optimizer step to the round's pseudo-gradient.

DiLoCo (Douillard et al., 2023) reads `anchor - unified` (the previous unified state minus this round's
unified state) as a gradient and feeds it to an outer optimizer, SGD with Nesterov momentum (lr 0.7,
momentum 0.9). Here there is no server: every owner holds the same anchor and the same unified state, so
every owner runs the same arithmetic on identical tensors and ends with the same bits.

Sign: the code works on the unified update u = unified - anchor, which is exactly minus the
pseudo-gradient (IEEE negation is exact, and so is the rounding of the negated operations), and keeps the
momentum in u's sign. So m = beta m + u and anchor + lr m are torch.optim.SGD's buf = beta buf + g and
anchor - lr buf with every sign flipped: the same bits. In u's sign, plain momentum ("sgd") is FedAvgM's
server momentum (unify.server_momentum / server_lr, now names for outer = "sgd"): one code path, and
checkpoints written before this module ("momentum", FedAvgM's sign) load unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["OUTER_OPTIMIZERS", "outer_step", "OuterOptimizer"]

OUTER_OPTIMIZERS = ("none", "sgd", "nesterov")
"""unify.outer: none (unified = the rule's result), sgd (heavy-ball momentum), nesterov (DiLoCo's)."""


def outer_step(
    update: Tensor, momentum: Tensor | None, lr: float, beta: float, nesterov: bool
) -> tuple[Tensor, Tensor | None]:
    """One outer step on the round's unified update u = unified - anchor; returns (step, new momentum).

    The new unified state is anchor + step. With momentum (beta > 0): m = beta m + u, and step = lr m
    (sgd) or lr (u + beta m) (nesterov, as torch.optim.SGD(nesterov=True)). With beta = 0 there is no
    momentum (None in, None out) and step = lr u.
    """
    if momentum is None or beta == 0:
        return update * lr, momentum
    m = momentum * beta + update
    direction = update + m * beta if nesterov else m
    return direction * lr, m


class OuterOptimizer:
    """The outer optimizer as a unified step (unify_dist.wrappers.UnifiedStep): identical on every rank.

    Its momentum lives across rounds: `state_dict()` holds it for checkpoints (key "momentum", kept from
    FedAvgM's server momentum, which is this with nesterov off).
    """

    def __init__(self, kind: str, lr: float, beta: float, like: Tensor):
        self.kind, self.lr, self.beta = kind, lr, beta
        self.momentum: Tensor | None = torch.zeros_like(like) if beta > 0 else None

    def __call__(self, update: Tensor, commit: bool) -> None:
        step, momentum = outer_step(update, self.momentum, self.lr, self.beta, self.kind == "nesterov")
        update.copy_(step)
        if commit:  # a side-by-side candidate leaves the momentum as it was
            self.momentum = momentum

    def state_dict(self) -> dict[str, Any]:
        return {} if self.momentum is None else {"momentum": self.momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A state without momentum (a checkpoint of a run without an outer optimizer) starts from zero."""
        if self.momentum is not None:
            if "momentum" in state:
                self.momentum.copy_(state["momentum"])
            else:
                self.momentum.zero_()
