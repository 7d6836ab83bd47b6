"""The collective core: one owner's flat state in, every owner's unified state out, in place.

The path is the rule's `collective` (unify_dist.rules.RuleSpec), so no code here matches rule names:
  sum / weighted_sum  one all_reduce SUM of (weight / W * x), W owners: avg with every owner healthy is
                      then the mean; otherwise times W / the summed weight;
  max                 one all_reduce MAX of x;
  absmax              one all_reduce MAX of integer keys that order values by magnitude, then positive
                      over negative (rules.absmax_keys_): the reference's tie rule, bit for bit;
  masked_sum          the mean from pairwise-masked fixed-point contributions (unify_dist.secure);
  gather              the owners' values gathered chunk by chunk, and the pure reference applied:
                      extra memory owners x chunk_elements. Any registered rule runs this way.
  compressed          sums of updates under unify.compress (Collective.compressed_sum): bf16/fp16 one
                      all_gather of 16-bit rows (from 4 owners sharded: an all_to_all of 16-bit shards, an
                      all_gather of their float32 sums), int8 an all_reduce MAX of block scales then one
                      SUM of int8.

Over gloo every all_gather and all_to_all posts its receives before its sends (unify_dist.exchange):
gloo's own send first, and on a slow link one direction then waits behind the other's data (resnet18's
bf16 gather over 20 Mbit/s: 14.5 s, against 9.7 s receive-first).

Non-finite weights are caught before anything is combined. Each owner checks its own values (on the sum
paths, in the same cache-sized pass that scales them: see Collective._scale_and_check); a sick
owner contributes the path's neutral element (0 with weight 0 for sums, -inf for MAX: never a zero,
which would corrupt max; -0.0, the smallest key, for absmax) and raises its flag in the buffer's tail,
which rides in the same collective. So the health check costs no extra round trip, and with
nonfinite = "skip" the round's result is exactly the rule over the healthy owners.

Everything around a rule (update space, clipping, noise, server momentum) lives in unify_dist.wrappers
and is composed by unify_dist.unifier.Unifier; this module only moves and combines bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from unify_dist import exchange
from unify_dist.flat import FlatState
from unify_dist.rules import KEY_DTYPES, RuleSpec, absmax_keys_, absmax_unkeys_
from unify_dist.secure import SecureSum
from unify_dist.sharded import sharded_combine
from unify_dist.wrappers import (
    COMPRESS_BLOCK, HALF_DTYPES, ErrorFeedback, block_absmax, dequantize_int8, int8_levels, quantize_int8, to_half,
)  # fmt: skip

__all__ = [
    "Collective", "NonFiniteError", "DivergenceError", "tail_size", "verify_identical", "in_chunks", "key_chunk",
    "scale_chunk",
    "INT_RULES", "combine_ints",
]  # fmt: skip


def key_chunk(device: torch.device) -> int:
    """Elements per step of absmax's key transform: on a CPU 256 KiB of int32, so each step's passes stay
    in L2; elsewhere (GPUs) 64 MiB, since each op of a step is a kernel launch."""
    return 1 << 16 if device.type == "cpu" else 1 << 24


def scale_chunk(device: torch.device) -> int:
    """Elements per step of the sum paths' check-and-scale pass: on a CPU 1 MiB of float32 (a core's L2 on
    the bench machine; measured on resnet18: 5.5 ms a pass, against 6.4 ms at 256 KiB steps, where
    Python's cost per op starts to show, and 7.3 ms for two whole-buffer passes); elsewhere as key_chunk."""
    return 1 << 18 if device.type == "cpu" else 1 << 24


class NonFiniteError(RuntimeError):
    """An owner's weights hold NaN or Inf and the policy is `fail`."""


class DivergenceError(RuntimeError):
    """Ranks hold different unified weights after a unify: a bug or a corrupt link, never ignored."""


def tail_size(world_size: int, model: nn.Module | None = None) -> int:
    """Tail elements FlatState must reserve: one flag per owner, the summed weight, and (given the model)
    room for every owner's integer buffers, so the fast paths unify everything in one collective."""
    ints = 0 if model is None else sum(b.numel() for b in model.buffers() if not b.is_floating_point())
    return world_size + 1 + INT_PIECES * ints * world_size


INT_PIECES = 3
"""Integers ride in the float tail as three pieces, each exact in float32: bits 48-63 (signed), 24-47, 0-23."""

