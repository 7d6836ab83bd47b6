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

    def __init__(self, log: RoundLog, **kwargs):
        super().__init__(**kwargs)
        self.log = log

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.log.reached:
            return []
        self.log.begin()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.log.trained([dict(m.content["metrics"]) for m in replies if not m.has_error()])
        return super().aggregate_train(server_round, replies)

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
    cfg = load_run_config(str(run["config"]), str(run["sets"]))
    log = RoundLog(str(run["out"]), float(run["target"]))
    strategy = TimedFedAvg(log, fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=2, min_evaluate_nodes=2,
                           min_available_nodes=2)  # fmt: skip
    while len(list(grid.get_node_ids())) < 2:  # both SuperNodes connected before round 1's clock starts
        time.sleep(0.2)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_state(cfg)), num_rounds=int(run["rounds"]))
    (log.path.parent / "done").touch()  # the script waits for it
