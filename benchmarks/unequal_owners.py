"""Owners of different speeds and sizes: how long the fast owner sits idle in the unify, per round budget.

    python -m benchmarks.unequal_owners --scenario cpu  [--modes epochs,steps,seconds,overlap] [--rounds 4]
    python -m benchmarks.unequal_owners --scenario data

Two owners, the demo config (Fashion-MNIST, paper CNN, one torch thread each), launched by torchrun:
  cpu   owner 1's process is limited to a third of a core by a cgroup v1 CPU quota (cpu.cfs_quota_us /
        cpu.cfs_period_us; its pid is written into cgroup.procs as soon as it exists). Needs root and the v1
        cpu controller; skipped with the reason otherwise.
  data  owner 1 holds three times the training data (a data factory, `three_times_data`, below).
Modes: epochs (today: one local epoch each), steps (train.local_steps: one base owner's epoch of steps for
everyone), seconds (train.round_seconds), overlap (seconds with unify.overlap).

Per owner and round, from metrics.jsonl: idle = unify_s / round_s (the time blocked in the unify over the
round's wall time; round_s runs from the round's start to its record, checkpoint excluded), and
other = (round_s - train_s - unify_s - eval_s) / round_s: the rest of the round that is neither training
nor this owner's own evaluation, chiefly the wait in the metrics gather for a slower evaluator. Each figure
is the median over rounds 2.. (round 1 pays the warm-up, and a time budget has no evaluation time yet).
Prints a markdown table, writes OUT/summary_SCENARIO.json (every round's idle fraction too). Skips the cpu
scenario, saying why, without root or a cgroup v1 cpu controller.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from unify_dist.config import DataConfig
from unify_dist.data import Owner, OwnerDatasets, load_owner_data

CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000


# ------------------------------------------------------------------------------------ the data scenario
def three_times_data(owner: Owner) -> OwnerDatasets:
    """Fashion-MNIST, IID; owner 1 gets 3x the base share (UNEQUAL_BASE images, default 1500) of the others."""
    base = int(os.environ.get("UNEQUAL_BASE", "1500"))
    cfg = DataConfig(dataset="fashion_mnist", train_per_owner=base * (3 if owner.rank == 1 else 1), test_size=1000)
    data = load_owner_data(cfg, owner, torch.device("cpu"))
    held = [torch.utils.data.TensorDataset(s.x, s.y) for s in (data.train, data.val, data.test)]
    return OwnerDatasets(*held, classes=list(data.classes))


# ------------------------------------------------------------------------------------ the cpu scenario
def cgroup_unavailable() -> str | None:
    """Why owner 1 cannot be throttled here (None: it can)."""
    if not (CGROUP_ROOT / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {CGROUP_ROOT}"
    if os.geteuid() != 0:
        return "not root: cannot create a cgroup"
    return None


def make_cgroup(name: str, share: float) -> Path:
    group = CGROUP_ROOT / name
    group.mkdir(exist_ok=True)
    (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    (group / "cpu.cfs_quota_us").write_text(str(int(PERIOD_US * share)))
    return group


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def throttle_rank(launcher: subprocess.Popen, group: Path, rank: int, timeout: float = 120) -> int | None:
    """Move torchrun's worker of `rank` into `group` as soon as it exists; its pid (None: it never appeared)."""
    end = time.time() + timeout
    while time.time() < end and launcher.poll() is None:
        for pid in _children(launcher.pid):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                (group / "cgroup.procs").write_text(str(pid))
                return pid
        time.sleep(0.05)
    return None


# ------------------------------------------------------------------------------------ runs
def mode_args(mode: str, steps: int, seconds: float) -> list[str]:
    return {
        "epochs": [],
        "steps": ["--set", f"train.local_steps={steps}"],
        "seconds": ["--set", f"train.round_seconds={seconds}"],
        "overlap": ["--set", f"train.round_seconds={seconds}", "--set", "unify.overlap=true"],
    }[mode]


