"""The collective layer: turn every owner's FlatState into the same unified state, in place.

Fast paths use one all_reduce over the flat buffer:
  avg / weighted_avg  SUM of (weight * x), then divide by the summed weight;
  max                 MAX of x;
  absmax (reduce)     MAX of integer keys that order values by magnitude, then positive over
                      negative (rules.absmax_keys_): the reference's tie rule, bit for bit.
Any other registered rule (and absmax with absmax_impl = "gather") gathers the owners' values chunk
by chunk and applies the pure reference from unify_dist.rules: extra memory owners x chunk_elements.

Non-finite weights are caught before anything is combined. Each owner checks its own values; a sick
owner contributes the rule's neutral element (0 with weight 0 for sums, -inf for MAX: never a zero,
which would corrupt max; -0.0, the smallest key, for absmax) and raises its flag in the buffer's tail,
which rides in the same collective. So the health check costs no extra round trip, and with
nonfinite = "skip" the round's result is exactly the rule over the healthy owners.

Beyond the paper, around any rule (all off by default, and then the paths above run untouched):
  space = "delta"        each owner sends its update x - anchor, the rule combines updates and the
                         result is added back: unified = anchor + rule(x_i - anchor). The anchor is
                         the previous unified state, identical on every rank, so results stay identical.
  update_norm_bound      each owner clips its update to this L2 norm before the rule sees it.
  dp_noise_multiplier    and then adds Gaussian noise (std multiplier x bound) to it: differential privacy.
  server_momentum/_lr    every owner applies the same FedAvgM step to the round's unified update.
The anchor and momentum buffer are Unifier state: state_dict() / load_state_dict() carry them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from unify_dist.config import UnifyConfig
from unify_dist.flat import FlatState
from unify_dist.rules import (
    KEY_DTYPES, RULES, SPECS, RuleSpec, absmax_keys_, absmax_unkeys_, clip_factor, server_step,
)  # fmt: skip
from unify_dist.secure import FRACTION_BITS, exchange_pair_secrets, masked_contribution

__all__ = [
    "Unifier", "UnifyOutcome", "NonFiniteError", "DivergenceError",
    "tail_size", "verify_identical", "in_chunks", "key_chunk",
]  # fmt: skip

FAST_RULES = ("avg", "weighted_avg", "max", "absmax", "secure_avg")
"""Rules with a one-all_reduce path (absmax only with absmax_impl = "reduce"); the rest gather."""


def key_chunk(device: torch.device) -> int:
    """Elements per step of absmax's key transform: on a CPU 256 KiB of int32, so each step's passes stay
    in L2; elsewhere (GPUs) 64 MiB, since each op of a step is a kernel launch."""
    return 1 << 16 if device.type == "cpu" else 1 << 24


class NonFiniteError(RuntimeError):
    """An owner's weights hold NaN or Inf and the policy is `fail`."""


class DivergenceError(RuntimeError):
    """Ranks hold different unified weights after a unify: a bug or a corrupt link, never ignored."""


