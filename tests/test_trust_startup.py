"""The program's start-up on a path someone else controls, and owners whose machines differ (all slow):

(a) trust on, a relay (tests/relay.py, in a network namespace) changes a byte of rank 0's initial weights
    on their way: the digest exchange that follows is sealed too, so there is nothing the relay could
    rewrite to match; every owner stops before round 1 naming the link, nothing trained, nothing written;
(b) trust off, the relay replaces the owners' consistency fingerprint with a pickle that would create a
    file when loaded: no file appears (nothing is unpickled), and every owner stops with one line;
(c) trust on, three owners as three torchrun agents, each with its own output.dir: admitted, they finish,
    and a watch on torch.distributed sees not one plaintext collective after admission; a fourth run in
    which one owner sets another learning rate (three forked ranks, no agents) is refused, naming that
    slot's configuration.

(a) and (b) need root, `ip netns` and iptables (else skipped with the reason), as tests/test_trust_relay.py.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hooks.plain_watch import FROM_ENV, PLAIN_ENV
from tests.test_trust_relay import RUN, _netns_missing, _records, _relayed, _torchrun_in
from tests.test_trust_run import _keys, _trust
from tests.world import cli_world, free_port
from unify_dist.collectives import tail_size
from unify_dist.config import ModelConfig
from unify_dist.flat import FlatState
from unify_dist.models import build_model


@pytest.fixture(scope="module")
def relay_ready() -> None:
    reason = _netns_missing()
    if reason:
        pytest.skip(reason)


def _lines(stderr: str, rank: int) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith(f"unify-dist: run failed (rank {rank}): ")]


def _nothing_trained(run_dir: Path, stdout: str) -> None:
    assert _records(run_dir) == [], "a round was recorded"
    assert not list(run_dir.glob("checkpoints/*/round_*.pt")), "a round was checkpointed"
    assert not (run_dir / "final.pt").exists()
    assert "round 1: local training" not in stdout and "every owner reached" not in stdout


@pytest.mark.slow
def test_a_changed_initial_weight_stops_every_owner_before_round_1(tmp_path: Path, data_root, relay_ready) -> None:
    model = build_model(ModelConfig(name="paper_cnn"), (1, 28, 28), 10)
    weights = FlatState(model, tail=tail_size(2, model)).values.numel() * 4
    trust = _trust(tmp_path, _keys(tmp_path, ["owner0", "owner1"]))
    run_dir = tmp_path / "run"
    # Half way through same_start's weights: before them each direction carries only admission and a few
    # kB of sealed metadata; with 2 owners the sealed broadcast carries the weights once each way.
    with _relayed(tmp_path, weights // 2) as (ns, log):
        proc = _torchrun_in(ns, [*RUN, *trust, "--set", f"output.dir={run_dir}"])
    assert len([ln for ln in log.read_text().splitlines() if ln.startswith("flipped byte")]) == 1, log.read_text()[-2000:]
    said = [_lines(proc.stderr, rank) for rank in (0, 1)]
    assert all(len(s) == 1 for s in said), proc.stderr[-3000:]
    link = said[0][0].split("IntegrityError: sealed unify traffic ", 1)[1].split(" failed authentication")[0]
    assert link in ("from rank 0 to rank 1", "from rank 1 to rank 0"), said
    assert all(f"IntegrityError: sealed unify traffic {link} failed authentication" in s[0] for s in said), said
    assert proc.stderr.count("exitcode  : 1") == 2, proc.stderr[-3000:]  # a failed run, on both owners
    _nothing_trained(run_dir, proc.stdout)


def _planted(target: Path) -> bytes:
    """A pickle that runs `touch target` when loaded (protocol 0: os.system through the GLOBAL opcode)."""
    return f"cos\nsystem\n(S'touch {target}'\ntR.".encode()


def test_the_planted_pickle_is_live(tmp_path: Path) -> None:
    """What the relay plants in (b) does create the file when unpickled: (b) can fail."""
    target = tmp_path / "pwned"
    assert pickle.loads(_planted(target) + b"trailing bytes are never read") == 0
    assert target.exists()


@pytest.mark.slow
def test_a_planted_pickle_is_never_loaded(tmp_path: Path, data_root, relay_ready) -> None:
    target, run_dir = tmp_path / "pwned", tmp_path / "run"
    find = b'{"package version"'  # the start of an owner's consistency fingerprint, as JSON
    relay_args = ["--find", find.hex(), "--put", _planted(target).hex()]
    with _relayed(tmp_path, -1, relay_args) as (ns, log):
        proc = _torchrun_in(ns, [*RUN, "--set", f"output.dir={run_dir}"])
    assert len([ln for ln in log.read_text().splitlines() if ln.startswith("replaced ")]) == 1, log.read_text()[-2000:]
    assert not target.exists(), "the planted pickle was loaded"
    said = [_lines(proc.stderr, rank) for rank in (0, 1)]
    assert all(len(s) == 1 for s in said), proc.stderr[-3000:]  # every owner: one line, no traceback
    fingerprint = "WireError: a consistency fingerprint from rank "
    assert any(fingerprint in s[0] and "is not valid JSON" in s[0] for s in said), said  # the receiver names it
    _nothing_trained(run_dir, proc.stdout)


SMALL = ["--config", "configs/demo_cpu.toml", "--set", "data.train_per_owner=200", "--set", "data.test_size=200",
         "--set", "train.max_rounds=1", "--set", "output.progress=false", "--set", "train.threads=1"]  # fmt: skip


def _three_organisations(tmp: Path, trust: list[str], extra: dict[int, list[str]], watch: Path | None) -> list:
    """Three torchrun agents (one owner each, as three organisations would run them), each its own run dir."""
    port, agents = free_port(), []
    env = {"OMP_NUM_THREADS": "1", **({PLAIN_ENV: str(watch), FROM_ENV: "start"} if watch else {})}
    for node in range(3):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=3", f"--node_rank={node}", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=orgs", "-m", "tests.hooks.plain_watch",
               "train", *SMALL, *trust, "--set", f"output.dir={tmp / f'org{node}'}", *extra.get(node, [])]  # fmt: skip
        agents.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env}))
    outputs = [a.communicate(timeout=400) for a in agents]
    return [(a.returncode, out, err) for a, (out, err) in zip(agents, outputs)]


@pytest.mark.slow
def test_three_owners_with_their_own_run_dirs_are_admitted_and_finish(tmp_path: Path, data_root) -> None:
    trust = _trust(tmp_path, _keys(tmp_path, ["owner0", "owner1", "owner2"]))
    watch = tmp_path / "plain"
    watch.mkdir()
    done = _three_organisations(tmp_path, trust, {}, watch)
    assert all(code == 0 for code, _, _ in done), "\n".join(err[-1500:] for _, _, err in done)
    assert any("trust: on: admitted roster owners 0=owner0, 1=owner1, 2=owner2" in out + err for _, out, err in done)
    for node in range(3):  # each organisation's checkpoints in its own run dir
        assert len(list((tmp_path / f"org{node}").glob("checkpoints/owner*/round_00001.pt"))) == 1
    records = [json.loads(ln) for p in tmp_path.glob("org*/metrics.jsonl") for ln in p.read_text().splitlines()]
    assert [r["round"] for r in records] == [1] and len({o["digest"] for o in records[0]["owners"]}) == 1
    seen = [json.loads((watch / f"{rank}.json").read_text()) for rank in range(3)]
    assert seen == [[], [], []], seen  # after admission, not one collective in the clear

    # The refusal is the program's (admission), not the agents': three forked ranks, rank 2 with another lr
    again = tmp_path / "again"
    own = [["--set", f"output.dir={again / f'org{r}'}", *(["--set", "train.lr=0.01"] if r == 2 else [])]
           for r in range(3)]  # fmt: skip
    refused = cli_world(["train", *SMALL, *trust], 3, module="tests.hooks.plain_watch", extra=own)
    lines = [ln for p in refused for ln in p.stderr.splitlines() if "admission refused" in ln]
    said = "\n".join(p.stderr[-1500:] for p in refused)
    assert len(lines) >= 3 and [p.returncode for p in refused] == [2, 2, 2], said
    assert all("rank slot 2 runs another configuration" in ln and "forged" not in ln for ln in lines), lines
