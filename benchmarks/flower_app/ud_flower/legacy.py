"""The same FedAvg through Flower's legacy API (flwr.server.start_server / flwr.client.start_client).

Deprecated since flwr 1.13 and still present in 1.42: one long-lived client process per owner over a
gRPC stream, no SuperLink. `make bench-links` measures it beside the deployment engine.

    python -m ud_flower.legacy server --address HOST:PORT --config C --sets S --rounds R --out DIR
    python -m ud_flower.legacy client --address HOST:PORT --config C --sets S --partition I --partitions N
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from flwr.client import NumPyClient, start_client
from flwr.common import ndarrays_to_parameters
from flwr.server import ServerConfig, start_server
from flwr.server.strategy import FedAvg

from ud_flower.task import RoundLog, Task, initial_state, load_run_config


class Owner(NumPyClient):
    """One owner's client: lives the whole run, so its model, data and Adam state stay in memory."""

    def __init__(self, task: Task):
        self.task = task
        self.keys = list(task.model.state_dict())

    def _load(self, parameters: list[np.ndarray]) -> None:
        self.task.load({k: torch.from_numpy(np.asarray(v)) for k, v in zip(self.keys, parameters)})

    def _arrays(self) -> list[np.ndarray]:
        return [v.detach().cpu().numpy() for v in self.task.model.state_dict().values()]

    def get_parameters(self, config):
        return self._arrays()

    def fit(self, parameters, config):
        self._load(parameters)
        metrics = self.task.fit(int(config["server-round"]))
        return self._arrays(), int(metrics.pop("num-examples")), metrics

    def evaluate(self, parameters, config):
        self._load(parameters)
        metrics = self.task.evaluate()
        return 0.0, int(metrics.pop("num-examples")), metrics


class TimedFedAvg(FedAvg):
    """The legacy FedAvg, unchanged, with each round's times written to a RoundLog."""

    def __init__(self, log: RoundLog, **kwargs):
        super().__init__(**kwargs)
        self.log = log

    def configure_fit(self, server_round, parameters, client_manager):
        if self.log.reached:
            return []
        pairs = super().configure_fit(server_round, parameters, client_manager)  # waits for the clients
        self.log.begin()
        return pairs

    def aggregate_fit(self, server_round, results, failures):
        self.log.trained([dict(res.metrics) for _, res in results])
        return super().aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return [] if self.log.reached else super().configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        clients = [dict(res.metrics) for _, res in results]
        if clients:
            self.log.evaluated(server_round, clients)
        return super().aggregate_evaluate(server_round, results, failures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ud_flower.legacy", description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("server", "client"))
    parser.add_argument("--address", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--sets", default="")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.0)
    parser.add_argument("--out", default="runs/flower_legacy")
    parser.add_argument("--partition", type=int, default=0)
    parser.add_argument("--partitions", type=int, default=2)
    args = parser.parse_args(argv)
    cfg = load_run_config(args.config, args.sets)
    if args.role == "client":
        start_client(server_address=args.address, client=Owner(Task.build(cfg, args.partition, args.partitions)).to_client())
        return 0
    log = RoundLog(args.out, args.target)
    initial = ndarrays_to_parameters([v.numpy() for v in initial_state(cfg).values()])
    strategy = TimedFedAvg(log, initial_parameters=initial, on_fit_config_fn=lambda r: {"server-round": r},
                           min_fit_clients=2, min_evaluate_clients=2, min_available_clients=2)  # fmt: skip
    start_server(server_address=args.address, config=ServerConfig(num_rounds=args.rounds), strategy=strategy)
    (log.path.parent / "done").touch()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
