"""Round checkpoints that survive a crash mid-write, and the JSONL metrics log.

Each owner writes its own checkpoints (owners may sit on different machines with different disks), under
its name (unify_dist.app.owners: rank{R} when owners are not named): RUN_DIR/checkpoints/NAME/round_00007.pt. A file is written to a temporary name, fsynced, then renamed,
so a reader sees either the old set or the complete new file. Everything is loaded with
weights_only=True: a checkpoint holds tensors, numbers, strings and lists, never pickled code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_atomic", "Checkpointer", "MetricsLog"]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to `path` so that a crash at any instant leaves either no file or a whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)  # the rename itself must reach the disk too


class Checkpointer:
    """One owner's round checkpoints: save, keep the newest `keep`, find the newest readable ones."""

    def __init__(self, run_dir: Path, owner: str, keep: int, warn: Callable[[str], None], writer: bool = True):
        self.dir = run_dir / "checkpoints" / owner
        self.keep, self.warn = keep, warn
        self.writer = writer
        """False: another process of the same owner (its leader) writes this owner's files; this one only reads."""

    def path(self, round_: int) -> Path:
        return self.dir / f"round_{round_:05d}.pt"

    def rounds(self) -> list[int]:
        """Rounds with a checkpoint file present, newest first (not yet checked for corruption)."""
        if not self.dir.is_dir():
            return []
        found = [int(p.stem.split("_")[1]) for p in self.dir.glob("round_*.pt") if p.stem.split("_")[1].isdigit()]
        return sorted(found, reverse=True)

    def save(self, round_: int, state: dict[str, Any]) -> None:
        if not self.writer:
            return
        save_atomic({**state, "round": round_}, self.path(round_))
        for old in self.rounds()[self.keep :]:
            self.path(old).unlink(missing_ok=True)
        for tmp in self.dir.glob(".round_*.pt.tmp*"):  # left by a process killed mid-write; only we write here
            if not tmp.name.endswith(f".tmp{os.getpid()}"):
                tmp.unlink(missing_ok=True)

    def load(self, round_: int) -> dict[str, Any] | None:
        """The checkpoint of `round_`, or None (with a warning) if it is unreadable."""
        try:
            state = torch.load(self.path(round_), map_location="cpu", weights_only=True)
            if state.get("round") != round_:
                raise ValueError(f"file says round {state.get('round')}")
            return state
        except Exception as e:  # truncated zip, bad pickle, wrong content: all mean 'use an older one'
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""  # warnings stay one line
            self.warn(f"checkpoint {self.path(round_)} is unreadable ({type(e).__name__}: {first}); using an older one")
            return None

    def readable_rounds(self) -> list[int]:
        return list(self.readable())

    def readable(self) -> dict[int, list[str]]:
        """{round: the owners who took part in it} for every readable checkpoint, newest first."""
        found = {}
        for r in self.rounds():
            state = self.load(r)
            if state is not None:
                records = state.get("metrics") or [{}]
                found[r] = list(records[-1].get("participants", []))
        return found

    def clear(self) -> None:
        if not self.writer:
            return
        for r in self.rounds():
            self.path(r).unlink(missing_ok=True)


class MetricsLog:
    """metrics.jsonl: one JSON object per round, appended and fsynced by rank 0 only."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def keep_until(self, round_: int) -> None:
        """Drop lines of rounds after `round_` (a resumed run rewrites them)."""
        if not self.enabled or not self.path.exists():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("round", 0) <= round_]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