def run_once(scenario: str, mode: str, args: argparse.Namespace, group: Path | None) -> dict:
    out = Path(args.out) / f"{scenario}_{mode}"
    data = (["--set", "data.factory=benchmarks.unequal_owners:three_times_data"] if scenario == "data"
            else ["--set", f"data.train_per_owner={args.base}", "--set", "data.test_size=1000"])  # fmt: skip
    steps = -(-args.base // 64)  # one base owner's epoch (train_per_owner caps training images; batch 64)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unify_dist",
           "train", "--config", "configs/demo_cpu.toml", *data, *mode_args(mode, steps, args.round_seconds),
           "--set", f"train.max_rounds={args.rounds}", "--set", "train.threads=1", "--set", "output.progress=false",
           "--set", "output.local_metrics=false", "--set", "output.resume=false", "--set", f"output.dir={out}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNEQUAL_BASE": str(args.base)}
    t0 = time.time()
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid = throttle_rank(launcher, group, 1) if group is not None else None
    log, _ = launcher.communicate(timeout=900)
    if launcher.returncode != 0:
        raise SystemExit(f"{scenario}/{mode} failed (exit {launcher.returncode}):\n{log[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"scenario": scenario, "mode": mode, "wall_s": time.time() - t0, "throttled_pid": pid,
            "owners": summarise(records), "test_acc": records[-1]["unified_test_acc"]}  # fmt: skip


def summarise(records: list[dict]) -> list[dict]:
    """Per owner: median over rounds 2.. of idle, rest, steps, train_s, round_s, and steps per second."""
    later = records[1:] or records
    owners = []
    for i in range(len(records[0]["owners"])):
        rows = [r["owners"][i] for r in later]

        def med(f):
            return statistics.median(f(o) for o in rows)

        owners.append({
            "idle": med(lambda o: o["unify_s"] / o["round_s"]),
            "other": med(lambda o: (o["round_s"] - o["train_s"] - o["unify_s"] - o["eval_s"]) / o["round_s"]),
            "steps": med(lambda o: o["steps"]), "train_s": med(lambda o: o["train_s"]),
            "round_s": med(lambda o: o["round_s"]), "unify_s": med(lambda o: o["unify_s"]),
            "steps_per_s": med(lambda o: o["steps"] / o["train_s"]),
            "idle_by_round": [round(r["owners"][i]["unify_s"] / r["owners"][i]["round_s"], 4) for r in records],
        })  # fmt: skip
    return owners


def table(results: list[dict]) -> str:
    lines = ["| scenario | mode | owner 0 idle / other | owner 1 idle / other | steps o0 / o1 | steps/s o0 / o1 "
             "| round s | test acc |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in results:
        a, b = r["owners"]
        lines.append(f"| {r['scenario']} | {r['mode']} | {a['idle']:.1%} / {a['other']:.1%} | {b['idle']:.1%} / "
                     f"{b['other']:.1%} | {a['steps']:.0f} / {b['steps']:.0f} | {a['steps_per_s']:.1f} / "
                     f"{b['steps_per_s']:.1f} | {a['round_s']:.2f} | {r['test_acc']:.2%} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", choices=("cpu", "data"), required=True)
    p.add_argument("--modes", default="epochs,steps,seconds,overlap")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--base", type=int, default=1500, help="training images of the base owner")
    p.add_argument("--round-seconds", type=float, default=2.0)
    p.add_argument("--quota", type=float, default=1 / 3, help="owner 1's CPU share in the cpu scenario")
    p.add_argument("--out", default="runs/unequal")
    args = p.parse_args(argv)
    group = None
    if args.scenario == "cpu":
        why = cgroup_unavailable()
        if why:
            print(f"cpu scenario skipped: {why}")
            return 0
        group = make_cgroup("unify_dist_slow_owner", args.quota)
    results = []
    try:
        for mode in args.modes.split(","):
            results.append(run_once(args.scenario, mode, args, group))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    finally:
        if group is not None:
            group.rmdir()  # empty again: its worker has exited
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summary = Path(args.out) / f"summary_{args.scenario}.json"
    summary.write_text(json.dumps({"load_average": os.getloadavg(), "results": results}, indent=1))
    print(table(results))
    print(f"load average {os.getloadavg()}; {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
