"""What crosses the wire, captured with tcpdump on the loopback: the same owners unify twice in one
group, once through gloo in the clear and once through the sealed ring. The plain unify's weight bytes
show up in the capture (so the check can fail); not one 16-byte window of the sealed unify's does."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.trust_keys import fresh_keys, key, roster_of
from tests.world import run_world
from unify_dist.collectives import Collective, tail_size
from unify_dist.flat import FlatState
from unify_dist.rules import SPECS
from unify_dist.trust import SealedRing, admit

N = 2048  # floats per owner: 8 KiB of weights


def _capture_available() -> str | None:
    """Why the capture cannot run here, or None."""
    if shutil.which("tcpdump") is None:
        subprocess.run(["apt-get", "install", "-y", "tcpdump"], capture_output=True, timeout=180)  # CI set-up
    if shutil.which("tcpdump") is None:
        return "tcpdump is not installed and `apt-get install -y tcpdump` failed here"
    if os.geteuid() != 0:
        return "capturing on the loopback needs root (tcpdump)"
    return None


def _unify_twice(rank: int, world: int, raws: list[bytes], seeds: tuple[int, int]) -> dict:
    """Plain unify of weights A, then sealed unify of weights B; returns both owners' weight bytes."""
    ring = SealedRing(admit(key(raws[rank]), f"owner{rank}", roster_of(raws), run_id="wire"))
    out = {}
    for name, seed, reducer in (("plain", seeds[0], None), ("sealed", seeds[1], ring)):
        model = torch.nn.Linear(N, 1, bias=False)
        flat = FlatState(model, tail=tail_size(world))
        flat.values.copy_(torch.randn(N, generator=torch.Generator().manual_seed(seed + rank)))
        out[name] = flat.values.numpy().tobytes()
        core = Collective(flat, None, "reduce", 1 << 16)
        core.reducer = reducer
        core.reduce(SPECS["max"], None, 1.0, False)  # collective: max sends the owners' values as they are
    return out


def _windows(weights: bytes) -> list[bytes]:
    """Every float-aligned 16-byte window of one owner's weights."""
    return [weights[i : i + 16] for i in range(0, len(weights) - 15, 4)]


@pytest.mark.slow
def test_sealed_unify_leaves_no_weight_bytes_on_the_wire(tmp_path: Path) -> None:
    reason = _capture_available()
    if reason:
        pytest.skip(reason)
    pcap = tmp_path / "lo.pcap"
    # --immediate-mode: each packet reaches tcpdump at once. Without it the kernel hands packets over in
    # blocks, up to a second late, and the SIGINT below came first: the unify is the owners' last act.
    dump = subprocess.Popen(["tcpdump", "-i", "lo", "--immediate-mode", "-U", "-s", "0", "-Z", "root", "-w", str(pcap),
                             "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert "listening on" in dump.stderr.readline()  # capturing before the owners start
        seeds = tuple(int(s) for s in torch.randint(0, 1 << 30, (2,)))
        results = run_world(_unify_twice, 2, fresh_keys(2), seeds)
        time.sleep(0.5)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=30)
    wire = pcap.read_bytes()
    for owner in results:
        plain = _windows(owner["plain"])
        seen = sum(w in wire for w in plain)
        assert seen > len(plain) // 3, f"only {seen} of {len(plain)} plain windows captured: the capture missed the unify"
        leaked = [w for w in _windows(owner["sealed"]) if w in wire]
        assert not leaked, f"{len(leaked)} 16-byte windows of an owner's weights crossed the wire with trust on"
