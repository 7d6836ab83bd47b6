"""Owners that leave and come back, with real torchrun agents (one owner each) meeting at a c10d endpoint.

An owner is killed for good in round 2: the other two carry on. It comes back later under the same name
and rejoins. The test waits on events, not on how fast rounds run: the owner to be killed is held before
round 2's unify (tests/hooks/gate.py), so round 2 can only complete without it, and the survivors are
held before round 3's unify until it is back, so it rejoins in round 3 however slowly its agent starts. Every round's record names who took part, no round is counted twice, digests agree, and a
replay of the same membership history (plain fixed-size groups without agents, one per stretch of equal
membership) ends with the same final digest. The model is the small MLP: what is proven is who takes part
when and that the bits agree, not what is learned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.world import cli_world, free_port, kill_tree, listening

REPO = Path(__file__).resolve().parents[1]
SURVIVORS_WAIT = "round=3:below=3"  # from round 3 on, no unify with fewer than all three owners

OWNERS = ["ana", "ben", "cai"]
RUN = [
    "train", "--config", "configs/demo_cpu.toml", "--set", "data.train_per_owner=300", "--set", "data.test_size=200",
    "--set", "model.name=mlp", "--set", f"train.owners={json.dumps(OWNERS)}", "--set", "train.min_owners=2",
    "--set", "output.progress=false", "--set", "dist.timeout_s=30", "--set", "train.threads=1",
]  # fmt: skip


def _agent(name: str, run_dir: Path, port: int, nnodes: str, rounds: int, rdzv_id: str, hold: str = "") -> subprocess.Popen:
    """One owner's torchrun agent, logging to a file beside the run directory; `hold`: tests/hooks/gate.py's
    UNIFY_DIST_HOLD for its worker (the program through the gate hook), '' for the plain program."""
    # keep_alive: a killed agent counts as dead in the rendezvous after 5 s without a heartbeat, not torchrun's
    # default 15 s (the survivors' next round waits on that); last_call: how long 2 of 3 agents wait for a third
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc_per_node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}", "--max-restarts=3",
        "--monitor-interval=0.2", "--rdzv-conf=last_call_timeout=4,keep_alive_interval=1,keep_alive_max_attempt=5",
        "-m", "tests.hooks.gate" if hold else "unify_dist", *RUN, "--set", f"train.max_rounds={rounds}",
        "--set", f"output.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNIFY_DIST_OWNER": name, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "UNIFY_DIST_HOLD": hold, "PYTHONPATH": str(REPO)}  # fmt: skip
    log = open(run_dir.parent / f"{run_dir.name}_{name}_{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait(condition, procs: list[subprocess.Popen], limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert all(p.poll() is None for p in procs), f"an agent ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {limit_s}s"
        time.sleep(0.05)


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _stretches(records: list[dict]) -> list[tuple[list[str], int]]:
    """The membership history: (owners, last round) for each run of rounds with the same participants."""
    out: list[tuple[list[str], int]] = []
    for r in records:
        if out and out[-1][0] == r["participants"]:
            out[-1] = (out[-1][0], r["round"])
        else:
            out.append((r["participants"], r["round"]))
    return out


def _logs(tmp: Path) -> str:
    return "\n".join(p.read_text()[-1500:] for p in sorted(tmp.glob("*.log")))


@pytest.mark.slow
def test_owner_leaves_for_good_then_rejoins_and_a_replay_matches(tmp_path: Path, data_root) -> None:
    run_dir, port, rounds = tmp_path / "elastic", free_port(), 4
    run_dir.mkdir()
    agents = {"ana": _agent("ana", run_dir, port, "2:3", rounds, "elastic", SURVIVORS_WAIT)}
    try:
        # ana's agent hosts the rendezvous store (the first to bind the endpoint); it must not be the one killed
        _wait(lambda: listening(port), list(agents.values()), 60, "the rendezvous endpoint")
        agents["ben"] = _agent("ben", run_dir, port, "2:3", rounds, "elastic", SURVIVORS_WAIT)
        agents["cai"] = _agent("cai", run_dir, port, "2:3", rounds, "elastic", "round=2:below=99")  # never unifies round 2
        gone = run_dir / "checkpoints" / "cai" / "round_00001.pt"
        _wait(gone.exists, list(agents.values()), 240, "round 1 checkpoint of cai")
        kill_tree(agents["cai"].pid)  # the agent and its worker, in round 2: gone for good
        agents["cai"].wait()
        # round 2 can only complete without cai; the survivors then hold in round 3 until cai is back
        _wait(lambda: (run_dir / "checkpoints" / "ana" / "round_00002.pt").exists(), [agents["ana"], agents["ben"]],
              240, "round 2 without cai")  # fmt: skip
        agents["cai"] = _agent("cai", run_dir, port, "2:3", rounds, "elastic", SURVIVORS_WAIT)  # back, same name
        for name, proc in agents.items():
            assert proc.wait(timeout=300) == 0, f"{name}: {_logs(tmp_path)}"
    finally:
        for proc in agents.values():
            if proc.poll() is None:
                kill_tree(proc.pid)
    records = _records(run_dir)
    assert [r["round"] for r in records] == list(range(1, rounds + 1)), _logs(tmp_path)  # each round once
    assert records[0]["participants"] == OWNERS
    assert sorted(records[1]["participants"]) == ["ana", "ben"]  # round 2 went on without cai
    assert records[1]["left"] == ["cai"]
    rejoined = [r for r in records if r["joined"] == ["cai"]]
    assert len(rejoined) == 1 and rejoined[0]["round"] == 3, [(r["round"], r["participants"]) for r in records]
    assert all(sorted(r["participants"]) == OWNERS for r in records[2:])  # nobody unified round 3+ without cai
    for r in records:  # digests agree in every round, and every owner is named in its column
        assert len({o["digest"] for o in r["owners"]}) == 1
        assert sorted(o["name"] for o in r["owners"]) == sorted(r["participants"])

    # Replay the same membership: one fixed-size group per stretch (plain ranks, no agent), resuming in one directory.
    replay = tmp_path / "replay"
    for owners, last in _stretches(records):
        ranks = cli_world([*RUN, "--set", f"train.max_rounds={last}", "--set", f"output.dir={replay}"], len(owners),
                          env=[{"UNIFY_DIST_OWNER": n} for n in owners])  # fmt: skip
        assert all(p.returncode == 0 for p in ranks), "".join(p.stderr[-1500:] for p in ranks)
    again = _records(replay)
    assert [r["participants"] for r in again] == [r["participants"] for r in records]
    assert again[-1]["digest"] == records[-1]["digest"]


@pytest.mark.slow
def test_too_few_owners_wait_then_stop_with_a_clear_message(tmp_path: Path, data_root) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNIFY_DIST_OWNER": "ana", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:3", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=alone", "--rdzv-conf=last_call_timeout=1",
           "-m", "unify_dist", *RUN, "--set", "train.owner_wait_s=3", "--set", f"output.dir={tmp_path}"]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    waited = time.monotonic() - start
    assert proc.returncode != 0
    assert "only 1 owner(s) (ana) joined within 3 s but train.min_owners = 2" in proc.stderr, proc.stderr[-2000:]
    assert waited >= 3
    assert not (tmp_path / "checkpoints").exists()  # nothing trained, nothing written
