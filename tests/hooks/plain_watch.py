"""A watch on gloo's own (plaintext) collectives: the program plus a hook that records each one called
once the rounds have begun, to prove that with trust on nothing data-derived bypasses the sealed ring.

The tests launch the program through this module (`torchrun ... -m tests.hooks.plain_watch train ...`)
with UNIFY_DIST_PLAIN_LOG set to a folder: at the end of a run each rank writes RANK.json there, a list
of [collective, dtype, elements] for every torch.distributed collective called from round 1's unify on
(round 1's local training is over by then; round 2's, with SCAFFOLD's all_reduce, is watched), or, with
UNIFY_DIST_PLAIN_FROM=start, from the end of admission on (owners, data, consistency, initial weights,
resume: the whole run after admission). The sealed ring's point-to-point messages (isend / irecv) are
not collectives and are not recorded.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch.distributed as dist

from unify_dist.app.cli import main as cli_main
from unify_dist.unifier import Unifier

__all__ = ["FROM_ENV", "PLAIN_ENV", "PlainWatch"]

PLAIN_ENV = "UNIFY_DIST_PLAIN_LOG"
FROM_ENV = "UNIFY_DIST_PLAIN_FROM"
WATCHED = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter", "all_to_all",
           "all_gather_object", "broadcast_object_list", "gather", "scatter", "reduce")  # fmt: skip


class PlainWatch:
    """The round hook: from the first unify on, record every plaintext collective this rank calls."""

    def __init__(self) -> None:
        self.rank, self.seen, self.armed = None, [], False

    def start(self, rank: int, world_size: int, say) -> None:
        self.rank = rank
        for name in WATCHED:
            setattr(dist, name, self._recording(name, getattr(dist, name)))
        self.armed = os.environ.get(FROM_ENV) == "start"  # hooks start right after admission

    def before_unify(self, round_: int, unifier: Unifier) -> None:
        self.armed = True

    def _recording(self, name: str, collective):
        @functools.wraps(collective)
        def recorded(*args, **kwargs):
            if self.armed:
                tensor = args[1] if name == "all_gather" else args[0] if args else None
                described = [str(tensor.dtype), tensor.numel()] if hasattr(tensor, "numel") else ["object", 0]
                self.seen.append([name, *described])
            return collective(*args, **kwargs)

        return recorded

    def save(self) -> None:
        folder = os.environ.get(PLAIN_ENV)
        if folder and self.rank is not None:
            (Path(folder) / f"{self.rank}.json").write_text(json.dumps(self.seen))


if __name__ == "__main__":
    watch = PlainWatch()
    code = cli_main(hooks=[watch])
    watch.save()
    raise SystemExit(code)
