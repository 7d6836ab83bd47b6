"""A dead owner is noticed in seconds and named; a finished worker ends without the interpreter's teardown.

Real torchrun agents (one per owner, meeting at a c10d endpoint) and real kills: the survivors must say
which owner is gone and that its connection closed, long before dist.timeout_s. The stalled owner (alive
but silent) staying a timeout is tests/test_reliability.py's test_stalled_owner_stops_every_rank_within_the_timeout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_launch import folder_owners
from tests.world import cli, free_port, kill_tree, listening
from unify_dist.app.launch import _torchrun_args

OWNERS = ["ana", "ben", "cai"]


def _agent(name: str, run_dir: Path, port: int, extra: list[str]) -> subprocess.Popen:
    """One owner's torchrun agent for a fixed group of three, no restarts: a death ends the run."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=3", "--nproc_per_node=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=failfast", "-m", "unify_dist", "train",
        "--config", "configs/demo_cpu.toml", "--set", "data.train_per_owner=600", "--set", "data.test_size=300",
        "--set", "model.name=mlp", "--set", "output.progress=false", "--set", f"train.owners={json.dumps(OWNERS)}",
        "--set", "train.threads=1", "--set", f"output.dir={run_dir}", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNIFY_DIST_OWNER": name, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait(condition, procs: list[subprocess.Popen], limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert all(p.poll() is None for p in procs), f"an agent ended before {what}: " + procs[0].communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"no {what} within {limit_s}s"
        time.sleep(0.05)


@pytest.mark.slow
def test_dead_owner_is_named_within_seconds_not_timed_out(tmp_path: Path, data_root: Path) -> None:
    timeout_s = 120  # a death must be reported long before this
    run_dir, port = tmp_path / "run", free_port()
    extra = ["--set", "train.max_rounds=500", "--set", f"dist.timeout_s={timeout_s}"]
    agents = {"ana": _agent("ana", run_dir, port, extra)}
    try:
        _wait(lambda: listening(port), list(agents.values()), 60, "the rendezvous endpoint")  # ana hosts it
        agents.update({n: _agent(n, run_dir, port, extra) for n in OWNERS[1:]})
        _wait((run_dir / "checkpoints" / "cai" / "round_00002.pt").exists, list(agents.values()), 240, "round 2")
        kill_tree(agents["cai"].pid)  # its agent and its worker, mid-run
        killed = time.monotonic()
        said = {n: agents[n].communicate(timeout=timeout_s)[1] for n in ("ana", "ben")}
        waited = time.monotonic() - killed
    finally:
        for proc in agents.values():
            if proc.poll() is None:
                kill_tree(proc.pid)
    for name, err in said.items():
        lines = [ln for ln in err.splitlines() if ln.startswith("unify-dist: run failed")]
        assert len(lines) == 1, f"{name}: {err[-3000:]}"
        assert re.search(r"PeerGone: rank \d: owner 'cai' \(rank \d\) is gone: its connection closed", lines[0]), lines
        assert "CollectiveTimeout" not in err and "dist.timeout_s" not in lines[0], lines
        late = float(re.search(r"stopped (\d+\.\d) s later", lines[0]).group(1))
        assert late < 5.0, lines  # noticed at once, not at the next collective's timeout
    assert agents["ana"].returncode != 0 and agents["ben"].returncode != 0
    assert waited < timeout_s / 2, f"the survivors took {waited:.0f} s to stop (dist.timeout_s = {timeout_s})"


WITNESS = """
import atexit, sys
from pathlib import Path
from unify_dist.app.cli import program

# runs only if the interpreter's teardown runs: a finished worker must skip it, as a failed one does
witness = Path(sys.argv[1], "teardown_" + __import__("os").environ["RANK"])
atexit.register(witness.write_text, "ran")
sys.argv[1:] = sys.argv[2:]  # the program's own arguments, as `python -m unify_dist train ...` has them
raise SystemExit(program())
"""


@pytest.mark.slow
def test_finished_workers_skip_the_teardown_after_saving_everything(tmp_path: Path) -> None:
    script = tmp_path / "witness.py"
    script.write_text(WITNESS)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path), "train", *folder_owners(tmp_path), "--set", "train.max_rounds=2", "--set", f"output.dir={run}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"final unified model: {run / 'final.pt'}" in proc.stdout  # flushed before the process ended
    assert (run / "final.pt").exists() and len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert not list(tmp_path.glob("teardown_*")), "a finished worker ran the interpreter's teardown"


def test_launch_does_not_import_the_cli() -> None:
    """app/launch.py checks a worker's arguments with the parser beneath both, not through app/cli.py."""
    code = (
        "import sys; from unify_dist.app.launch import _check_program; _check_program(['train']); "
        "print('unify_dist.app.cli' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


def _conf(options: list[str]) -> dict[str, str]:
    args = _torchrun_args(options, ["train"])
    return dict(kv.split("=", 1) for kv in args.rdzv_conf.split(",") if kv)


def test_launch_defaults_notice_a_dead_owner_fast_and_keep_the_users_values() -> None:
    conf = _conf(["--nnodes=2:3", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:29400"])
    assert conf == {"last_call_timeout": "1", "keep_alive_interval": "1", "keep_alive_max_attempt": "3"}
    mine = _conf(["--nnodes=2:3", "--rdzv-backend=c10d", "--rdzv-conf=last_call_timeout=9,join_timeout=60"])
    assert mine["last_call_timeout"] == "9" and mine["join_timeout"] == "60" and mine["keep_alive_interval"] == "1"


def test_a_finished_run_says_so_shows_its_table_and_names_what_trains_again(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", *folder_owners(tmp_path), "--set", "train.max_rounds=2", "--set", f"output.dir={run}"]
    first = cli(args, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    record = (run / "metrics.jsonl").read_bytes()
    saved = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*.pt")}
    again = cli(args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout
    assert "this run is finished (all train.max_rounds = 2 rounds ran" in said, said
    assert "--set output.resume=false" in said and "output.dir" in said and "train.max_rounds" in said
    rows = [ln.split()[0] for ln in said.splitlines() if re.match(r"\s+\d+\s+\d", ln)]
    assert rows == ["1", "2"], said  # the recorded table, every round once
    assert "owner data:" not in said  # nothing trained: no round started, nothing rewritten
    assert (run / "metrics.jsonl").read_bytes() == record
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*.pt")} == saved
    more = cli([*args, "--set", "train.max_rounds=3"], timeout=300)  # the named setting trains again
    assert more.returncode == 0 and "this run is finished" not in more.stdout, more.stderr[-3000:]
    assert [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
