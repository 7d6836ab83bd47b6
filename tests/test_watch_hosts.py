"""The peer watch across two machines whose names resolve to loopback at home (Debian's 127.0.1.1).

Two network namespaces, each with its own host name (a UTS namespace) and its own /etc/hosts (ip netns
exec bind-mounts /etc/netns/NS/hosts): on each, the machine's own name maps to 127.0.1.1 and the other's
to its address on the veth link, as on two Debian machines. torchrun is given no --local-addr, so the
workers' MASTER_ADDR is rank 0's host name, which rank 0's own machine resolves to loopback. A watch
that listened on the route to the master would publish 127.0.1.1 and the other machine could not
connect: the run would fail at start-up. Needs root and `ip netns` (else skipped with the reason).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.world import free_port

HOSTS = {"a": "10.78.0.1", "b": "10.78.0.2"}


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def _down() -> None:
    for side in HOSTS:
        _sh("ip", "netns", "del", f"udw_{side}")
        shutil.rmtree(f"/etc/netns/udw_{side}", ignore_errors=True)


@pytest.fixture
def two_machines() -> Iterator[None]:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("needs root, iproute2 (ip) and unshare to build two machines from network namespaces")
    _down()
    made = _sh("ip", "netns", "add", "udw_a")
    if made.returncode != 0:
        pytest.skip(f"`ip netns add` failed here: {made.stderr.strip()}")
    try:
        steps = [["ip", "netns", "add", "udw_b"], ["ip", "link", "add", "udw_va", "type", "veth", "peer", "name", "udw_vb"]]
        for side, addr in HOSTS.items():
            ns, dev = f"udw_{side}", f"udw_v{side}"
            steps += [["ip", "link", "set", dev, "netns", ns], ["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev],
                      ["ip", "-n", ns, "link", "set", "lo", "up"], ["ip", "-n", ns, "link", "set", dev, "up"]]  # fmt: skip
            other = next(h for h in HOSTS if h != side)
            Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{ns}/hosts").write_text(
                f"127.0.0.1 localhost\n127.0.1.1 udw-host-{side}\n{HOSTS[other]} udw-host-{other}\n"
            )
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            assert done.returncode == 0, f"{' '.join(step)}: {done.stderr}"
        yield
    finally:
        _down()


def _agent(side: str, port: int, run_dir: Path) -> subprocess.Popen:
    """One owner's torchrun agent on machine `side`, with no --local-addr: MASTER_ADDR is rank 0's host name."""
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={HOSTS['a']}:{port}", "--rdzv-id=watch-hosts", f"--rdzv-conf=is_host={int(side == 'a')}",
        "-m", "unify_dist", "train", "--config", "configs/demo_cpu.toml", "--set", "data.train_per_owner=300",
        "--set", "data.test_size=200", "--set", "model.name=mlp", "--set", "train.max_rounds=2",
        "--set", "output.progress=false", "--set", "train.threads=1", "--set", f"output.dir={run_dir}",
    ]  # fmt: skip
    script = f"hostname udw-host-{side} && exec " + " ".join(f"'{a}'" for a in torchrun)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": f"udw_v{side}"}
    cmd = ["ip", "netns", "exec", f"udw_{side}", "unshare", "--uts", "sh", "-c", script]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_owners_on_two_machines_whose_names_are_loopback_at_home(two_machines, tmp_path: Path, data_root) -> None:
    port = free_port()
    agents = {side: _agent(side, port, tmp_path / side) for side in HOSTS}
    outs = {}
    for side, agent in agents.items():
        try:
            outs[side] = agent.communicate(timeout=240)
        finally:
            agent.kill()
    for side, (out, err) in outs.items():
        assert agents[side].returncode == 0, f"machine {side} failed:\n{out[-1500:]}\n{err[-3000:]}"
    written = [tmp_path / side / "metrics.jsonl" for side in HOSTS if (tmp_path / side / "metrics.jsonl").exists()]
    assert len(written) == 1, "rank 0's machine, and only it, writes the record"
    last = json.loads(written[0].read_text().splitlines()[-1])
    assert last["round"] == 2
    digests = [owner["digest"] for owner in last["owners"]]
    assert len(digests) == 2 and digests[0] == digests[1], f"the two machines ended with different weights: {digests}"


def test_a_rank_whose_route_to_the_master_is_loopback_takes_the_interface_towards_a_remote_rank() -> None:
    """Without GLOO_SOCKET_IFNAME: rank 0 sees the master as 127.0.1.1 (its own name), rank 1, elsewhere, a
    real address; rank 0 must publish the interface that reaches rank 1, not loopback. A real TCPStore."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from unify_dist.watch import _reachable_address, _route_to

    try:
        outward = _route_to("192.0.2.1")  # this machine's default-route interface (nothing is sent)
    except OSError:
        pytest.skip("no default route here: no non-loopback interface to route to")
    if outward.startswith("127."):
        pytest.skip("the default route leaves through loopback here")
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 2, True, timeout=timedelta(seconds=30), wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", port, 2, False, timeout=timedelta(seconds=30))
    found: dict[int, str] = {}
    masters = {0: "127.0.1.1", 1: outward}  # rank 1's route to the master leaves by the outward interface
    threads = [
        threading.Thread(target=lambda r, s: found.__setitem__(r, _reachable_address(r, 2, s, masters[r], 29500, None)),
                         args=(r, s))
        for r, s in ((0, server), (1, client))
    ]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert found == {0: _route_to(outward), 1: outward}
    assert not found[0].startswith("127.")
    # ranks that all share one machine keep loopback, which reaches them all
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 1, True, timeout=timedelta(seconds=30), wait_for_workers=False)
    assert _reachable_address(0, 1, server, "127.0.1.1", 29500, None).startswith("127.")
