"""Overlapped unify (unify.overlap): round r's unify runs in the background while round r+1 trains.

Each owner hands its round-r weights to a background thread, which unifies them over a second gloo
process group (so its collectives never interleave with the main thread's), and goes on training. At
the end of round r+1 it takes the result and keeps its own round-(r+1) progress on top, as Streaming
DiLoCo merges (one round of delay):

    start of round r+1: x <- b_r, where round r+1's training starts (unify.overlap_start):
                          own      b_r = s_r              all of the owner's progress not yet unified
                          eager    b_r = a_r + (s_r - a_r) / W   its own share of the mean in flight
                          unified  b_r = a_r              the state every owner holds: one round stale
    end of round r+1:   a_{r+1} = unify of the owners' round-r weights          (waits only if not done yet)
                        x <- a_{r+1} + (x - b_r)                                 (s_r: the weights sent in round r)
                        s_{r+1} = x; unify of s_{r+1} starts in the background   (its update: round r+1's progress)

`own` is Streaming DiLoCo's merge. On label-skewed owners it lets each owner train a second round on top
of its own unaveraged drift, and the mean of such updates lands far from the blocking run's (the H split:
docs/performance.md, "Overlap's accuracy"); eager and unified start closer to the consensus.

What is identical on every owner after round r: the unified state a_r that every owner applies at the
end of round r, the unify of the owners' round-(r-1) weights (a_1: the common start). It is what the
model holds between `unify()` and the next `begin_round()` (so it is what the round evaluates and
checkpoints), and its digest is proven equal on every rank every round: by the background unify's own
digest check (round 2 on), or by one on the main thread (round 1). The owner's own weights x differ
between owners (each has its unsent progress) and live in this object's state until `begin_round()`.
`finish()` waits for the last unify and leaves every owner holding it (the run's final model).

With unify.overlap_fragments = N > 1 the background unify's all_reduce goes in N pieces, consecutive slices of
the flat state (groups of layers in the model's order), piece k started no earlier than k / N of PACE_SHARE of
the round just trained: the link carries a steady trickle through the round instead of one burst at its
start. The sum of each element is the same sum, so the values do not change (bit for bit with 2 owners; with
more, gloo's ring may add an element's terms in another order, and every owner still gets the same bits). An
owner that needs the result before the pieces are through (the next round ended early, or the run ended)
hurries them: the rest go at once.

The background unify is a plain Unifier (rule, outer optimizer, normalize_steps, digest check) over a
shadow copy of the model; its state before the unify in flight travels in checkpoints with the weights
sent, so a resumed run starts that unify again and continues bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from unify_dist.collectives import verify_identical
from unify_dist.config import UnifyConfig
from unify_dist.flat import FlatState
from unify_dist.unifier import Unifier, UnifyOutcome

__all__ = ["OverlappedUnifier", "PACE_SHARE"]

PACE_SHARE = 0.75
"""With overlap_fragments: the pieces' start times spread over this share of the round just trained, leaving
the rest of the next round for the last piece to cross (the owner waits at the round's end if it has not)."""
MIN_PIECE = 1 << 12
"""Tensors under overlap_fragments x this many elements (integer buffers, a tiny model) go whole, at once."""


class _Pending:
    """One background unify: a daemon thread (a run that fails must not hang at exit), its outcome or error."""

    def __init__(self, fn, *args: Any, **kwargs: Any):
        self.outcome: UnifyOutcome | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs), name="unify-overlap", daemon=True)
        self.thread.start()

    def _run(self, fn, args, kwargs) -> None:
        try:
            self.outcome = fn(*args, **kwargs)
        except BaseException as e:  # re-raised on the main thread by wait()
            self.error = e

    def wait(self) -> UnifyOutcome:
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.outcome is not None
        return self.outcome


