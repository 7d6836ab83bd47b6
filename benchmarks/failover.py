"""How fast owners re-form after a death, and how fast a returning owner takes part: `python -m benchmarks.failover`.

Three owners (ana, ben, cai), each its own `unify-dist launch` agent (torchrun, c10d rendezvous,
`--nnodes=2:3`, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, the launcher's rendezvous defaults), small data. ana's
agent hosts the rendezvous endpoint and stays; `--kills` times, at a random point of a round, ben's or cai's
agent and worker are killed (SIGKILL), and a few seconds after the survivors train again it is started
again under the same name. Measured from each agent's output (rank 0 prints `unify-dist: N owners` when a
group forms and `owner data: ...` just before its first round starts):

  kill -> survivors' next round starting: the kill to the first round start of a two-owner group;
  return -> first round taken part in: the returning agent's start to the first round start of a
  three-owner group (and, for reference, to the end of that round: the first record naming it).

Prints a table and writes JSON (--out). Timings depend on the machine's load: say where they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.world import kill_tree

__all__ = ["main"]

OWNERS = ["ana", "ben", "cai"]
STARTS = re.compile(r"unify-dist: (\d+) owners")


class Agent:
    """One owner's `unify-dist launch` agent; a thread timestamps every line it prints."""

    def __init__(self, name: str, port: int, run_dir: Path, args: argparse.Namespace, log: list[tuple[float, str, int, str]]):
        cmd = [
            sys.executable, "-m", "unify_dist", "launch", "--nnodes=2:3", "--nproc_per_node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=failover", "--max-restarts=1000",
            *([f"--rdzv-conf={args.rdzv_conf}"] if args.rdzv_conf else []), "--", "train",
            "--config", "configs/demo_cpu.toml", "--set", "model.name=mlp", "--set", f"data.train_per_owner={args.train_per_owner}",
            "--set", "data.test_size=300", "--set", "train.max_rounds=100000", "--set", "output.progress=false",
            "--set", f"train.owners={json.dumps(OWNERS)}", "--set", "train.min_owners=2", "--set", "train.threads=1",
            "--set", f"output.dir={run_dir}",
        ]  # fmt: skip
        env = {**os.environ, "UNIFY_DIST_OWNER": name, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1", "UNIFY_DIST_DEBUG": "1", "LOGLEVEL": "INFO"}  # torchrun's log: the rendezvous' end
        # fmt: skip
        self.name, self.started = name, time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        threading.Thread(target=self._read, args=(log,), daemon=True).start()

    def _read(self, log: list[tuple[float, str, int, str]]) -> None:
        owners = 0
        for line in self.proc.stdout:  # type: ignore[union-attr]
            found = STARTS.search(line)
            if found:
                owners = int(found.group(1))
            log.append((time.monotonic(), self.name, owners, line.rstrip()))

    def kill(self) -> None:
        """SIGKILL the agent and everything under it (torchrun starts its workers in sessions of their own)."""
        kill_tree(self.proc.pid)
        self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rendezvous_done(log: list, after: float, until: float) -> float:
    """When the last agent's rendezvous completed between `after` and `until` (torchrun's INFO line)."""
    done = [t for t, _, _, line in log if after < t <= until and "Rendezvous complete for workers" in line]
    return max(done) if done else float("nan")


def _round_start(log: list, after: float, owners: int, limit_s: float) -> float:
    """When the first round of a group of `owners` started after `after` (monotonic seconds)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for t, _, n, line in list(log):
            if t > after and n == owners and "owner data:" in line:
                return t
        time.sleep(0.02)
    raise TimeoutError(f"no round of {owners} owners started within {limit_s:g} s")


def _first_record_with(run_dir: Path, name: str, after_wall: float, limit_s: float) -> float:
    """The wall-clock time of the first round record after `after_wall` that names `name` as a participant."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if r["time"] > after_wall and name in r.get("participants", []):
                return r["time"]
        time.sleep(0.1)
    raise TimeoutError(f"no round with {name} within {limit_s:g} s")


def _round_seconds(run_dir: Path) -> float:
    """The median time between consecutive round records: what a round costs here."""
    times = [json.loads(x)["time"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    gaps = [b - a for a, b in zip(times, times[1:]) if b > a]
    return statistics.median(gaps) if gaps else float("nan")


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    run_dir = Path(tempfile.mkdtemp(prefix="failover_")) / "run"
    port, log = _free_port(), []
    agents = {"ana": Agent("ana", port, run_dir, args, log)}
    try:
        while not _listening(port):  # ana's agent hosts the rendezvous; the others then meet it
            time.sleep(0.05)
        agents.update({n: Agent(n, port, run_dir, args, log) for n in OWNERS[1:]})
        ready = _round_start(log, 0.0, 3, args.limit_s)
        kills = []
        for i in range(args.kills):
            time.sleep(rng.uniform(0.5, args.kill_window_s))  # a random point of the round
            victim = rng.choice(["ben", "cai"])
            agents[victim].kill()
            killed = time.monotonic()
            resumed = _round_start(log, killed, 2, args.limit_s)
            time.sleep(rng.uniform(1.0, 3.0))
            agents[victim] = Agent(victim, port, run_dir, args, log)
            back_wall, back = time.time(), agents[victim].started
            joined = _round_start(log, back, 3, args.limit_s)
            took_part = _first_record_with(run_dir, victim, back_wall, args.limit_s) - back_wall
            kills.append({"victim": victim, "kill_to_survivors_round_s": resumed - killed,
                          "kill_to_rendezvous_s": _rendezvous_done(log, killed, resumed) - killed,
                          "return_to_rendezvous_s": _rendezvous_done(log, back, joined) - back,
                          "return_to_round_start_s": joined - back, "return_to_round_end_s": took_part})  # fmt: skip
            print(f"kill {i + 1}: {victim}: survivors train again {resumed - killed:.1f} s after the kill; back in a "
                  f"round {joined - back:.1f} s after its agent started (that round ended {took_part:.1f} s after)",
                  flush=True)  # fmt: skip
            ready = joined
            if args.verbose:
                for t, who, n, line in list(log):
                    if t > killed:
                        print(f"  {t - killed:6.2f} {who} [{n}] {line[:150]}")
        del ready
        round_s = _round_seconds(run_dir)
    except TimeoutError:
        for t, who, n, line in [x for x in log if not re.match(r"\s+\d+\s", x[3])][-60:]:  # why no group formed
            print(f"  {t:8.2f} {who} [{n}] {line[:200]}", file=sys.stderr)
        raise
    finally:
        for agent in agents.values():
            agent.kill()
    return {"kills": kills, "round_s": round_s, "seed": args.seed, "train_per_owner": args.train_per_owner,
            "rdzv_conf": args.rdzv_conf or "unify-dist launch defaults"}  # fmt: skip


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _summary(result: dict) -> str:
    rows = [("kill -> survivors' agents re-formed (rendezvous complete)", "kill_to_rendezvous_s"),
            ("kill -> survivors' next round starting", "kill_to_survivors_round_s"),
            ("returning agent's start -> group re-formed with it", "return_to_rendezvous_s"),
            ("returning agent's start -> its first round starting", "return_to_round_start_s"),
            ("returning agent's start -> that round's end", "return_to_round_end_s")]  # fmt: skip
    lines = ["| | median | max |", "| --- | ---: | ---: |"]
    for label, key in rows:
        xs = [k[key] for k in result["kills"]]
        lines.append(f"| {label} | {statistics.median(xs):.1f} s | {max(xs):.1f} s |")
    lines.append(f"\n{len(result['kills'])} kills; a round took {result['round_s']:.1f} s (median)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.failover", description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5, help="how many times an owner is killed and comes back")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill points and the victims")
    parser.add_argument("--train-per-owner", type=int, default=2000, help="training items per owner (sets a round's length)")
    parser.add_argument("--kill-window-s", type=float, default=6.0, help="a kill lands 0.5 s to this long after a round start")
    parser.add_argument("--rdzv-conf", default="", help="torchrun --rdzv-conf for every agent (default: the launcher's)")
    parser.add_argument("--limit-s", type=float, default=120, help="give up when a group takes longer than this to form")
    parser.add_argument("--verbose", action="store_true", help="print every agent's lines after each kill, timed from it")
    parser.add_argument("--out", type=Path, default=None, help="write the measurements here as JSON")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.train_per_owner < 10 or args.kill_window_s <= 0.5:
        parser.error("--kills >= 1, --train-per-owner >= 10 and --kill-window-s > 0.5, please")
    result = run(args)
    print(_summary(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
