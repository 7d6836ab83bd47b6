"""All console output goes through one Reporter: rank 0 talks, the other ranks stay quiet.

Library code never writes `if rank == 0: print(...)`; it calls the reporter, which knows who may speak.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["Reporter"]

_COLUMNS = 12  # fixed width so the one-row tables printed each round line up like one long table


class Reporter:
    def __init__(self, rank: int, progress: bool = True, all_ranks: bool = False):
        self.rank = rank
        self.enabled = rank == 0 or all_ranks
        self.show_progress = progress and self.enabled and rank == 0
        self.console = Console(highlight=False, soft_wrap=True)
        if not self.console.is_terminal:  # logs and pipes: never squeeze the table into 80 columns
            self.console = Console(highlight=False, soft_wrap=True, width=240)
        self._prefix = f"[rank {rank}] " if all_ranks else ""
        self._header_done = False

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(self._prefix + message)

    def warn(self, message: str) -> None:
        """Warnings reach stderr from every rank: one owner's trouble must not be hidden."""
        sys.stderr.write(f"unify-dist: warning (rank {self.rank}): {message}\n")  # one write: lines stay whole
        sys.stderr.flush()

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        """Yield an `advance()` callable; a live bar on rank 0 when attached to a terminal."""
        if not self.show_progress or not self.console.is_terminal:
            yield lambda: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda: bar.advance(task)

    def round_row(self, record: dict[str, Any]) -> None:
        """One table row per round: owners' local accuracy, unified accuracy, unify time, digest."""
        if not self.enabled:
            return
        owners = record["owners"]
        table = Table(show_header=not self._header_done, box=None, pad_edge=False, expand=False)
        table.add_column("round", justify="right", width=6, no_wrap=True)
        for o in owners:
            table.add_column(f"local o{o['rank']}", justify="right", width=_COLUMNS)
        table.add_column("unified val", justify="right", width=_COLUMNS)
        table.add_column("unified test", justify="right", width=_COLUMNS)
        for name in record.get("candidates", {}):
            table.add_column(f"test {name}", justify="right", width=_COLUMNS)
        if record["rule"] == "auto":
            table.add_column("picked", width=_COLUMNS)
        table.add_column("unify ms", justify="right", width=9)  # fastest owner: the others also waited for it
        table.add_column("digest", width=17)
        cells = [str(record["round"])]
        cells += [_pct(o["local_val_acc"]) for o in owners]
        cells += [_pct(record["min_unified_val_acc"]), _pct(record["unified_test_acc"])]
        cells += [_pct(c["test_acc"]) for c in record.get("candidates", {}).values()]
        cells += [record["rule_used"]] if record["rule"] == "auto" else []
        cells += [f"{1000 * min(o['unify_s'] for o in owners):.1f}", record["digest"]]
        table.add_row(*cells)
        self.console.print(table)
        self._header_done = True


def _pct(x: float | None) -> str:
    """An accuracy, or n/a where there was nothing to measure (an empty split, local metrics off)."""
    return "n/a" if x is None else f"{x:.2%}"
