"""FedNova's normalisation (Wang et al., 2020) as pure maths: owners that took more local steps do not pull harder.

With plain averaging an owner that trained 3x the steps contributes an update about 3x as long, and the
unified model drifts towards its optimum. FedNova averages each owner's update per step instead, then
scales the result back to the length of a typical round:

    unified update = (sum_i p_i * update_i / steps_i) * (sum_i p_i * steps_i)

where p_i are the rule's weights, normalised to sum to 1 (avg: 1/owners; weighted_avg: n_i / sum n). With
equal step counts it is the rule itself. unify_dist.unifier runs it around the rule's sum collective: each
owner divides its own update (before anything leaves the rank), the collective sums, and every rank
multiplies by the same mean step count (`mean_steps`, from every owner's agreed counts).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mean_steps", "fednova"]


def mean_steps(steps: Tensor, weights: Tensor) -> float:
    """sum_i p_i steps_i with p = weights / sum(weights), in float64 (owners' counts, rank order)."""
    w = weights.to(torch.float64)
    return float((w * steps.to(torch.float64)).sum() / w.sum())


def fednova(stacked: Tensor, weights: Tensor, steps: Tensor) -> Tensor:
    """The unified update of owners' updates stacked on dim 0, their rule weights and local step counts."""
    p = (weights.to(torch.float64) / weights.to(torch.float64).sum()).to(stacked.dtype)
    shape = (-1, *([1] * (stacked.dim() - 1)))
    per_step = stacked / steps.to(stacked.dtype).view(shape)
    return (per_step * p.view(shape)).sum(0) * mean_steps(steps, weights)
