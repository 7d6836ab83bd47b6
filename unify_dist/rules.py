"""Unify rules as pure tensor functions: the maths, with no process group in sight.

A rule takes the owners' tensors stacked along dim 0 (shape [owners, ...]) and their weights (local
sample counts, shape [owners]) and returns the unified tensor. These functions are the reference: the
collective implementations in unify_dist.unify must agree with them (exactly for max and absmax,
allclose for the averages, whose summation order differs), and the tests prove it.

A rule registered here with no fast collective path still runs distributed: unify_dist.unify gathers
the owners' tensors chunk by chunk and calls the reference function on each chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["RULES", "Rule", "register_rule", "avg", "weighted_avg", "max_rule", "absmax"]

Rule = Callable[[Tensor, Tensor], Tensor]
"""(stacked [owners, ...], weights [owners]) -> unified [...]"""

RULES: dict[str, Rule] = {}


def register_rule(name: str) -> Callable[[Rule], Rule]:
    """Register a reference rule under `name`; a second rule with the same name is a bug, so it raises."""

    def wrap(fn: Rule) -> Rule:
        if name in RULES:
            raise ValueError(f"unify rule '{name}' is registered twice")
        RULES[name] = fn
        return fn

    return wrap


@register_rule("avg")
def avg(stacked: Tensor, weights: Tensor) -> Tensor:
    """Plain mean over owners (the paper's average); weights are ignored."""
    return stacked.sum(0) / stacked.shape[0]


@register_rule("weighted_avg")
def weighted_avg(stacked: Tensor, weights: Tensor) -> Tensor:
    """Mean weighted by each owner's local sample count (FedAvg's weighting)."""
    w = weights.to(stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    return (stacked * w).sum(0) / weights.sum().to(stacked.dtype)


@register_rule("max")
def max_rule(stacked: Tensor, weights: Tensor) -> Tensor:
    """Per element, the largest value over owners (the paper's max)."""
    return stacked.amax(0)


@register_rule("absmax")
def absmax(stacked: Tensor, weights: Tensor) -> Tensor:
    """Per element, the value of largest magnitude over owners, sign kept (the paper's absmax).

    Tie rule: when the largest magnitude is held by both a positive and a negative value (x and -x),
    the positive one wins. Written as max vs. -min so the all_reduce implementation (one MAX over
    [x, -x]) computes bit-for-bit the same thing.
    """
    hi = stacked.amax(0)
    lo = stacked.amin(0)
    return torch.where(hi >= -lo, hi, lo)
