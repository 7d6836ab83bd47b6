"""Tampering on the path, through the real program: two owners run under torchrun in a fresh network
namespace whose iptables rules send every TCP connection but the rendezvous store's (so gloo's, which
carry the unify traffic) through tests/relay.py, a transparent relay that flips one byte, once, in the
middle of round 2's unify traffic.

With trust on, every rank stops with the integrity error naming the link (exit 1: a failed run, not a
user's mistake), round 2 leaves no checkpoint and no metrics record, and a second run (no relay, same
run dir) resumes from round 1 and ends exactly where a run that nobody touched ends. With trust off the
same flip is not noticed as tampering, so the check can fail. Needs root, `ip netns` and iptables
(installed with apt-get if missing), else skipped with the reason. About 70 s for both tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.relay import MARK
from tests.test_trust_run import _keys, _trust
from tests.world import torchrun
from unify_dist.collectives import tail_size
from unify_dist.config import ModelConfig
from unify_dist.flat import FlatState
from unify_dist.models import build_model

RUN = [
    "--config", "configs/demo_cpu.toml", "--set", "data.train_per_owner=200", "--set", "data.test_size=200",
    "--set", "train.max_rounds=3", "--set", "output.progress=false", "--set", "dist.timeout_s=30",
]  # fmt: skip
STORE_PORT, RELAY_PORT = 29400, 29399  # inside the namespace: nothing else listens there
RELAY = Path(__file__).with_name("relay.py")
INTEGRITY = "IntegrityError: sealed unify traffic from rank"


def _flip_offset() -> int:
    """A byte offset in the middle of round 2's unify on the rank 0 -> rank 1 stream.

    Per direction and round the 2-owner ring (or gloo's own all_reduce) carries about one flat state, S
    bytes; rank 0 also sends its initial weights once (same_start, S bytes; with trust on a sealed sum,
    so rank 1 sends S bytes of zeros back). At 2.5 S the rank 0 -> 1 direction is half way through round
    2's unify; with trust on the other direction gets there at about the same moment (the flip names
    whichever link came first), with trust off only in round 3.
    """
    model = build_model(ModelConfig(name="paper_cnn"), (1, 28, 28), 10)
    flat = FlatState(model, tail=tail_size(2, model))
    return int(2.5 * flat.buffer.numel() * flat.buffer.element_size())


def _netns_missing() -> str | None:
    """Why the relayed run cannot be set up here, or None."""
    if os.geteuid() != 0:
        return "a network namespace with iptables rules needs root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if shutil.which("iptables") is None:
        subprocess.run(["apt-get", "install", "-y", "iptables"], capture_output=True, timeout=180)  # CI set-up
    if shutil.which("iptables") is None:
        return "iptables is not installed and `apt-get install -y iptables` failed here"
    name = f"ud-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed here: {made.stderr.strip()}"
    try:
        rule = subprocess.run(["ip", "netns", "exec", name, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
                               "-j", "REDIRECT", "--to-ports", "1"], capture_output=True, text=True)  # fmt: skip
        if rule.returncode != 0:
            return f"iptables cannot REDIRECT inside a network namespace here: {rule.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@contextlib.contextmanager
def _relayed(tmp: Path, flip_at: int, relay_args: Sequence[str] = ()) -> Iterator[tuple[str, Path]]:
    """A fresh namespace (loopback up, IPv4 only) whose connections go through the relay, all but the
    agents' rendezvous store's: gloo's pairs, and the workers' own store (a few hundred bytes, passed on
    unchanged). Removed, rules and all, on leaving. Yields the namespace's name and the relay's log."""
    ns, log = f"ud-relay-{os.getpid()}", tmp / "relay.log"
    nat = ["ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp"]
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
        [*nat, "-m", "mark", "--mark", str(MARK), "-j", "RETURN"],  # the relay's own connections go straight
        [*nat, "--dport", str(STORE_PORT), "-j", "RETURN"],  # the rendezvous store: not unify traffic
        [*nat, "-o", "lo", "-j", "REDIRECT", "--to-ports", str(RELAY_PORT)],  # every other connection: the relay
    ]
    relay = None
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        # the rules are IPv4's: no ::1 for gloo to pick (a kernel without IPv6 has nothing to turn off)
        no_ipv6 = ["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]
        subprocess.run(no_ipv6, capture_output=True)
        cmd = ["ip", "netns", "exec", ns, sys.executable, str(RELAY), "--port", str(RELAY_PORT),
               "--flip-at", str(flip_at), "--log", str(log), *relay_args]  # fmt: skip
        relay = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert relay.stdout.readline().strip() == "listening"
        yield ns, log
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _torchrun_in(ns: str, args: list[str]) -> subprocess.CompletedProcess:
    """torchrun (2 owners) inside the namespace, its store on STORE_PORT."""
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{STORE_PORT}",
           "--monitor-interval=2",  # the owner that stops second is not ended by torchrun before it speaks
           "-m", "unify_dist", "train", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}  # the host name may not resolve in here
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _checkpoints(run_dir: Path) -> dict[str, list[str]]:
    return {d.name: sorted(p.name for p in d.glob("round_*.pt")) for d in sorted((run_dir / "checkpoints").iterdir())}


def _flipped(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("flipped byte")]


@pytest.fixture(scope="module")
def relay_ready() -> None:
    reason = _netns_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def untouched(tmp_path_factory: pytest.TempPathFactory, data_root, relay_ready) -> tuple[list[str], Path]:
    """Trust settings with fresh keys, and the run dir of a run with trust on that nobody tampered with."""
    tmp = tmp_path_factory.mktemp("trust")
    trust = _trust(tmp, _keys(tmp, ["owner0", "owner1"]))
    proc = torchrun(["train", *RUN, *trust, "--set", f"output.dir={tmp / 'clean'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return trust, tmp / "clean"


@pytest.mark.slow
def test_flipped_byte_stops_every_owner_and_the_run_resumes(tmp_path: Path, untouched) -> None:
    trust, clean = untouched
    run_dir = tmp_path / "run"
    with _relayed(tmp_path, _flip_offset()) as (ns, log):
        tampered = _torchrun_in(ns, [*RUN, *trust, "--set", f"output.dir={run_dir}"])
    assert len(_flipped(log)) == 1, log.read_text()[-3000:]
    links = []
    for rank in (0, 1):  # every owner says it, naming the same link, and exits 1 (a failed run)
        said = [ln for ln in tampered.stderr.splitlines() if f"run failed (rank {rank}): {INTEGRITY}" in ln]
        assert len(said) == 1, tampered.stderr[-3000:]
        links += [link for link in ("from rank 0 to rank 1", "from rank 1 to rank 0") if f"{link} failed authentication" in said[0]]
    assert len(links) == 2 and links[0] == links[1], tampered.stderr[-3000:]
    assert tampered.stderr.count("exitcode  : 1") == 2, tampered.stderr[-3000:]  # torchrun's summary
    assert [r["round"] for r in _records(run_dir)] == [1]  # round 2 was never recorded
    assert _checkpoints(run_dir) == {"owner0": ["round_00001.pt"], "owner1": ["round_00001.pt"]}

    resumed = torchrun(["train", *RUN, *trust, "--set", f"output.dir={run_dir}"])  # no relay now
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from round 1 (every owner had it)" in resumed.stdout, resumed.stdout[-3000:]
    got = _records(run_dir)
    assert [r["round"] for r in got] == [1, 2, 3]
    assert all(len({o["digest"] for o in r["owners"]}) == 1 for r in got)  # identical weights on both owners
    assert [r["digest"] for r in got] == [r["digest"] for r in _records(clean)]  # round 1 untouched, resume exact


@pytest.mark.slow
def test_trust_off_does_not_catch_the_flip(tmp_path: Path, untouched) -> None:
    """The same flip without trust: nothing names it as tampering. The run ends on silently corrupted
    weights (round 1 as the untouched run's, round 2 not; with 2 owners the plain and the sealed sums
    agree bit for bit), or stops some other way."""
    run_dir = tmp_path / "run"
    with _relayed(tmp_path, _flip_offset()) as (ns, log):
        proc = _torchrun_in(ns, [*RUN, "--set", f"output.dir={run_dir}"])
    assert len(_flipped(log)) == 1, log.read_text()[-3000:]
    assert "failed authentication" not in proc.stderr and "IntegrityError" not in proc.stderr
    if proc.returncode == 0:
        got, want = [r["digest"] for r in _records(run_dir)], [r["digest"] for r in _records(untouched[1])]
        assert got[0] == want[0] and got[1] != want[1], (got, want)
