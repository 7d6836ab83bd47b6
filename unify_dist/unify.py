"""The collective layer: turn every owner's FlatState into the same unified state, in place.

Fast paths use one all_reduce over the flat buffer:
  avg / weighted_avg  SUM of (weight * x), then divide by the summed weight;
  max                 MAX of x;
  absmax (reduce)     MAX of [x, -x] gives max and -min at once; per element pick max if
                      max >= -min else min (the reference's tie rule, bit for bit).
Any other registered rule (and absmax with absmax_impl = "gather") gathers the owners' values chunk
by chunk and applies the pure reference from unify_dist.rules: extra memory owners x chunk_elements.

Non-finite weights are caught before anything is combined. Each owner checks its own values; a sick
owner contributes the rule's neutral element (0 with weight 0 for sums, -inf for MAX: never a zero,
which would corrupt max) and raises its flag in the buffer's tail, which rides in the same collective.
So the health check costs no extra round trip, and with nonfinite = "skip" the round's result is
exactly the rule over the healthy owners.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from unify_dist.config import UnifyConfig
from unify_dist.flat import FlatState
from unify_dist.rules import RULES

__all__ = ["Unifier", "UnifyOutcome", "NonFiniteError", "DivergenceError", "tail_size", "verify_identical"]

REDUCE_RULES = ("avg", "weighted_avg", "max", "absmax")


class NonFiniteError(RuntimeError):
    """An owner's weights hold NaN or Inf and the policy is `fail`."""


class DivergenceError(RuntimeError):
    """Ranks hold different unified weights after a unify: a bug or a corrupt link, never ignored."""


def tail_size(world_size: int) -> int:
    """Tail elements FlatState must reserve: one flag per owner, then the summed weight."""
    return world_size + 1


@dataclass(frozen=True)
class UnifyOutcome:
    skipped: list[int]
    """Owners left out of this unify because their weights were not finite (policy skip)."""


