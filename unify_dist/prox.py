"""FedProx's proximal term: a local loss that keeps an owner near the model it started the round from.

With non-IID owners (the paper's H-environment) local training drifts each owner towards its own
classes; mu/2 * ||w - w_start||^2 pulls back, so the unified model is an average of nearer neighbours.
The term is built once per round, from the unified weights every owner starts the round with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["proximal_term"]


def proximal_term(model: nn.Module, mu: float) -> Callable[[], Tensor] | None:
    """A closure returning mu/2 * sum over parameters of ||p - p_now||^2, with p_now snapshot here.

    Call it right after unify (before local training): the snapshot is then the unified model.
    Returns None when mu == 0, so train_epoch adds nothing and copies nothing.
    """
    if mu == 0:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]  # one copy of the parameters per round

    def term() -> Tensor:
        total = torch.zeros((), device=anchor[0].device if anchor else None)
        for p, a in zip(params, anchor):
            total = total + (p - a).pow(2).sum()
        return total * (mu / 2)

    return term
