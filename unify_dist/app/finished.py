"""A run directory whose run is over: say so, show what it recorded, and name what trains again.

Resuming a finished run would train nothing: without this, a second `make demo` printed "resumed from
round 6" and the final line, and a newcomer saw nothing happen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unify_dist.app.config import RunConfig
from unify_dist.app.console import Reporter

__all__ = ["is_finished", "say_finished"]


def is_finished(cfg: RunConfig, records: list[dict[str, Any]], start: int) -> bool:
    """The resumed run has nothing left to do: every round ran, or the target was reached (same on every rank)."""
    if start == 0:
        return False
    if start >= cfg.train.max_rounds:
        return True
    target = cfg.train.target_accuracy
    last = records[-1] if records else {}
    return bool(target) and (last.get("min_unified_val_acc") or 0.0) >= target


def say_finished(cfg: RunConfig, records: list[dict[str, Any]], start: int, out: Reporter) -> None:
    """The recorded table, then one line: finished, where, and the settings that train again."""
    for record in records:
        out.round_row(record)
    why = (f"all train.max_rounds = {cfg.train.max_rounds} rounds ran" if start >= cfg.train.max_rounds
           else f"round {start} reached train.target_accuracy = {cfg.train.target_accuracy:.2%}")  # fmt: skip
    out.info(
        f"this run is finished ({why}; the table above is its record in {Path(cfg.output.dir) / 'metrics.jsonl'}): "
        "nothing to train. To train again, pass --set output.resume=false (starts over here, deleting its "
        "checkpoints), choose a new --set output.dir=..., or continue with a larger --set train.max_rounds=N"
    )