SHARDED_HALF_OWNERS = 4
"""From this many owners the 16-bit compressed sum runs sharded (Collective._half_gather): fewer bytes than
gathering every owner's rows; at 3 owners both send 4 bytes per element, and the gather is one exchange."""

INT_RULES = ("max", "min")
"""How unified integer buffers combine over owners (UnifyConfig.int_rule): max (the furthest counter) or min."""


def int_pieces(ints: Tensor) -> Tensor:
    """[3, k] float32-exact pieces of int64 values, any magnitude or sign (int_from_pieces undoes it)."""
    return torch.stack([ints >> 48, (ints >> 24) & 0xFFFFFF, ints & 0xFFFFFF])


def int_from_pieces(pieces: Tensor) -> Tensor:
    """int64 values from int_pieces' [..., 3, k] pieces (any float dtype holding them exactly)."""
    p = pieces.to(torch.int64)
    return p[..., 0, :] * (1 << 48) + p[..., 1, :] * (1 << 24) + p[..., 2, :]


def combine_ints(rows: Tensor, rule: str) -> Tensor:
    """Every owner's integer values [owners, k] -> the unified values, by the integer rule (INT_RULES)."""
    return rows.amin(0) if rule == "min" else rows.amax(0)


class Collective:
    """Runs one rule's collective over a FlatState; holds the scratch buffers so rounds do not reallocate.

    `absmax_impl = "gather"` sends absmax through the gather path; `chunk_elements` bounds that path's memory.
    """

    def __init__(self, flat: FlatState, group: dist.ProcessGroup | None, absmax_impl: str, chunk_elements: int,
                 int_rule: str = "max"):  # fmt: skip
        self.flat, self.group, self.chunk_elements = flat, group, chunk_elements
        self.int_rule = int_rule  # how integer buffers combine (INT_RULES)
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if flat.tail.numel() < tail_size(self.world):
            raise ValueError(f"FlatState tail holds {flat.tail.numel()} elements, need {tail_size(self.world)}")
        # absmax's one-all_reduce path needs integer keys as wide as the floats (float32/64); else gather
        self.absmax_reduce = absmax_impl == "reduce" and flat.buffer.dtype in KEY_DTYPES
        self._scratch: Tensor | None = None  # absmax's key-transform scratch, made on first use
        self._secure: SecureSum | None = None  # masked_sum's pair secrets: exchanged on first use
        # None: gloo's collectives. Else an object with all_reduce(tensor, op) and all_gather(out, tensor)
        # (SUM / MAX), e.g. unify_dist.trust.SealedRing, which every reduction and gather here goes through.
        self.reducer = None
        # None: each all_reduce in one call. Else a callable (unify_dist.overlap's pacing) that yields the
        # pieces of a tensor to reduce one after another, each when its time has come.
        self.pieces: Callable[[Tensor], Iterable[Tensor]] | None = None
        # Bytes this owner puts on the wire, estimated for ring collectives (the Unifier zeroes it per unify):
        # 2 (W-1)/W of an all_reduce's buffer, (W-1) times its own part of an all_gather, (W-1)/W of an all_to_all.
        self.bytes_sent = 0
        self._packets: list[Tensor] = []  # the 16-bit paths' gather rows, made on first use
        # Integer buffers ride in the tail when it has room: one collective per unify instead of two.
        self._ints_in_tail = flat.ints.numel() > 0 and flat.tail.numel() >= tail_size(self.world) + INT_PIECES * flat.ints.numel() * self.world

    def path(self, spec: RuleSpec) -> str:
        """The collective this rule runs here: its spec's, or gather where the fast path cannot serve."""
        if spec.collective == "absmax" and not self.absmax_reduce:
            return "gather"
        return spec.collective

    def reduce(self, spec: RuleSpec, combine: Callable[[Tensor, Tensor], Tensor], weight: float, sick: bool | None) -> list[float]:
        """The collective: every owner's values become the rule's result. Returns each owner's sick flag.

        `combine` is the reference (stacked, weights) -> unified, used by the gather path only. `sick`
        None: this owner's values are unchecked, and the core checks them (the sum paths in the pass that
        scales them); `sick_tensor` then names what it found.
        """
        path = self.path(spec)
        self.sick_tensor: str | None = None
        if sick is None and path not in ("sum", "weighted_sum"):
            self.sick_tensor = self.find_nonfinite()  # host sync
            sick = self.sick_tensor is not None
        if path in ("sum", "weighted_sum"):
            flags = self._sum(weight if path == "weighted_sum" else 1.0, sick)
        elif path == "max":
            flags = self._max(sick)
        elif path == "absmax":
            flags = self._absmax(sick)
        elif path == "masked_sum":
            flags = self._secure_sum(sick)
        else:
            flags = self._gather(combine, weight, sick)
        if self.flat.ints.numel() and not (self._ints_in_tail and path != "gather"):
            op = dist.ReduceOp.MIN if self.int_rule == "min" else dist.ReduceOp.MAX
            self._all_reduce(self.flat.ints, op)  # counters: the furthest owner (int_rule max)
        return flags

    def _all_reduce(self, tensor: Tensor, op: dist.ReduceOp) -> None:
        """The collective every reduction here runs: gloo's (the default), or the reducer's."""
        self.bytes_sent += 2 * (self.world - 1) * tensor.numel() * tensor.element_size() // self.world
        for piece in (tensor,) if self.pieces is None else self.pieces(tensor):
            if self.reducer is None:
                dist.all_reduce(piece, op, group=self.group)
            else:
                self.reducer.all_reduce(piece, op)

    def _all_gather(self, out: list[Tensor], tensor: Tensor, async_op: bool = False,
                    tag: int = 0) -> exchange.Pending | dist.Work | None:  # fmt: skip
        """Every gather here: gloo's with every receive posted first (unify_dist.exchange), or the reducer's.

        async_op: returns what to wait() on (narrow.py's pipeline of chunks), the exchange left in flight;
        exchanges in flight together need their own `tag` (unify_dist.exchange). A reducer's gather
        (trust's sealed ring) is synchronous and returns None.
        """
        self.bytes_sent += (self.world - 1) * tensor.numel() * tensor.element_size()
        if self.reducer is not None:
            self.reducer.all_gather(out, tensor)
            return None
        return exchange.all_gather(out, tensor, self.group, async_op=async_op, tag=tag)

    def _all_to_all(self, out: Tensor, tensor: Tensor, async_op: bool = False,
                    tag: int = 0) -> exchange.Pending | dist.Work | None:  # fmt: skip
        """Equal parts: part r of `tensor` goes to rank r, part r of `out` comes from rank r; over gloo with
        every receive posted first (unify_dist.exchange), else torch's (NCCL). async_op and tag as
        _all_gather's. gloo's or NCCL's only: a reducer (trust's sealed ring) offers all_reduce and
        all_gather, so its callers gather instead."""
        self.bytes_sent += (self.world - 1) * tensor.numel() * tensor.element_size() // self.world
        return exchange.all_to_all(out, tensor, self.group, async_op=async_op, tag=tag)

    def find_nonfinite(self) -> str | None:
        """The name of a tensor of this owner's state holding NaN/Inf, '?' if only the sum overflowed, else None."""
        values = self.flat.values
        # One reduction instead of a full isfinite mask: NaN/Inf anywhere makes the sum non-finite.
        if torch.isfinite(values.sum()):  # host sync
            return None
        return self._name_nonfinite()

    def _name_nonfinite(self) -> str | None:
        """The tensor holding this owner's first NaN/Inf; None if there is none (a sum merely overflowed)."""
        bad = (~torch.isfinite(self.flat.values)).nonzero()
        return self.flat.slot_of(int(bad[0])) if bad.numel() else None

    def _scale_and_check(self, scale: float) -> bool:
        """values *= scale, and whether their sum (before scaling) is finite: one trip through memory.

        In scale_chunk() steps, each step summed, then scaled while it is still in cache, so the check
        costs no read of its own from memory (a whole-buffer sum, then a whole-buffer multiply, makes
        two trips: avg's unify was 1.19x one bare all_reduce of resnet18 that way). NaN/Inf anywhere
        makes its step's sum non-finite; the scaled values keep every NaN/Inf where it was.
        """
        values = self.flat.values
        step, sums = scale_chunk(values.device), []
        for start in range(0, values.numel(), step):
            piece = values[start : start + step]
            sums.append(piece.sum())
            if scale != 1.0:
                piece.mul_(scale)
        return not sums or bool(torch.isfinite(torch.stack(sums).sum()))  # host sync

    def _reset_tail(self, tail: Tensor, sick: bool, neutral: float = 0.0) -> None:
        """Flags to zero (this owner's to 1 if sick); integer buffers into this owner's row of the tail.

        Integers travel as three float pieces (int_pieces), each exact in float32, so any int64 value
        arrives whole; the other owners' rows hold the collective's neutral element (0 for SUM, -inf for MAX).
        """
        tail.zero_()
        if sick:
            tail[self.rank] = 1.0
        if self._ints_in_tail:
            k, first = self.flat.ints.numel(), self.world + 1
            rows = tail[first : first + INT_PIECES * k * self.world].view(self.world, INT_PIECES, k)
            rows.fill_(neutral)
            rows[self.rank] = int_pieces(self.flat.ints)

    def _unpack_ints(self, tail: Tensor) -> None:
        """After the collective: each integer buffer by the integer rule over owners (max: the furthest counter)."""
        if not self._ints_in_tail:
            return
        k, first = self.flat.ints.numel(), self.world + 1
        rows = tail[first : first + INT_PIECES * k * self.world].view(self.world, INT_PIECES, k)
        self.flat.ints.copy_(combine_ints(int_from_pieces(rows), self.int_rule))

    def _sum(self, weight: float, sick: bool | None) -> list[float]:
        """Weighted mean over healthy owners: one all_reduce SUM of (weight / W * values, flags, weight).

        Each owner sends its share as if every owner weighed 1 (weight / W, W owners), so for avg with
        every owner healthy the SUM is the mean and no pass follows the collective; otherwise the result
        is scaled by W / (the healthy owners' total weight). Unchecked values (sick None) are checked in
        the same cache-sized pass that scales them. Every rank does the same arithmetic on the same sum,
        so the weights stay bit-identical.

        Raises ValueError on every rank (the verdict rides in the same collective, so no owner is left
        waiting) when an owner's weight is negative or not finite, or when the healthy owners' weights
        sum to 0: the mean is undefined, and dividing by nothing would hand every owner an all-zero
        model. The values then hold the raw sum; the caller must not use them.
        """
        values, tail = self.flat.values, self.flat.tail
        bad_weight = not 0 <= weight < float("inf")  # NaN fails both comparisons
        share = 1.0 if bad_weight else weight / self.world  # bad: zeroed below, never scaled
        if sick is None:
            finite = self._scale_and_check(share)  # host sync; the values leave it scaled
            self.sick_tensor = None if finite else self._name_nonfinite()
            sick = self.sick_tensor is not None
        elif not sick and share != 1.0:
            values.mul_(share)
        bad_weight = bad_weight and not sick
        self._reset_tail(tail, sick or bad_weight)
        if sick or bad_weight:
            values.zero_()
            tail[self.rank] = 2.0 if bad_weight else 1.0  # flag 2: a misused weight, not a sick owner
        else:
            tail[self.world] = weight
        self._all_reduce(self.flat.buffer, dist.ReduceOp.SUM)
        flags = tail[: self.world + 1].tolist()  # host sync: the divisor is the healthy owners' total weight
        misused = [r for r in range(self.world) if flags[r] == 2.0]
        if misused:
            raise ValueError(
                f"owner(s) {misused} passed a negative or non-finite unify weight; a weight counts an owner's "
                "samples: pass a finite number >= 0, e.g. len(its training data)"
            )
        if flags[self.world] == 0 and any(flags[r] == 0 for r in range(self.world)):
            raise ValueError(
                "the healthy owners' unify weights sum to 0, so their weighted mean is undefined; give at "
                "least one owner a weight > 0 (its training sample count), or use an unweighted rule such as avg"
            )
        # 0: every owner is sick, and the Unifier raises; W: avg with everyone healthy, already the mean
        if flags[self.world] > 0 and flags[self.world] != self.world:
            values.mul_(self.world / flags[self.world])
        self._unpack_ints(tail)
        return flags

    def _secure_sum(self, sick: bool) -> list[float]:
        """Mean over healthy owners from masked int64 fixed-point contributions: one all_reduce SUM.

        The tail (flags, weight, integer buffers: small integers, nothing secret) travels unmasked
        after the values in the same int64 buffer. A sick owner still sends its masks, on zeros, so
        the other owners' masks cancel.
        """
        if self._secure is None:
            self._secure = SecureSum(self.group, reducer=self.reducer)  # pair secrets: sent, or from the reducer
        values, tail = self.flat.values, self.flat.tail
        self._reset_tail(tail, sick)
        if not sick:
            tail[self.world] = 1.0
        self._secure.mean_(values, tail, sick)
        self.bytes_sent += 2 * (self.world - 1) * 8 * self.flat.buffer.numel() // self.world  # int64 fixed point
        self._unpack_ints(tail)
        return tail[: self.world + 1].tolist()

    def _max(self, sick: bool) -> list[float]:
        values, tail = self.flat.values, self.flat.tail
        self._reset_tail(tail, sick, neutral=float("-inf"))
        if sick:
            values.fill_(float("-inf"))
        self._all_reduce(self.flat.buffer, dist.ReduceOp.MAX)
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
        self._all_reduce(keys, dist.ReduceOp.MAX)
        in_chunks(absmax_unkeys_, keys, self._scratch)
        self._unpack_ints(tail)
        return tail[: self.world].tolist()

    def _gather(self, fn: Callable[[Tensor, Tensor], Tensor], weight: float, sick: bool) -> list[float]:
        values = self.flat.values
        n, chunk = values.numel(), min(self.chunk_elements, max(values.numel(), 1))
        info = torch.tensor([1.0 if sick else 0.0, weight], dtype=torch.float64, device=values.device)
        infos = [torch.empty_like(info) for _ in range(self.world)]
        self._all_gather(infos, info)
        flags = [float(i[0]) for i in infos]
        healthy = [r for r in range(self.world) if not flags[r]]
        if not healthy:
            return flags
        weights = torch.tensor([float(infos[r][1]) for r in healthy], dtype=torch.float64, device=values.device)
        rows = torch.empty(self.world, chunk, dtype=values.dtype, device=values.device)
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            parts = [rows[r, : end - start] for r in range(self.world)]
            self._all_gather(parts, values[start:end])
            stacked = rows[:, : end - start] if len(healthy) == self.world else rows[healthy, : end - start]
            values[start:end] = fn(stacked, weights)
        return flags

    # ------------------------------------------------------------------------------------ compressed
    def compressed_sum(self, spec: RuleSpec, feedback: ErrorFeedback, weight: float, sick: bool, commit: bool) -> list[float]:
        """avg / weighted_avg of this owner's update over lossy transport with error feedback (unify.compress).

        In: the update in `flat.values`. Out: the unified update, the same bits on every rank. Returns
        each owner's sick flag. Integer buffers take the largest value over owners, as on every path.
        """
        weight = weight if self.path(spec) == "weighted_sum" else 1.0  # the Unifier refused all but sums
        if feedback.mode == "int8":
            return self._int8_sum(feedback, weight, sick, commit)
        return self._half_gather(feedback, weight, sick, commit)

    def _half_gather(self, feedback: ErrorFeedback, weight: float, sick: bool, commit: bool) -> list[float]:
        """bf16 / fp16: every owner's 16-bit update (plus flag, weight and counters, as raw bytes) to every
        owner, and the healthy owners' rows summed in float32 in rank order.

        Why not a 16-bit all_reduce: a SUM in 16 bits rounds (and in fp16 can overflow) at every hop, and
        that loss is nobody's residual. Here the only loss is each owner's own cast, which its error
        feedback carries in full, and every sum runs the same float32 additions in the same order, so
        the result is bit-identical everywhere. Two ways, the same bits:
          gather   (2 or 3 owners, or a reducer) one all_gather of the whole packets, every owner sums
                   all of it: (W-1) x 2 bytes per element, half of avg's all_reduce for 2 owners, 3/4 for 3;
          sharded  (4 or more owners, the group's collectives) a small all_gather of the headers, then
                   unify_dist.sharded: an all_to_all of 16-bit shards, each owner sums its shard, an
                   all_gather of the float32 sums (kept whole: rounding them to 16 bits would lose what
                   no owner's residual holds). (W-1)/W x (2 + 4) bytes per element: 4.5 at 4 owners
                   against the gather's 6 and avg's 6, 5.25 at 8 against 14 and 7.
        """
        values, ints = self.flat.values, self.flat.ints
        dtype, n, k = HALF_DTYPES[feedback.mode], values.numel(), ints.numel()
        sharded = self.reducer is None and self.world >= SHARDED_HALF_OWNERS and n > 0
        packet, rows = self._half_packets(8 + 8 * k, 2 * n, sharded)
        packet[:8].view(torch.float32).copy_(torch.tensor([1.0 if sick else 0.0, weight]))
        packet[8 : 8 + 8 * k].view(torch.int64).copy_(ints)
        half = packet[8 + 8 * k :].view(dtype)
        if sick:
            half.zero_()  # never read: its flag leaves it out
        else:
            feedback.add_to(values)  # what earlier rounds could not send
            to_half(values, dtype, half)
            feedback.keep(values, half, commit)
        self._all_gather(rows, packet[: rows[0].numel()])  # collective: the headers (sharded) or everything
        meta = [row[:8].view(torch.float32).tolist() for row in rows]
        flags, weights = [m[0] for m in meta], [m[1] for m in meta]
        total = self._healthy_weight(flags, weights)
        ints.copy_(combine_ints(torch.stack([row[8 : 8 + 8 * k].view(torch.int64) for row in rows]), self.int_rule))
        if total is None:
            return flags
        healthy = [(r, weights[r] if weight != 1.0 else None) for r in range(self.world) if not flags[r]]
        if sharded:
            def shard(stacked: Tensor) -> Tensor:  # every owner's 16-bit shard -> the healthy owners' float32 sum
                out = torch.empty(stacked.shape[1], dtype=values.dtype, device=values.device)
                _sum_rows(out, [stacked[r] for r, _ in healthy], [w for _, w in healthy])
                return out

            sharded_combine(self, half, values, shard)  # collective
        else:
            _sum_rows(values, [rows[r][8 + 8 * k :].view(dtype) for r, _ in healthy], [w for _, w in healthy])
        values.mul_(1.0 / total)
        return flags

    def _half_packets(self, header: int, body: int, sharded: bool) -> tuple[Tensor, list[Tensor]]:
        """This owner's packet (header + 16-bit body) and the rows every owner's arrives in (headers only
        when sharded), made on first use and kept across rounds."""
        row = header if sharded else header + body
        if not self._packets or self._packets[0].numel() != row:
            device = self.flat.values.device
            self._packets = [torch.empty(row, dtype=torch.uint8, device=device) for _ in range(self.world)]
            self._packets.append(torch.empty(header + body, dtype=torch.uint8, device=device))
        return self._packets[-1], self._packets[:-1]

    def _int8_sum(self, feedback: ErrorFeedback, weight: float, sick: bool, commit: bool) -> list[float]:
        """int8: blockwise scales agreed as the MAX over owners (one small all_reduce, which also carries
        flags, weights and counters), then one SUM of int8 values (_int_sum).

        Every owner quantises its block with the same scale s to `int8_levels(W)` = 127 // W levels per
        sign, so the SUM of W owners' values lies in [-127, 127]: int8 cannot overflow, and an integer
        sum is exact in any order, so every rank holds the same sum. Unified = sum x s / levels / total
        weight, the same float32 products everywhere. Each owner sends (weight x update + residual), and
        keeps what its quantisation dropped.
        """
        values, ints = self.flat.values, self.flat.ints
        n, k, world = values.numel(), ints.numel(), self.world
        blocks, levels = -(-n // COMPRESS_BLOCK), int8_levels(world)
        header = torch.zeros(blocks + 2 * world + INT_PIECES * k * world, dtype=values.dtype, device=values.device)
        scales, flags_t = header[:blocks], header[blocks : blocks + world]
        weights_t, rows = header[blocks + world : blocks + 2 * world], header[blocks + 2 * world :].view(world, INT_PIECES, k)
        weights_t.fill_(float("-inf"))  # MAX's neutral: each slot ends as its owner's weight
        rows.fill_(float("-inf"))
        rows[self.rank] = int_pieces(ints)  # exact pieces, as in the tail
        if sick:
            flags_t[self.rank] = 1.0  # scales stay 0: no say in the shared scale
        else:
            if weight != 1.0:
                values.mul_(weight)
            feedback.add_to(values)
            block_absmax(values, COMPRESS_BLOCK, scales)
            weights_t[self.rank] = weight
        self._all_reduce(header, dist.ReduceOp.MAX)  # collective: shared scales, flags, weights, counters
        flags, weights = flags_t.tolist(), weights_t.tolist()  # host sync
        total = self._healthy_weight(flags, weights)
        ints.copy_(combine_ints(int_from_pieces(rows), self.int_rule))
        q = torch.zeros(n, dtype=torch.int8, device=values.device)
        if not sick:
            quantize_int8(values, scales, levels, q)
            if commit:  # residual = contribution - what q stands for, built in the residual's own memory
                dequantize_int8(q, scales / levels, feedback.residual)
                feedback.keep(values, feedback.residual, commit)
        self._int_sum(q)  # collective: |sum| <= W x levels <= 127
        if total is not None:
            dequantize_int8(q, scales / levels * (1.0 / total), values)
        return flags

    def _int_sum(self, q: Tensor) -> None:
        """q <- the SUM over owners of an integer tensor. Between two owners over gloo: one receive-first
        exchange and a local add (unify_dist.exchange), the bytes of the ring all_reduce at the link's rate
        (gloo's all_reduce of resnet18's int8 update moved 17.8 Mbit/s over a 20 Mbit/s link)."""
        if self.reducer is None and exchange.pairwise_sum_(q, torch.empty_like(q), self.group):
            self.bytes_sent += q.numel() * q.element_size()  # = 2 (W-1)/W of it at W = 2
            return
        self._all_reduce(q, dist.ReduceOp.SUM)

    def _healthy_weight(self, flags: list[float], weights: list[float]) -> float | None:
        """The healthy owners' total weight (None: nobody is healthy, and the Unifier raises).

        Every rank sees every owner's weight here, so every rank raises the same ValueError on a misuse.
        """
        healthy = [r for r in range(self.world) if not flags[r]]
        bad = [r for r in healthy if not 0 <= weights[r] < float("inf")]
        if bad:
            raise ValueError(f"owner(s) {bad} passed a negative or non-finite unify weight; pass a finite number >= 0, "
                             "e.g. len(its training data)")  # fmt: skip
        total = sum(weights[r] for r in healthy)
        if healthy and total == 0:
            raise ValueError("the healthy owners' unify weights sum to 0; give at least one owner a weight > 0")
        return total if healthy else None


def _sum_rows(values: Tensor, rows: list[Tensor], weights: list[float | None]) -> None:
    """values = the sum of the 16-bit rows, each times its weight (None: 1), in list order, in float32.

    The same float32 additions in the same order on every rank, so the same bits. Each row is widened
    (exactly) into a cache-sized scratch before it is scaled or added: a bf16 + float32 add runs about 4x
    slower on a CPU than a widening copy and a float32 add (resnet18: 128 ms against 29). A weight is its
    own rounded multiply, no fused multiply-add, so the bits do not depend on the CPU.
    """
    step = scale_chunk(values.device)
    scratch = torch.empty(min(step, values.numel()), dtype=values.dtype, device=values.device)
    for start in range(0, values.numel(), step):
        end = min(values.numel(), start + step)
        target, wide = values[start:end], scratch[: end - start]
        for i, (row, weight) in enumerate(zip(rows, weights)):
            wide.copy_(row[start:end])
            if weight is not None:
                wide.mul_(weight)
            target.copy_(wide) if i == 0 else target.add_(wide)


def in_chunks(step, keys: Tensor, scratch: Tensor) -> None:
    """Apply an in-place key step to `keys` one scratch-sized piece at a time."""
    size = scratch.numel()
    for start in range(0, keys.numel(), size):
        piece = keys[start : start + size]
        step(piece, scratch[: piece.numel()])


def verify_identical(flat: FlatState, group: dist.ProcessGroup | None = None, reducer=None) -> list[str]:
    """Digest this rank's state, gather every rank's digest, raise DivergenceError naming the odd ranks.

    Returns every rank's digest (all equal), for the record. A collective: every rank calls it; through
    `reducer` (a Collective's, e.g. a SealedRing) when given.
    """
    digest = flat.digest()
    value = int(digest, 16)
    mine = torch.tensor([value - (1 << 64) if value >= 1 << 63 else value], dtype=torch.int64)
    if flat.values.is_cuda:
        mine = mine.to(flat.values.device)  # NCCL gathers device tensors only
    world = dist.get_world_size(group)
    out = [torch.empty_like(mine) for _ in range(world)]
    if reducer is None:
        dist.all_gather(out, mine, group=group)
    else:
        reducer.all_gather(out, mine)
    digests = [f"{int(t) & ((1 << 64) - 1):016x}" for t in out]
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise DivergenceError(
            f"ranks {differ} hold different weights than rank 0 after unify (digests {digests}); "
            "every rank must end every round with identical weights, so the run stops here"
        )
    return digests