def tail_size(world_size: int, model: nn.Module | None = None) -> int:
    """Tail elements FlatState must reserve: one flag per owner, the summed weight, and (given the model)
    room for every owner's integer buffers, so the fast paths unify everything in one collective."""
    ints = 0 if model is None else sum(b.numel() for b in model.buffers() if not b.is_floating_point())
    return world_size + 1 + 2 * ints * world_size


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
        # absmax's one-all_reduce path needs integer keys as wide as the floats (float32/64); else gather
        self._absmax_reduce = cfg.absmax_impl == "reduce" and flat.buffer.dtype in KEY_DTYPES
        self._scratch: Tensor | None = None  # absmax's key-transform scratch, made on first use
        self._pair_secrets: dict[int, bytes] | None = None  # secure_avg: exchanged on first use
        self._secure_calls = 0  # secure_avg's mask nonce: equal on every rank, never reused with one secret
        # Integer buffers ride in the tail when it has room: one collective per unify instead of two.
        self._ints_in_tail = flat.ints.numel() > 0 and flat.tail.numel() >= tail_size(self.world) + 2 * flat.ints.numel() * self.world
        # Build the Unifier once every rank holds the same start weights (the loop: after the broadcast),
        # so the first anchor is identical everywhere. None when no option needs it: plain paths copy nothing.
        self._anchor: Tensor | None = flat.values.detach().clone() if _needs_anchor(cfg) else None
        self._momentum: Tensor | None = torch.zeros_like(flat.values) if cfg.server_momentum > 0 else None
        self._dp_generator: torch.Generator | None = None  # secret noise source, seeded on first use

    def state_dict(self) -> dict[str, Any]:
        """The anchor (previous unified state) and momentum buffer, when the options in use keep them."""
        state = {}
        if self._anchor is not None:
            state["anchor"] = self._anchor
        if self._momentum is not None:
            state["momentum"] = self._momentum
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict() in place. Call after the model is restored: a state without an anchor
        (a checkpoint from a run without these options) takes the current weights, which are the last
        unified state since checkpoints are written after unify; a missing momentum starts at zero."""
        if self._anchor is not None:
            self._anchor.copy_(state["anchor"] if "anchor" in state else self.flat.values)
        if self._momentum is not None:
            if "momentum" in state:
                self._momentum.copy_(state["momentum"])
            else:
                self._momentum.zero_()

    def unify_(self, rule: str, weight: float = 1.0, commit: bool = True) -> UnifyOutcome:
        """Replace this owner's state with the unified state of all owners (a collective: every rank calls it).

        commit = False leaves the anchor and momentum as they were: for side-by-side candidates, which
        are evaluated and then thrown away.
        """
        if rule not in RULES:
            raise ValueError(f"unknown unify rule '{rule}'; known: {', '.join(RULES)}")
        spec = SPECS[rule]
        if spec.delta_only and self._anchor is None:
            raise ValueError(f"unify rule '{rule}' works on updates: name it in cfg.rule or cfg.compare")
        delta = self._anchor is not None and (self.cfg.space == "delta" or spec.delta_only)
        sick_tensor = self._find_nonfinite()
        if sick_tensor is not None and self.cfg.nonfinite == "fail":
            sick_msg = f"owner {self.rank} has non-finite weights in '{sick_tensor}'"
        else:
            sick_msg = None
        if sick_tensor is None:
            self._prepare(spec, delta)
        rides_in_tail = rule in FAST_RULES and (rule != "absmax" or self._absmax_reduce)
        if rule in ("avg", "weighted_avg"):
            flags = self._sum(weight if rule == "weighted_avg" else 1.0, sick_tensor is not None)
        elif rule == "max":
            flags = self._max(sick_tensor is not None)
        elif rule == "absmax" and self._absmax_reduce:
            flags = self._absmax(sick_tensor is not None)
        elif rule == "secure_avg":
            flags = self._secure_sum(sick_tensor is not None)
        else:
            fn = spec.combine or partial(spec.reference, **self._options(spec))
            flags = self._gather(fn, weight, sick_tensor is not None)
        if self.flat.ints.numel() and not (self._ints_in_tail and rides_in_tail):
            dist.all_reduce(self.flat.ints, dist.ReduceOp.MAX, group=self.group)  # counters: the furthest owner
        sick = [r for r in range(self.world) if flags[r] > 0]
        if sick and self.cfg.nonfinite == "fail":
            raise NonFiniteError(
                (sick_msg or f"owner(s) {sick} have non-finite (NaN/Inf) weights")
                + " before unify; lower the learning rate, or set unify.nonfinite=skip to leave such owners out"
            )
        if len(sick) == self.world:
            raise NonFiniteError("every owner has non-finite weights: there is nothing left to unify")
        if self._anchor is not None:
            self._finish(delta, commit)
        return UnifyOutcome(skipped=sick)

    def _options(self, spec: RuleSpec) -> dict[str, Any]:
        return {name: getattr(self.cfg, name) for name in spec.options}

    def _prepare(self, spec: RuleSpec, delta: bool) -> None:
        """Local, before any collective: turn this owner's weights into its (clipped) update, and run the
        rule's per-owner step (ties' trim) on its whole vector."""
        values, bound = self.flat.values, self.cfg.update_norm_bound
        if delta or bound > 0:
            values.sub_(self._anchor)  # this owner's update since the last unified model
            factor = clip_factor(values, bound)
            if factor != 1.0:
                values.mul_(factor)
            if self.cfg.dp_noise_multiplier > 0:
                self._add_dp_noise(values)
            if not delta:
                values.add_(self._anchor)
        if spec.owner_step is not None:
            values.copy_(spec.owner_step(values, **self._options(spec)))

    def _add_dp_noise(self, update: Tensor) -> None:
        """Differential privacy: Gaussian noise of std dp_noise_multiplier x C on the clipped update.

        The noise is drawn from a secret seed (os entropy), never shared: a peer who could regenerate it
        could subtract it. So DP runs are not bit-reproducible across restarts; ranks still end identical,
        because the noise is added before anything leaves the rank.
        """
        if self._dp_generator is None:
            self._dp_generator = torch.Generator(device=update.device)
            self._dp_generator.manual_seed(secrets.randbits(63))
        std = self.cfg.dp_noise_multiplier * self.cfg.update_norm_bound
        noise = torch.empty_like(update).normal_(0.0, std, generator=self._dp_generator)
        update.add_(noise)

    def _finish(self, delta: bool, commit: bool) -> None:
        """Local, after the collective: back from update space, the server step, and the new anchor.

        Every rank runs the same arithmetic on identical tensors, so the weights stay bit-identical.
        """
        values, anchor, c = self.flat.values, self._anchor, self.cfg
        if c.server_momentum > 0 or c.server_lr != 1.0:
            if not delta:
                values.sub_(anchor)  # the round's unified update
            step, momentum = server_step(values, self._momentum, c.server_momentum, c.server_lr)
            values.copy_(step).add_(anchor)
            if commit:
                self._momentum = momentum
        elif delta:
            values.add_(anchor)
        if commit:
            anchor.copy_(values)

    def _find_nonfinite(self) -> str | None:
        values = self.flat.values
        # One reduction instead of a full isfinite mask: NaN/Inf anywhere makes the sum non-finite.
        if torch.isfinite(values.sum()):  # host sync
            return None
        bad = (~torch.isfinite(values)).nonzero()
        return self.flat.slot_of(int(bad[0])) if bad.numel() else None  # empty: the sum merely overflowed

    def _reset_tail(self, tail: Tensor, sick: bool, neutral: float = 0.0) -> None:
        """Flags to zero (this owner's to 1 if sick); integer buffers into this owner's row of the tail.

        Integers travel as two float halves (value >> 24, value & 0xFFFFFF), each exact in float32;
        the other owners' rows hold the collective's neutral element (0 for SUM, -inf for MAX).
        """
        tail.zero_()
        if sick:
            tail[self.rank] = 1.0
        if self._ints_in_tail:
            k, first = self.flat.ints.numel(), self.world + 1
            rows = tail[first : first + 2 * k * self.world].view(self.world, 2, k)
            rows.fill_(neutral)
            rows[self.rank, 0] = self.flat.ints >> 24
            rows[self.rank, 1] = self.flat.ints & 0xFFFFFF

    def _unpack_ints(self, tail: Tensor) -> None:
        """After the collective: each integer buffer takes the largest value over owners (the furthest counter)."""
        if not self._ints_in_tail:
            return
        k, first = self.flat.ints.numel(), self.world + 1
        rows = tail[first : first + 2 * k * self.world].view(self.world, 2, k).to(torch.int64)
        self.flat.ints.copy_((rows[:, 0] * (1 << 24) + rows[:, 1]).amax(0))

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
        flags = tail[: self.world + 1].tolist()  # host sync: the divisor is the healthy owners' total weight
        # times the reciprocal: twice as fast as a division here, within one rounding of it (exact for 2, 4, ...
        # owners), and every rank does the same arithmetic, so the weights stay bit-identical
        if flags[self.world] > 0:  # 0: every owner is sick, and unify_ raises
            values.mul_(1.0 / flags[self.world])
        self._unpack_ints(tail)
        return flags

    def _secure_sum(self, sick: bool) -> list[float]:
        """Mean over healthy owners from masked int64 fixed-point contributions: one all_reduce SUM.

        The tail (flags, weight, integer buffers: small integers, nothing secret) travels unmasked
        after the values in the same int64 buffer. A sick owner still sends its masks, on zeros, so
        the other owners' masks cancel.
        """
        if self._pair_secrets is None:
            self._pair_secrets = exchange_pair_secrets(self.group)  # point-to-point, once per process
        values, tail = self.flat.values, self.flat.tail
        self._reset_tail(tail, sick)
        if not sick:
            tail[self.world] = 1.0
        mine = torch.zeros_like(values) if sick else values
        sent = masked_contribution(mine, self._pair_secrets, self.rank, nonce=self._secure_calls)
        self._secure_calls += 1
        # masks are made on the CPU (numpy's Philox); NCCL needs the buffer on the GPU
        buffer = torch.cat([sent, tail.round().to(torch.int64).cpu()]).to(values.device)
        dist.all_reduce(buffer, dist.ReduceOp.SUM, group=self.group)  # only masked values travel
        n = values.numel()
        tail.copy_(buffer[n:].to(tail.dtype))
        flags = tail[: self.world + 1].tolist()
        values.copy_((buffer[:n].double() / (2.0**FRACTION_BITS * flags[self.world])).to(values.dtype))
        self._unpack_ints(tail)
        return flags

    def _max(self, sick: bool) -> list[float]:
        values, tail = self.flat.values, self.flat.tail
        self._reset_tail(tail, sick, neutral=float("-inf"))
        if sick:
            values.fill_(float("-inf"))
        dist.all_reduce(self.flat.buffer, dist.ReduceOp.MAX, group=self.group)
        self._unpack_ints(tail)
        return tail[: self.world].tolist()

    def _absmax(self, sick: bool) -> list[float]:
        """absmax as one all_reduce MAX over integer keys (rules.absmax_keys_): the bytes of avg's SUM.

        The whole buffer, tail included, travels as keys: the tail's flags and integer halves are
        non-negative floats, whose key order is their value order, and -0.0 (the smallest key) is the
        neutral element. The key transform runs in key_chunk() steps, so on a CPU it stays in cache,
        and its scratch is bounded whatever the model size or owner count.
        """
        buffer, tail = self.flat.buffer, self.flat.tail
        self._reset_tail(tail, sick, neutral=-0.0)
        if sick:
            self.flat.values.fill_(-0.0)  # the smallest key: never wins over a healthy owner's value
        keys = buffer.view(KEY_DTYPES[buffer.dtype])
        if self._scratch is None:
            size = min(key_chunk(keys.device), keys.numel())
            self._scratch = torch.empty(size, dtype=keys.dtype, device=keys.device)
        in_chunks(absmax_keys_, keys, self._scratch)
        dist.all_reduce(keys, dist.ReduceOp.MAX, group=self.group)
        in_chunks(absmax_unkeys_, keys, self._scratch)
        self._unpack_ints(tail)
        return tail[: self.world].tolist()

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


def in_chunks(step, keys: Tensor, scratch: Tensor) -> None:
    """Apply an in-place key step to `keys` one scratch-sized piece at a time."""
    size = scratch.numel()
    for start in range(0, keys.numel(), size):
        piece = keys[start : start + size]
        step(piece, scratch[: piece.numel()])


def _needs_anchor(cfg: UnifyConfig) -> bool:
    """Whether any option in use needs the previous unified state."""
    delta_rule = any(SPECS[r].delta_only for r in [cfg.rule, *cfg.compare] if r in SPECS)
    server = cfg.server_momentum > 0 or cfg.server_lr != 1.0
    return cfg.space == "delta" or delta_rule or cfg.update_norm_bound > 0 or server


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
