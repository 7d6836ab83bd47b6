"""Fault injection: a test hook that makes one owner misbehave on purpose, right before unify.

The tests launch the program through this module (`torchrun ... -m tests.hooks.faults train ...`):
it is the program plus one round hook, so neither the library nor the round loop knows of faults.

Not a feature for users. The reliability tests set the environment variable UNIFY_DIST_FAULT to prove,
with real processes, that a stalled owner stops every rank within dist.timeout_s (instead of a hang)
and that an owner with NaN weights is caught by the unify.nonfinite policy:

    UNIFY_DIST_FAULT="stall:rank=1:round=2"   rank 1 sleeps forever before the unify of round 2
    UNIFY_DIST_FAULT="nan:rank=1:round=2"     rank 1's weights become NaN before the unify of round 2

The variable is read once per process; when it is unset, `before_unify` does nothing.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

from unify_dist.app.cli import main as cli_main
from unify_dist.unifier import Unifier

__all__ = ["FAULT_ENV", "Fault", "parse_fault", "FaultHook"]

FAULT_ENV = "UNIFY_DIST_FAULT"
KINDS = ("stall", "nan")


@dataclass(frozen=True)
class Fault:
    kind: str
    """stall (sleep forever) or nan (fill the owner's weights with NaN)."""
    rank: int
    """The owner that misbehaves."""
    round: int
    """The round in which it misbehaves, just before that round's unify."""


def parse_fault(text: str) -> Fault:
    """Parse 'KIND:rank=R:round=N'; a malformed hook is a bug in the test, so it raises ValueError."""
    kind, *parts = text.strip().split(":")
    fields = dict(p.split("=", 1) for p in parts if "=" in p)
    if kind not in KINDS or set(fields) != {"rank", "round"} or len(parts) != 2:
        kinds = ", ".join(KINDS)
        raise ValueError(f"{FAULT_ENV}='{text}' is malformed; write e.g. 'stall:rank=1:round=2' (kinds: {kinds})")
    return Fault(kind, int(fields["rank"]), int(fields["round"]))


@functools.cache
def _fault() -> Fault | None:
    """The fault this process was asked to inject, read from the environment once."""
    text = os.environ.get(FAULT_ENV, "")
    return parse_fault(text) if text else None


class FaultHook:
    """The round hook: inject the configured fault when it is this owner's and this round's."""

    def start(self, rank: int, world_size: int, say) -> None:
        self.rank = rank

    def before_unify(self, round_: int, unifier: Unifier) -> None:
        fault = _fault()
        if fault is None or fault.rank != self.rank or fault.round != round_:
            return
        if fault.kind == "nan":
            unifier.flat.values.fill_(float("nan"))
            return
        while True:  # stall: a hung owner never reaches the collective; the others must time out
            time.sleep(3600)


if __name__ == "__main__":
    raise SystemExit(cli_main(hooks=[FaultHook()]))
