"""What a Flower client and server of `make bench-links` do, built from unify-dist's own parts.

The owner's share (unify_dist.data), the model (unify_dist.models), the optimizer, learning rate, batch
size, epoch order and accuracy counts (unify_dist.train) are the ones `unify-dist train` uses with the
same config and --set overrides; only the synchronisation differs (FedAvg through a server). Both Flower
APIs (the deployment engine's ClientApp/ServerApp and the legacy start_client/start_server) call these.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from unify_dist.app.config import RunConfig, load_config
from unify_dist.data import TORCHVISION_SETS, Owner, OwnerData, load_owner_data, prepare_dataset
from unify_dist.models import build_model
from unify_dist.train import count_correct, epoch_generator, make_optimizer, per_class_correct, round_lr, set_lr, train_epoch

__all__ = ["Owner", "Task", "load_run_config", "initial_state", "RoundLog"]


def load_run_config(config: str, sets: str) -> RunConfig:
    """unify-dist's config with its --set overrides (`sets`: 'a.b=1;c.d=x'), checked as the program checks it."""
    return load_config(config, [s for s in sets.split(";") if s.strip()])


def _model(cfg: RunConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    torch.manual_seed(cfg.train.seed)  # as unify_dist.app.loop: the same initial weights as unify-dist's rank 0
    return build_model(cfg.model, in_shape, num_classes)


def initial_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The server's starting weights, without loading any data (the dataset's shape comes from its table)."""
    channels, side, classes = TORCHVISION_SETS[cfg.data.dataset][2:5]
    return _model(cfg, (channels, side, side), classes).state_dict()


@dataclass
class Task:
    """One owner's data, model and optimizer; `setup_s` is what building them cost (a fresh ClientApp pays it)."""

    cfg: RunConfig
    owner: int
    data: OwnerData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    setup_s: float

    @classmethod
    def build(cls, cfg: RunConfig, owner: int, owners: int) -> Task:
        t0 = time.perf_counter()
        torch.set_num_threads(cfg.train.threads or 1)
        prepare_dataset(cfg.data)
        data = load_owner_data(cfg.data, Owner(owner, owners, cfg.train.seed, f"rank{owner}"), torch.device("cpu"))
        model = _model(cfg, data.in_shape, data.num_classes)
        return cls(cfg, owner, data, model, make_optimizer(model, cfg.train), time.perf_counter() - t0)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        # FedAvg averages integer buffers (BatchNorm's counters) as floats: cast back to each buffer's dtype.
        own = self.model.state_dict()
        self.model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})

    def fit(self, round_: int) -> dict[str, float]:
        """One local epoch in unify-dist's order for this round; returns its timings and loss."""
        cfg = self.cfg.train
        set_lr(self.optimizer, round_lr(cfg, round_))
        start, t0 = time.time(), time.perf_counter()
        loss = train_epoch(self.model, self.optimizer, self.data.train, cfg.batch_size, epoch_generator(cfg.seed, round_, self.owner, 0))
        return {"train_s": time.perf_counter() - t0, "train_start": start, "train_end": time.time(), "loss": loss,
                "num-examples": len(self.data.train)}  # fmt: skip

    def evaluate(self) -> dict[str, float]:
        """The work unify-dist does on a unified model: validation counts and per-class test counts."""
        t0 = time.perf_counter()
        val_c, val_t = count_correct(self.model, self.data.val)
        correct, total = per_class_correct(self.model, self.data.test, self.data.num_classes)
        return {"val_correct": val_c, "val_total": val_t, "test_correct": sum(correct), "test_total": sum(total),
                "eval_s": time.perf_counter() - t0, "num-examples": sum(total)}  # fmt: skip

    def optimizer_bytes(self) -> bytes:
        """Adam's moments, for a ClientApp that lives one round (unify-dist keeps them: optimizer_state = keep)."""
        buf = io.BytesIO()
        torch.save(self.optimizer.state_dict(), buf)
        return buf.getvalue()

    def load_optimizer(self, blob: bytes) -> None:
        self.optimizer.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))


class RoundLog:
    """The server's record of each round, one JSON line per round in OUT/rounds.jsonl (read by links_summary).

    A round runs from sending the global model for training to the end of the evaluation replies; the
    clients' own timings ride in their replies' metrics.
    """

    def __init__(self, out: str, target: float):
        self.path = Path(out) / "rounds.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self.target, self.reached, self.start, self.train = target, False, 0.0, []

    def begin(self) -> None:
        self.start = time.time()

    def trained(self, clients: list[dict[str, float]]) -> None:
        self.trained_at, self.train = time.time(), clients

    def evaluated(self, round_: int, clients: list[dict[str, float]]) -> float:
        """Write the round's record; returns the global test accuracy (every client's counts summed)."""
        acc = sum(c["test_correct"] for c in clients) / max(sum(c["test_total"] for c in clients), 1)
        vals = [c["val_correct"] / c["val_total"] for c in clients if c["val_total"]]
        end = time.time()
        record = {"round": round_, "start": self.start, "trained": self.trained_at, "end": end, "time": end,
                  "unified_test_acc": acc, "min_val_acc": min(vals, default=None), "clients": self.train,
                  "eval": clients, "pid": os.getpid()}  # fmt: skip
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.reached = self.reached or bool(self.target and acc >= self.target)
        return acc
