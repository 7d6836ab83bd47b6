"""The deployment engine's ServerApp: FedAvg (flwr.serverapp.strategy) that records every round's timings.

Run config keys (pyproject.toml): config, sets (unify-dist's config and overrides), rounds, target, out.
Once the global test accuracy reaches `target`, the remaining rounds send nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from ud_flower.task import RoundLog, initial_state, load_run_config

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg, unchanged, with each round's times and the clients' own timings written to a RoundLog."""

    def __init__(self, log: RoundLog, train_only: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.log, self.train_only = log, train_only  # train_only: no evaluation, the round ends at aggregation

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.log.reached:
            return []
        self.log.begin()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.log.trained([dict(m.content["metrics"]) for m in replies if not m.has_error()])
        result = super().aggregate_train(server_round, replies)
        if self.train_only:
            self.log.evaluated(server_round, [])  # the round's record, ended once the average is made
        return result

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return [] if self.log.reached else super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        clients = [dict(m.content["metrics"]) for m in replies if not m.has_error()]
        if clients:
            self.log.evaluated(server_round, clients)
        return super().aggregate_evaluate(server_round, replies)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = context.run_config
    if run.get("task") == "lora7b":
        return _adapter_main(grid, run)
    cfg = load_run_config(str(run["config"]), str(run["sets"]))
    log = RoundLog(str(run["out"]), float(run["target"]))
    strategy = TimedFedAvg(log, fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=2, min_evaluate_nodes=2,
                           min_available_nodes=2)  # fmt: skip
    _wait_for(grid, 2)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_state(cfg)), num_rounds=int(run["rounds"]))
    (log.path.parent / "done").touch()  # the script waits for it


def _adapter_main(grid: Grid, run) -> None:
    """Adapter-only FedAvg over `nodes` owners (ud_flower/adapter.py), no federated evaluation."""
    from ud_flower.adapter import initial_adapter  # imports benchmarks/: on the path in the LoRA case only

    nodes = int(run["nodes"])
    log = RoundLog(str(run["out"]), 0.0)
    strategy = TimedFedAvg(log, train_only=True, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes,
                           min_available_nodes=nodes)  # fmt: skip
    _wait_for(grid, nodes)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_adapter()), num_rounds=int(run["rounds"]))
    (log.path.parent / "done").touch()


def _wait_for(grid: Grid, nodes: int) -> None:
    while len(list(grid.get_node_ids())) < nodes:  # every SuperNode connected before round 1's clock starts
        time.sleep(0.2)