class _Pace:
    """Yields a tensor's `pieces` slices, slice k no earlier than t0 + k / pieces * seconds (then sends it), so
    one unify's bytes spread over `seconds`; `hurry()` lets every slice not yet yielded go at once. Small
    tensors (under pieces x MIN_PIECE elements) go whole. `started` keeps when each slice went."""

    def __init__(self, pieces: int, seconds: float):
        self.n, self.seconds, self.t0 = pieces, seconds, time.perf_counter()
        self.hurried = threading.Event()
        self.started: list[float] = []

    def __call__(self, tensor: torch.Tensor):
        if tensor.numel() < self.n * MIN_PIECE:
            yield tensor
            return
        for k, piece in enumerate(tensor.tensor_split(self.n)):
            delay = self.t0 + k * self.seconds / self.n - time.perf_counter()
            if delay > 0:
                self.hurried.wait(delay)  # returns at once once hurried
            self.started.append(time.perf_counter() - self.t0)
            yield piece

    def hurry(self) -> None:
        self.hurried.set()


class OverlappedUnifier:
    """A Unifier whose unify of round r is applied at the end of round r+1, overlapping round r+1's training.

    Args:
        model, flat: the owner's model and its FlatState (identical on every rank at construction).
        cfg: the unify settings (rule, outer optimizer, normalize_steps); cfg.overlap is implied.
        group: a process group used by the background thread only, e.g. dist.new_group(backend="gloo");
            never the group of the main thread's collectives.
    Call `begin_round()` before each round's training, `unify(weight, steps=...)` after it, and `finish()`
    after the last round. Constructing it is local (no collective).
    """

    def __init__(self, model: nn.Module, flat: FlatState, cfg: UnifyConfig, group: dist.ProcessGroup):
        self.flat, self.group = flat, group
        self.start_from = cfg.overlap_start  # where each round's training starts (module docstring)
        self.shadow = FlatState(copy.deepcopy(model), tail=flat.tail.numel())  # what the background unifies
        self.shadow.values.copy_(flat.values)
        self.shadow.ints.copy_(flat.ints)
        self.background = Unifier.over(self.shadow, dataclasses.replace(cfg, overlap=False), group)
        self.core = self.background.core  # the program sets its reducer (None: trust is refused with overlap)
        self.own = (flat.values.clone(), flat.ints.clone())  # x: this owner's weights while the model holds a_r
        self.sent = (flat.values.clone(), flat.ints.clone())  # s: the weights of the unify in flight
        self.unified = (flat.values.clone(), flat.ints.clone())  # a_r: identical on every owner
        self.start = (flat.values.clone(), flat.ints.clone())  # where this round's training began
        self.pending: _Pending | None = None
        self.launch: dict[str, Any] = {}  # the unify in flight: its arguments and the background state before it
        self.fragments = cfg.overlap_fragments  # > 1: the background unify's transfer spread over the round
        self.pace: _Pace | None = None  # the pacing of the unify in flight (fragments > 1)
        self.began = time.perf_counter()  # when this round's training began

    # ------------------------------------------------------------------------------------ rounds
    def begin_round(self) -> None:
        """Put the weights this round trains from into the model (between rounds it holds the unified state):
        the owner's own (overlap_start = own), the unified state plus 1/W of its own unsent progress (eager),
        or the unified state (unified). Integer buffers (counters) are always the owner's own."""
        values, ints = self.start
        if self.start_from == "own":
            values.copy_(self.own[0])
        elif self.start_from == "eager":  # a_r + (x - a_r) / W: its own share of the mean still in flight
            torch.sub(self.own[0], self.unified[0], out=values).div_(dist.get_world_size(self.group)).add_(self.unified[0])
        else:
            values.copy_(self.unified[0])
        ints.copy_(self.own[1])
        _set(_pair(self.flat), self.start)
        self.began = time.perf_counter()

    def unify(self, weight: float = 1.0, *, rule: str | None = None, steps: int = 0) -> UnifyOutcome:
        """Apply the previous round's unify (waiting for it if needed), start this round's, and leave the
        model holding the applied unified state. The outcome describes that state; `seconds` is the time
        this call took, waiting included. A collective on the background group (and on the main group in
        the first round)."""
        t0 = time.perf_counter()
        trained = t0 - self.began
        x, x_ints = self.flat.values, self.flat.ints
        if self.pending is not None:
            self._hurry()  # pieces still paced out: this owner needs them now
            done = self.pending.wait()  # the only place an owner can be kept waiting
            self.pending = None
            _set(self.unified, _pair(self.shadow))
            x.sub_(self.start[0]).add_(self.unified[0])  # this round's own progress on top of the unified state
            x_ints.sub_(self.start[1]).add_(self.unified[1])
            skipped, digests, sent = done.skipped, done.digests, done.bytes_sent
        else:  # the first round (or a run resumed with nothing in flight): the common start, proven here
            _set(_pair(self.shadow), self.unified)
            skipped, digests, sent = [], verify_identical(self.shadow), 0  # collective (main group)
        self._start(weight, rule or self.background.rule, steps, pace_s=PACE_SHARE * trained)
        _set(_pair(self.flat), self.unified)  # evaluate and checkpoint the state every owner holds
        # every rank's own digest of the applied state (the record keeps them all), and the bytes this owner sent
        return UnifyOutcome(rule or self.background.rule, skipped, digests[0], time.perf_counter() - t0,
                            bytes_sent=sent, digests=digests)  # fmt: skip

    def finish(self) -> UnifyOutcome | None:
        """After the last round: wait for the unify in flight and give every owner its result (no progress
        is left to keep: nothing trained since it started)."""
        if self.pending is None:
            return None
        self._hurry()  # nothing trains any more: no reason to spread the bytes
        done = self.pending.wait()
        self.pending = None
        for pair in (self.own, self.unified, _pair(self.flat)):
            _set(pair, _pair(self.shadow))
        return done

    def _start(self, weight: float, rule: str, steps: int, pace_s: float = 0.0) -> None:
        """Send this owner's current weights: s = x, the background unify of s starts (its transfer spread
        over pace_s seconds when overlap_fragments > 1)."""
        for pair in (self.own, self.sent, _pair(self.shadow)):
            _set(pair, _pair(self.flat))
        self.pace = _Pace(self.fragments, pace_s) if self.fragments > 1 else None
        self.core.pieces = self.pace
        self.launch = {"state": _cloned(self.background.state_dict()), "weight": weight, "rule": rule, "steps": steps}
        self.pending = _Pending(self.background.unify, weight, rule=rule, steps=steps)

    def _hurry(self) -> None:
        if self.pace is not None:
            self.pace.hurry()

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The owner's own and sent weights, the unified state, and the unify in flight (restarted on load)."""
        return {
            "overlap_own": self.own[0], "overlap_own_ints": self.own[1],
            "overlap_sent": self.sent[0], "overlap_sent_ints": self.sent[1],
            "overlap_unified": self.unified[0], "overlap_unified_ints": self.unified[1],
            "overlap_pending": self.pending is not None,
            "overlap_launch": self.launch,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict() and start its unify in flight again (a collective on the background group)."""
        for key, pair in (("overlap_own", self.own), ("overlap_sent", self.sent), ("overlap_unified", self.unified)):
            pair[0].copy_(state[key])
            pair[1].copy_(state[f"{key}_ints"])
        self.launch = state["overlap_launch"]
        if state["overlap_pending"]:
            self.background.load_state_dict(self.launch["state"])
            _set(_pair(self.shadow), self.sent)
            launch = self.launch
            self.pace = _Pace(self.fragments, 0.0) if self.fragments > 1 else None  # the same pieces, sent at once
            self.core.pieces = self.pace
            self.pending = _Pending(self.background.unify, launch["weight"], rule=launch["rule"], steps=launch["steps"])


Pair = tuple[torch.Tensor, torch.Tensor]
"""(float values, integer buffers) of one model state."""


def _pair(flat: FlatState) -> Pair:
    return flat.values, flat.ints


def _set(dst: Pair, src: Pair) -> None:
    dst[0].copy_(src[0])
    dst[1].copy_(src[1])


def _cloned(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
