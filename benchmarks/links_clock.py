"""`unify-dist train` with a round hook that clocks each owner's local training (`make bench-links`).

    torchrun ... -m benchmarks.links_clock DIR train --config ... [--set ...]

Every rank appends {"round", "train_start", "train_end"} to DIR/clock_rank{R}.jsonl: training starts at
the first forward pass in training mode after the previous unify (a global forward pre-hook; evaluation
runs in eval mode), and ends when the loop calls the hook's before_unify. Everything else in the round
(unify, evaluation, metrics gather, checkpoint) is the round overhead that benchmarks/links_summary.py
reports. The program and the loop are unchanged: this is a hook like benchmarks/attack.py.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from unify_dist.app.cli import main as cli_main
from unify_dist.unifier import Unifier

__all__ = ["RoundClock", "main"]


class RoundClock:
    """Local training's start and end in every round, on this rank's clock (time.time())."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.waiting, self.train_start = out_dir, True, 0.0

    def start(self, rank: int, world_size: int, say: Callable[[str], None]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / f"clock_rank{rank}.jsonl"
        self.path.unlink(missing_ok=True)
        register_module_forward_pre_hook(self._forward)  # costs one attribute test per module call

    def _forward(self, module: nn.Module, args: object) -> None:
        if self.waiting and module.training:
            self.train_start, self.waiting = time.time(), False

    def before_unify(self, round_: int, unifier: Unifier) -> None:
        end = time.time()
        with self.path.open("a") as f:
            f.write(json.dumps({"round": round_, "train_start": self.train_start, "train_end": end}) + "\n")
        self.waiting = True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-"):
        sys.stderr.write("usage: python -m benchmarks.links_clock DIR train --config ... [--set ...]\n")
        return 2
    return cli_main(argv[1:], hooks=[RoundClock(Path(argv[0]))])


if __name__ == "__main__":
    raise SystemExit(main())
