"""The deployment engine's ClientApp: one owner's FedAvg client (a SuperNode starts it for every message).

Each SuperNode is given `--node-config 'partition-id=I num-partitions=N'`: I is the unify-dist owner whose
share it trains on. The ClientApp process lives one message, so it rebuilds the owner's data and model
each time (timed as setup_s) and keeps Adam's moments in the node's context between rounds, as unify-dist
keeps its optimizer state.
"""

from __future__ import annotations

import functools
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ud_flower.task import Task, load_run_config

app = ClientApp()


@functools.cache  # within one process (a ClientApp serving several messages reuses what it built)
def _task(config: str, sets: str, owner: int, owners: int) -> Task:
    return Task.build(load_run_config(config, sets), owner, owners)


def _task_of(context: Context) -> Task:
    run, node = context.run_config, context.node_config
    return _task(str(run["config"]), str(run["sets"]), int(node["partition-id"]), int(node["num-partitions"]))


@app.train()
def train(msg: Message, context: Context) -> Message:
    if context.run_config.get("task") == "lora7b":
        return _train_adapter(msg, context)
    task = _task_of(context)
    task.load(msg.content["arrays"].to_torch_state_dict())
    if "optimizer" in context.state:
        task.load_optimizer(context.state["optimizer"]["adam"])
    metrics = task.fit(int(msg.content["config"]["server-round"]))
    context.state["optimizer"] = ConfigRecord({"adam": task.optimizer_bytes()})
    metrics["setup_s"] = task.setup_s
    content = RecordDict({"arrays": ArrayRecord(task.model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def _train_adapter(msg: Message, context: Context) -> Message:
    """Adapter-only FedAvg (ud_flower/adapter.py): the adapter in, this owner's moved adapter out."""
    from ud_flower.adapter import train_adapter  # imports benchmarks/: on the path in the LoRA case only

    t0 = time.perf_counter()
    state = msg.content["arrays"].to_torch_state_dict()
    setup = time.perf_counter() - t0
    owner, round_ = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
    state, metrics = train_adapter(state, owner, round_)
    metrics["setup_s"] = setup  # decoding the arrays; the process start is not timed here
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    task = _task_of(context)
    task.load(msg.content["arrays"].to_torch_state_dict())
    metrics = task.evaluate()
    metrics["setup_s"] = task.setup_s
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
