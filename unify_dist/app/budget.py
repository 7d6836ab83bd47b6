"""How much each owner trains in a round, and what it did: the round's budget and its per-owner record.

Budgets, in the order they win:
  replay    train.replay_steps: the step count an earlier run recorded for this owner in this round;
  steps     train.local_steps: the same number of steps for every owner, whatever its data size;
  seconds   train.round_seconds: every owner trains for that long and stops before a step that would end
            past it (fast owners take more steps instead of waiting in the unify for slow ones). With
            unify.overlap the round's only barrier is the metrics gather after evaluation, so each owner's
            training leaves room for its own evaluation time of the round before (from the records), and
            a slow evaluator keeps nobody waiting either. (Without overlap the unify sits between training
            and evaluation and re-aligns the owners: that room would only move the wait into the unify.)
  epochs    train.local_epochs whole epochs (the paper's round).
Whatever the budget, the steps are the seeded order's first ones (epoch after epoch), so a step count
is all it takes to replay a round: the time budget's counts go into metrics.jsonl, and replaying them
gives the same weights bit for bit. The plan is a pure function of the config, the round and the owner.

The record: every owner's steps, training seconds, evaluation seconds (the model's forward passes in eval
mode) and round wall time, agreed by one small all_gather of int64 (typed tensors: nothing is unpickled),
added to each owner's entry of the round record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from unify_dist.config import TrainConfig
from unify_dist.errors import UserError

__all__ = ["Budget", "plan", "read_replay", "Deadline", "Clock", "agree_counts", "add_to_record"]


@dataclass(frozen=True)
class Budget:
    """One owner's training budget for one round."""

    kind: str
    """replay, steps, seconds or epochs (the module docstring)."""
    steps: int = 0
    """replay and steps: the exact number of local steps."""
    seconds: float = 0.0
    """seconds: train until this much wall time has passed, then stop after the step in progress."""
    epochs: int = 0
    """epochs: whole passes over the owner's data."""


def plan(cfg: TrainConfig, round_: int, owner: str, replay: dict[int, dict[str, int]] | None = None,
         records: Sequence[dict[str, Any]] = (), evaluation_room: bool = False) -> Budget:  # fmt: skip
    """The budget of `owner` (its name) in `round_`: a pure function of the config, the round, the owner and
    the records so far (state: checkpointed); with `evaluation_room` (unify.overlap) a time budget leaves
    room for the owner's last evaluation time."""
    if replay is not None:
        steps = replay.get(round_, {}).get(owner)
        if steps is None:
            rounds = sorted(replay)
            raise UserError(
                f"train.replay_steps = '{cfg.replay_steps}' records no step count for owner '{owner}' in round "
                f"{round_} (it has rounds {rounds[0] if rounds else '-'}..{rounds[-1] if rounds else '-'}); replay a run "
                "with the same owners, or set train.max_rounds to its last round"
            )
        return Budget("replay", steps=steps)
    if cfg.local_steps:
        return Budget("steps", steps=cfg.local_steps)
    if cfg.round_seconds:
        before = [o for o in (records[-1]["owners"] if records and evaluation_room else []) if o.get("name") == owner]
        evaluation = before[0].get("eval_s", 0.0) if before else 0.0
        return Budget("seconds", seconds=max(cfg.round_seconds - evaluation, 0.0))
    return Budget("epochs", epochs=cfg.local_epochs)


def read_replay(path: str) -> dict[int, dict[str, int]]:
    """round -> owner name -> steps, from a metrics.jsonl written by this program (JSON lines, never pickle)."""
    out: dict[int, dict[str, int]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            out[int(record["round"])] = {
                str(o.get("name", f"rank{o['rank']}")): int(o["steps"]) for o in record["owners"]
            }  # fmt: skip
        except (ValueError, KeyError, TypeError):
            raise UserError(
                f"train.replay_steps = '{path}', line {n}: not a round record with every owner's 'steps'; give the "
                "metrics.jsonl of a run made with this version (it records each owner's steps)"
            ) from None
    return out


class Deadline:
    """A time budget's stop rule, asked after every step: stop when the next step, at this round's mean step
    time, would end past `seconds` from now. Every owner takes at least one step. (Stopping only once the time
    has passed overshoots by up to one step, and a slow owner's step is long: the others wait for it.)"""

    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.end = self.start + seconds
        self.steps = 0
        self.done = False

    def __call__(self) -> bool:
        self.steps += 1
        now = time.perf_counter()
        self.done = now + (now - self.start) / self.steps > self.end
        return self.done


class Clock:
    """This owner's round wall time, training and evaluation time, in microseconds (round_s, train_s, eval_s).

    Evaluation is the model's forward passes in eval mode (hooks on the model: two clock reads a batch), so it
    counts this owner's own work, never its wait for the others in the collectives around it.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.start = time.perf_counter()
        self.train_us = 0
        self.eval_s = 0.0
        self._began = 0.0
        self._hooks = [model.register_forward_pre_hook(self._before), model.register_forward_hook(self._after)]

    def _before(self, module: torch.nn.Module, args: Any) -> None:
        if not module.training:
            self._began = time.perf_counter()

    def _after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not module.training:
            self.eval_s += time.perf_counter() - self._began

    def counts(self, steps: int) -> list[int]:
        """[steps, train_us, round_us, eval_us] for agree_counts; the hooks come off: the round is over."""
        for hook in self._hooks:
            hook.remove()
        return [steps, self.train_us, int((time.perf_counter() - self.start) * 1e6), int(self.eval_s * 1e6)]

    def trained(self) -> None:
        """Local training has ended (it is the round's first work, so it began at the round's start)."""
        self.train_us = int((time.perf_counter() - self.start) * 1e6)



def agree_counts(values: list[int], device: torch.device, reducer: Any = None,
                 group: dist.ProcessGroup | None = None) -> list[list[int]]:  # fmt: skip
    """Every owner's small int vector, rank order, on every rank: one all_gather of int64. A collective.

    `device`: where the backend's collectives take tensors (the GPU with NCCL). With trust on (`reducer`,
    the sealed ring) it travels sealed, as every figure that describes an owner.
    """
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    if reducer is None:
        dist.all_gather(out, mine, group=group)
    else:
        reducer.all_gather(out, mine)
    return [t.tolist() for t in out]  # host sync


def add_to_record(record: dict[str, Any], gathered: list[list[int]]) -> None:
    """Each owner's Clock.counts() into its entry: steps, train_s, round_s, eval_s."""
    for owner, (steps, train_us, round_us, eval_us) in zip(record["owners"], gathered):
        owner["steps"] = steps
        owner["train_s"] = train_us / 1e6
        owner["round_s"] = round_us / 1e6
        owner["eval_s"] = eval_us / 1e6