class Unifier:
    """Runs unify rules over one FlatState; holds the scratch buffers so rounds do not reallocate."""

    def __init__(self, flat: FlatState, cfg: UnifyConfig, group: dist.ProcessGroup | None = None):
        self.flat, self.cfg, self.group = flat, cfg, group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if flat.tail.numel() < tail_size(self.world):
            raise ValueError(f"FlatState tail holds {flat.tail.numel()} elements, need {tail_size(self.world)}")
        self._scratch: Tensor | None = None  # absmax's [x, -x] buffer, made on first use

    def unify_(self, rule: str, weight: float = 1.0) -> UnifyOutcome:
        """Replace this owner's state with the unified state of all owners (a collective: every rank calls it)."""
        if rule not in RULES:
            raise ValueError(f"unknown unify rule '{rule}'; known: {', '.join(RULES)}")
        sick_tensor = self._find_nonfinite()
        if sick_tensor is not None and self.cfg.nonfinite == "fail":
            sick_msg = f"owner {self.rank} has non-finite weights in '{sick_tensor}'"
        else:
            sick_msg = None
        if rule in ("avg", "weighted_avg"):
            flags = self._sum(weight if rule == "weighted_avg" else 1.0, sick_tensor is not None)
        elif rule == "max":
            flags = self._max(sick_tensor is not None)
        elif rule == "absmax" and self.cfg.absmax_impl == "reduce":
            flags = self._absmax(sick_tensor is not None)
        else:
            flags = self._gather(RULES[rule], weight, sick_tensor is not None)
        if self.flat.ints.numel():
            dist.all_reduce(self.flat.ints, dist.ReduceOp.MAX, group=self.group)  # counters: the furthest owner
        sick = [r for r in range(self.world) if flags[r] > 0]
        if sick and self.cfg.nonfinite == "fail":
            raise NonFiniteError(
                (sick_msg or f"owner(s) {sick} have non-finite (NaN/Inf) weights")
                + " before unify; lower the learning rate, or set unify.nonfinite=skip to leave such owners out"
            )
        if len(sick) == self.world:
            raise NonFiniteError("every owner has non-finite weights: there is nothing left to unify")
        return UnifyOutcome(skipped=sick)

    def _find_nonfinite(self) -> str | None:
        values = self.flat.values
        # One reduction instead of a full isfinite mask: NaN/Inf anywhere makes the sum non-finite.
        if torch.isfinite(values.sum()):  # host sync
            return None
        bad = (~torch.isfinite(values)).nonzero()
        return self.flat.slot_of(int(bad[0])) if bad.numel() else None  # empty: the sum merely overflowed

    def _reset_tail(self, tail: Tensor, sick: bool) -> None:
        tail.zero_()
        if sick:
            tail[self.rank] = 1.0

    def _sum(self, weight: float, sick: bool) -> list[float]:
        values, tail = self.flat.values, self.flat.tail
        self._reset_tail(tail, sick)
        if sick:
            values.zero_()
        else:
            if weight != 1.0:
                values.mul_(weight)
            tail[self.world] = weight
        dist.all_reduce(self.flat.buffer, dist.ReduceOp.SUM, group=self.group)
        flags = tail.tolist()  # host sync: the divisor is the healthy owners' total weight
        values.div_(flags[self.world])
        return flags

    def _max(self, sick: bool) -> list[float]:
        values, tail = self.flat.values, self.flat.tail
        self._reset_tail(tail, sick)
        if sick:
            values.fill_(float("-inf"))
        dist.all_reduce(self.flat.buffer, dist.ReduceOp.MAX, group=self.group)
        return tail.tolist()

    def _absmax(self, sick: bool) -> list[float]:
        n, values = self.flat.numel, self.flat.values
        if self._scratch is None:
            self._scratch = torch.empty(2 * n + self.world, dtype=values.dtype, device=values.device)
        scratch = self._scratch
        hi, neg_lo, tail = scratch[:n], scratch[n : 2 * n], scratch[2 * n :]
        self._reset_tail(tail, sick)
        if sick:
            scratch[: 2 * n].fill_(float("-inf"))
        else:
            hi.copy_(values)
            torch.neg(values, out=neg_lo)
        dist.all_reduce(scratch, dist.ReduceOp.MAX, group=self.group)  # hi = max x, neg_lo = -min x
        keep_hi = hi >= neg_lo
        torch.where(keep_hi, hi, neg_lo.neg_(), out=values)
        return tail.tolist()

    def _gather(self, fn, weight: float, sick: bool) -> list[float]:
        values = self.flat.values
        n, chunk = values.numel(), min(self.cfg.chunk_elements, max(values.numel(), 1))
        info = torch.tensor([1.0 if sick else 0.0, weight], dtype=torch.float64, device=values.device)
        infos = [torch.empty_like(info) for _ in range(self.world)]
        dist.all_gather(infos, info, group=self.group)
        flags = [float(i[0]) for i in infos]
        healthy = [r for r in range(self.world) if not flags[r]]
        if not healthy:
            return flags
        weights = torch.tensor([float(infos[r][1]) for r in healthy], dtype=torch.float64, device=values.device)
        rows = torch.empty(self.world, chunk, dtype=values.dtype, device=values.device)
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            parts = [rows[r, : end - start] for r in range(self.world)]
            dist.all_gather(parts, values[start:end], group=self.group)
            stacked = rows[:, : end - start] if len(healthy) == self.world else rows[healthy, : end - start]
            values[start:end] = fn(stacked, weights)
        return flags


def verify_identical(flat: FlatState, group: dist.ProcessGroup | None = None) -> list[str]:
    """Digest this rank's state, gather every rank's digest, raise DivergenceError naming the odd ranks.

    Returns every rank's digest (all equal), for the record. A collective: every rank calls it.
    """
    digest = flat.digest()
    value = int(digest, 16)
    mine = torch.tensor([value - (1 << 64) if value >= 1 << 63 else value], dtype=torch.int64)
    if flat.values.is_cuda:
        mine = mine.to(flat.values.device)  # NCCL gathers device tensors only
    world = dist.get_world_size(group)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    digests = [f"{int(t) & ((1 << 64) - 1):016x}" for t in out]
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise DivergenceError(
            f"ranks {differ} hold different weights than rank 0 after unify (digests {digests}); "
            "every rank must end a round with identical weights, so the run stops here"
        )
    return digests
