"""A round gate for tests with owners that come and go: hold an owner before a unify until the group changes.

Tests must synchronise on events, never on how fast rounds happen to run. An elastic membership test
that starts a returning owner "in time for round 3" races the rounds: on a loaded machine rounds 3-6
could all finish before the returning owner's agent has imported torch. This hook turns the race into an
event: the program is launched through this module (`torchrun ... -m tests.hooks.gate train ...`), and

    UNIFY_DIST_HOLD="round=3:below=3"   before the unify of any round >= 3, while fewer than 3 owners are
                                        in the group, wait for torchrun to restart this worker with a
                                        bigger group (an owner joining the rendezvous does exactly that)
    UNIFY_DIST_HOLD="round=2:below=99"  (any group is too small) hold before round 2's unify until killed

A hold ends only by the process being restarted or killed; after UNIFY_DIST_HOLD_LIMIT_S seconds (default
300) it raises instead, so a test whose event never comes fails with a reason instead of hanging.
Not a feature for users; when the variable is unset, the hook does nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from unify_dist.app.cli import main as cli_main
from unify_dist.unifier import Unifier

__all__ = ["HOLD_ENV", "Hold", "parse_hold", "GateHook"]

HOLD_ENV = "UNIFY_DIST_HOLD"


@dataclass(frozen=True)
class Hold:
    round: int
    """The first round whose unify is held."""
    below: int
    """Held while the group has fewer owners than this."""


def parse_hold(text: str) -> Hold:
    """Parse 'round=N:below=W'; a malformed value is a bug in the test, so it raises ValueError."""
    fields = dict(p.split("=", 1) for p in text.strip().split(":") if "=" in p)
    if set(fields) != {"round", "below"}:
        raise ValueError(f"{HOLD_ENV}='{text}' is malformed; write e.g. 'round=3:below=3'")
    return Hold(int(fields["round"]), int(fields["below"]))


class GateHook:
    """The round hook: hold before the unify while the group is smaller than asked."""

    def __init__(self) -> None:
        text = os.environ.get(HOLD_ENV, "")
        self.hold = parse_hold(text) if text else None
        self.limit_s = float(os.environ.get("UNIFY_DIST_HOLD_LIMIT_S", "300"))

    def start(self, rank: int, world_size: int, say) -> None:
        self.world_size, self.say = world_size, say

    def before_unify(self, round_: int, unifier: Unifier) -> None:
        hold = self.hold
        if hold is None or round_ < hold.round or self.world_size >= hold.below:
            return
        self.say(f"gate: holding round {round_} with {self.world_size} owner(s) until the group changes")
        time.sleep(self.limit_s)  # torchrun's restart (a new member) or a kill ends this process first
        raise RuntimeError(f"gate: round {round_} held {self.limit_s:g} s and the group never changed")


if __name__ == "__main__":
    raise SystemExit(cli_main(hooks=[GateHook()]))
