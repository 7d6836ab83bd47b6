"""`make bench-compress`: a compressed unify against plain avg over one slow link, measured in the same run.

    torchrun ... -m benchmarks.compress_links [--rate 20mbit] [--rounds 3] [--model resnet18] [--out FILE]

What launch/netns_bench_compress.sh runs in each of two network namespaces joined by a tc-tbf link of
RATE each way. Each owner holds one model per mode (none, bf16, int8: the same start), and every round
each mode in turn takes a seeded step (noise standing in for training, different per owner) and
unifies with avg; then every owner's digest is compared (outside the clocks). Per unify, on each owner: the unify's wall time (the digest
check excluded), the time inside its wire calls (gloo's all_reduce, unify_dist.exchange's gather and
pairwise sum) and how many there were, and the bytes its veth sent (from the namespace's own
/sys/class/net counters: payload, headers and the ACKs of what it received). The rest of the unify is
local work: (de)compression, error feedback, update space. Rank 0 prints medians over rounds of the
slowest owner, the link's floor (wire bytes at RATE) and the ratios bf16 / plain and int8 / plain
against the issue's targets, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from unify_dist import exchange
from unify_dist.collectives import tail_size, verify_identical
from unify_dist.config import ModelConfig, UnifyConfig
from unify_dist.flat import FlatState
from unify_dist.models import build_model
from unify_dist.unifier import Unifier
from unify_dist.wire import gather_floats

__all__ = ["main", "summarise", "rate_bits", "WireClock", "TARGETS"]

MODES = ("none", "bf16", "int8")
TARGETS = {"bf16": 0.55, "int8": 0.30}
"""Issue 19: a compressed unify's time over plain avg's at 20 Mbit/s, at most."""
FIELDS = ("unify_s", "wire_s", "calls", "tx_bytes", "estimated_bytes")


class WireClock:
    """Time spent inside the wire calls a unify makes, and their count, while in a `with` block.

    Wraps the module attributes the collective layer calls (torch.distributed's all_reduce and
    all_gather, exchange's all_gather, all_to_all and pairwise_sum_); a call made inside another
    (pairwise_sum_'s gather) counts once. An async exchange (the sharded 16-bit sum of 4 or more owners)
    counts only while it is started, not while it is waited on: there wire_s is too small and local_s
    too large, and only unify_s is the whole truth.
    """

    NAMES = ((dist, "all_reduce"), (dist, "all_gather"), (exchange, "all_gather"), (exchange, "all_to_all"),
             (exchange, "pairwise_sum_"))  # fmt: skip

    def __init__(self) -> None:
        self.seconds, self.calls, self._depth, self._saved = 0.0, 0, 0, []

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def __enter__(self) -> "WireClock":
        for module, name in self.NAMES:
            original = getattr(module, name)
            self._saved.append((module, name, original))
            setattr(module, name, self._timed(original))
        return self

    def __exit__(self, *exc: object) -> None:
        for module, name, original in self._saved:
            setattr(module, name, original)
        self._saved = []

    def _timed(self, fn):
        def timed(*args, **kwargs):
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - start
                    self.calls += 1

        return timed


def rate_bits(rate: str) -> float:
    """tc's rate notation ('20mbit', '100Mbit', '512kbit', '1gbit') in bits per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.strip().lower())
    if not m:
        raise ValueError(f"rate '{rate}' is not in tc's notation; write it as e.g. 20mbit or 512kbit")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def _tx_bytes(dev: str) -> int:
    """What this namespace's veth has sent so far (-1 where there is no such device, e.g. loopback runs)."""
    try:
        return int(Path(f"/sys/class/net/{dev}/statistics/tx_bytes").read_text())
    except OSError:
        return -1


def _case(mode: str, model_name: str, world: int) -> Unifier:
    torch.manual_seed(0)  # every owner and every mode starts from the same weights
    model = build_model(ModelConfig(name=model_name), 1, 10, 28)
    flat = FlatState(model, tail=tail_size(world, model))
    return Unifier.over(flat, UnifyConfig(compress=mode))


def measure(model_name: str, rounds: int, dev: str) -> dict[str, list[list[float]]]:
    """This owner's records per mode: [unify_s, wire_s, calls, tx_bytes, estimated_bytes] per round. A collective."""
    rank, world = dist.get_rank(), dist.get_world_size()
    unifiers = {mode: _case(mode, model_name, world) for mode in MODES}
    records: dict[str, list[list[float]]] = {mode: [] for mode in MODES}
    with WireClock() as clock:
        for round_ in range(rounds):
            for mode, unifier in unifiers.items():
                step = torch.Generator().manual_seed(1000 * round_ + rank)
                values = unifier.flat.values
                values.add_(torch.randn(values.numel(), generator=step).mul_(1e-3))  # this owner's "training"
                dist.barrier()  # every owner starts the unify together, as after a round's training
                clock.reset()
                sent = _tx_bytes(dev)
                outcome = unifier.unify(verify=False)
                sent = _tx_bytes(dev) - sent if sent >= 0 else -1
                records[mode].append([outcome.seconds, clock.seconds, clock.calls, sent, outcome.bytes_sent])
                verify_identical(unifier.flat)  # collective, outside the clock: DivergenceError if any owner differs
    return records


def summarise(everyone: list[dict[str, list[list[float]]]], rate: float) -> dict[str, Any]:
    """Every owner's records -> medians over rounds of the slowest owner, the link floor, and the ratios."""
    out: dict[str, Any] = {"modes": {}, "ratios": {}}
    for mode in MODES:
        rounds = len(everyone[0][mode])
        per_round = [[dict(zip(FIELDS, owner[mode][r])) for owner in everyone] for r in range(rounds)]
        slowest = [max(o["unify_s"] for o in owners) for owners in per_round]
        wire = [max(o["wire_s"] for o in owners) for owners in per_round]
        local = [max(o["unify_s"] - o["wire_s"] for o in owners) for owners in per_round]
        tx = [max(o["tx_bytes"] for o in owners) for owners in per_round]
        out["modes"][mode] = {
            "unify_s": statistics.median(slowest),
            "unify_s_rounds": slowest,
            "wire_s": statistics.median(wire),
            "local_s": statistics.median(local),
            "wire_calls": int(per_round[0][0]["calls"]),
            "tx_bytes": int(statistics.median(tx)),
            "estimated_bytes": int(per_round[0][0]["estimated_bytes"]),
            "link_floor_s": statistics.median(tx) * 8 / rate if min(tx) >= 0 else None,
            "wire_mbit_s": statistics.median(tx) * 8 / statistics.median(wire) / 1e6 if min(tx) >= 0 else None,
        }
    plain = out["modes"]["none"]["unify_s"]
    for mode, bound in TARGETS.items():
        ratio = out["modes"][mode]["unify_s"] / plain
        out["ratios"][f"{mode}/none"] = {"ratio": ratio, "target": bound, "met": ratio <= bound}
    return out


def _print(summary: dict[str, Any], rate: str, rounds: int, model: str) -> None:
    print(f"compressed unify over a {rate} link, {model}, {summary['owners']} owners, medians of {rounds} rounds "
          "(slowest owner):")  # fmt: skip
    print(f"{'compress':9s} {'unify':>8s} {'wire':>8s} {'local':>7s} {'calls':>5s} {'MB sent':>8s} {'floor':>8s} {'Mbit/s':>7s}")
    for mode, m in summary["modes"].items():
        floor = f"{m['link_floor_s']:.2f} s" if m["link_floor_s"] is not None else "-"
        mbit = f"{m['wire_mbit_s']:.1f}" if m["wire_mbit_s"] is not None else "-"
        print(f"{mode:9s} {m['unify_s']:6.2f} s {m['wire_s']:6.2f} s {m['local_s']:5.2f} s {m['wire_calls']:5d} "
              f"{m['tx_bytes'] / 1e6:8.2f} {floor:>8s} {mbit:>7s}")  # fmt: skip
    for name, r in summary["ratios"].items():
        print(f"{name}: {r['ratio']:.3f} (target <= {r['target']}: {'met' if r['met'] else 'MISSED'})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compress_links", description=__doc__.splitlines()[0])
    p.add_argument("--rate", default="20mbit", help="the link's tc rate, for the floor (default 20mbit)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--out", default="results/bench_compress.json")
    args = p.parse_args(argv)
    try:
        rate = rate_bits(args.rate)
    except ValueError as e:
        print(f"compress_links: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun's environment
    try:
        records = measure(args.model, args.rounds, os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
        flat = [v for mode in MODES for row in records[mode] for v in row]
        everyone = [_unflatten(v, args.rounds) for v in gather_floats(flat)]  # collective
        if dist.get_rank() == 0:
            summary = summarise(everyone, rate) | {"rate": args.rate, "model": args.model, "rounds": args.rounds,
                                                   "owners": len(everyone), "load": os.getloadavg()}  # fmt: skip
            _print(summary, args.rate, args.rounds, args.model)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
            print(f"written to {args.out}")
    finally:
        dist.destroy_process_group()
    return 0


def _unflatten(values: list[float], rounds: int) -> dict[str, list[list[float]]]:
    width = len(FIELDS)
    return {mode: [values[(i * rounds + r) * width : (i * rounds + r + 1) * width] for r in range(rounds)]
            for i, mode in enumerate(MODES)}  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
