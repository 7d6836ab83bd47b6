"""Reliability with real processes: a corrupt checkpoint, a killed owner, a stalled owner, NaN weights,
and owners that disagree before training.

Each slow test is one real `torchrun` run (or two). The uninterrupted baseline run is shared: a resumed
run must end with exactly its weights, bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.world import run_world, torchrun
from unify_dist.app.checkpoint import Checkpointer
from unify_dist.app.config import RunConfig
from unify_dist.config import ModelConfig, UnifyConfig
from unify_dist.app.consistency import check_consistency, fingerprint
from unify_dist.errors import UserError
from tests.hooks.faults import FAULT_ENV, Fault, parse_fault

FAULTS = "tests.hooks.faults"  # the program plus the fault hook
from unify_dist.models import build_model

# ~1,800 training images per owner: a local epoch lasts a second or more, long enough to be killed in.
RUN = [
    "train", "--config", "configs/demo_cpu.toml", "--set", "data.train_per_owner=2000",
    "--set", "data.test_size=1000", "--set", "train.max_rounds=3", "--set", "output.progress=false",
]  # fmt: skip
QUICK = [
    "train", "--config", "configs/demo_cpu.toml", "--set", "data.train_per_owner=300", "--set", "data.test_size=300",
    "--set", "model.name=mlp", "--set", "output.progress=false",
]  # fmt: skip


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final.pt", weights_only=True)["model"]


def assert_same_weights(run_dir: Path, baseline: Path) -> None:
    """The run ends exactly where the uninterrupted run ends: same digest, every round, same final bits."""
    got, want = _records(run_dir), _records(baseline)
    assert [r["round"] for r in got] == [r["round"] for r in want]
    assert [r["digest"] for r in got] == [r["digest"] for r in want]
    a, b = _final_model(run_dir), _final_model(baseline)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _processes_mentioning(token: str) -> list[int]:
    """PIDs (other than ours) whose command line contains `token`: what a run would leave behind."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if token.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:  # gone meanwhile
            pass
    return found


def _worker_of_rank(agent_pid: int, rank: int) -> int | None:
    """The torchrun worker process of `rank`: a child of the agent whose environment says RANK=rank."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def _popen_torchrun(args: list[str], nproc: int, extra: list[str], env: dict[str, str] | None = None, module: str = "unify_dist"):
    """Like tests.world.torchrun, but started in the background: the test acts on the run while it goes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd += ["-m", module, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)


def _wait_for(path: Path, proc: subprocess.Popen, limit_s: float = 240) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear within {limit_s}s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """An uninterrupted 3-round run: what every resumed run must reproduce."""
    run_dir = tmp_path_factory.mktemp("baseline")
    proc = torchrun([*RUN, "--set", f"output.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_newest_checkpoint_falls_back_to_the_round_before(tmp_path: Path, baseline: Path, damage: str) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(baseline, run_dir)
    (run_dir / "final.pt").unlink()
    newest = run_dir / "checkpoints" / "rank0" / "round_00003.pt"
    blob = newest.read_bytes()
    newest.write_bytes(blob[: len(blob) // 2] if damage == "truncated" else b"not a checkpoint" * 64)
    proc = torchrun([*RUN, "--set", f"output.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if "warning (rank 0)" in ln]
    assert "Traceback" not in proc.stderr and "\n\n" not in proc.stderr  # one line per warning
    named = [ln for ln in warnings if f"checkpoint {newest} is unreadable" in ln and "using an older one" in ln]
    assert named, proc.stderr
    assert "resumed from round 2 (every owner had it)" in proc.stdout
    assert_same_weights(run_dir, baseline)  # round 3 was redone from round 2, bit for bit
    assert [r["round"] for r in torch.load(newest, weights_only=True)["metrics"]] == [1, 2, 3]  # rewritten whole


@pytest.mark.slow
def test_killed_owner_restarts_and_resumes_bit_for_bit(tmp_path: Path, baseline: Path) -> None:
    proc = _popen_torchrun([*RUN, "--set", f"output.dir={tmp_path}"], 2, ["--max-restarts=1", "--monitor-interval=0.1"])
    try:
        ckpts = tmp_path / "checkpoints" / "rank1"
        _wait_for(ckpts / "round_00002.pt", proc)
        victim = _worker_of_rank(proc.pid, rank=1)
        assert victim is not None, "no worker with RANK=1 under the torchrun agent"
        os.kill(victim, signal.SIGKILL)  # mid round 3: local training has begun
        assert not (ckpts / "round_00003.pt").exists(), "the kill landed after round 3 ended: make the epoch longer"
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "\n".join(ln for ln in err.splitlines() if "unify-dist" in ln) + err[-3000:]
    assert re.search(r"resumed from round [12] \(every owner had it\)", out), out[-2000:]
    assert_same_weights(tmp_path, baseline)


@pytest.mark.slow
def test_stalled_owner_stops_every_rank_within_the_timeout(tmp_path: Path, data_root: Path) -> None:
    timeout_s = 20
    args = [*QUICK, "--set", "train.max_rounds=3", "--set", f"dist.timeout_s={timeout_s}"]
    args += ["--set", f"output.dir={tmp_path}"]
    proc = _popen_torchrun(args, 3, ["--monitor-interval=0.1"], env={FAULT_ENV: "stall:rank=1:round=2"}, module=FAULTS)
    try:
        _wait_for(tmp_path / "checkpoints" / "rank1" / "round_00001.pt", proc)
        round_one_done = time.monotonic()
        out, err = proc.communicate(timeout=timeout_s + 120)
        waited = time.monotonic() - round_one_done
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert timeout_s <= waited <= timeout_s + 30, f"took {waited:.1f}s after round 1 with dist.timeout_s={timeout_s}"
    failures = [ln for ln in err.splitlines() if ln.startswith("unify-dist: run failed")]
    assert failures, err[-3000:]
    stage = "collective 'unify (avg) in round 2' failed after waiting up to dist.timeout_s = 20s"
    rank0 = "unify-dist: run failed (rank 0): CollectiveTimeout"
    assert any(ln.startswith(rank0) and stage in ln for ln in failures), failures
    assert all("rank 1" not in ln.split(":")[1] for ln in failures)  # the stalled owner never got to speak
    assert all("CollectiveTimeout" in ln and "round 2" in ln for ln in failures), failures
    assert "unify_dist/" not in err  # no traceback of ours
    time.sleep(1)
    assert _processes_mentioning(str(tmp_path)) == [], "a worker outlived the failed run"


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_nan_owner_through_the_cli(tmp_path: Path, data_root: Path, policy: str) -> None:
    args = [*QUICK, "--set", "train.max_rounds=2", "--set", f"unify.nonfinite={policy}"]
    args += ["--set", f"output.dir={tmp_path}"]
    proc = torchrun(args, nproc=2, env={FAULT_ENV: "nan:rank=1:round=1"}, module=FAULTS)
    if policy == "fail":
        assert proc.returncode != 0
        failures = [ln for ln in proc.stderr.splitlines() if ln.startswith("unify-dist: run failed")]
        named = ("owner 1 has non-finite weights in '", "owner(s) [1] have non-finite")  # rank 1's, rank 0's words
        assert failures, proc.stderr[-3000:]
        assert all("NonFiniteError" in ln and any(n in ln for n in named) for ln in failures), failures
        assert "unify_dist/" not in proc.stderr  # no traceback of ours
        assert not (tmp_path / "metrics.jsonl").exists() or _records(tmp_path) == []
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(tmp_path)
    assert [r["skipped"] for r in records] == [[1], []]
    assert "round 1: owner 1 had non-finite weights and was left out of this unify" in proc.stderr
    assert all(len({o["digest"] for o in r["owners"]}) == 1 for r in records)


def _disagreeing_owners(rank: int, world: int) -> str:
    """Rank 1 picks another rule and sends overlap's unify in pieces, rank 2 another architecture: every rank
    must refuse, naming all three."""
    rule, hidden, pieces = ("max" if rank == 1 else "avg"), (64 if rank == 2 else 128), (4 if rank == 1 else 1)
    cfg = RunConfig(unify=UnifyConfig(rule=rule, overlap_fragments=pieces), model=ModelConfig(hidden=hidden))
    model = build_model(cfg.model, 1, 10, 28)
    try:
        check_consistency(fingerprint(cfg, model, [str(c) for c in range(10)]), world)
    except UserError as e:
        return str(e)
    return "started"


def test_owners_that_disagree_are_stopped_on_every_rank() -> None:
    messages = run_world(_disagreeing_owners, 3)
    assert len(set(messages)) == 1, messages  # the same verdict everywhere
    assert "'unify.rule' differs: rank 0 has 'avg', rank(s) [1] have 'max'" in messages[0]
    assert "'model architecture' differs" in messages[0] and "rank(s) [2]" in messages[0]
    assert "'unify.overlap_fragments' differs: rank 0 has 1, rank(s) [1] have 4" in messages[0]


def test_owners_that_agree_start() -> None:
    messages = run_world(_agreeing_owners, 2)
    assert messages == ["started", "started"]


def _agreeing_owners(rank: int, world: int) -> str:
    cfg = RunConfig()
    model = build_model(cfg.model, 1, 10, 28)
    check_consistency(fingerprint(cfg, model, [str(c) for c in range(10)]), world)
    return "started"


@pytest.mark.parametrize(
    "text,fault",
    [("stall:rank=1:round=2", Fault("stall", 1, 2)), ("nan:round=3:rank=0", Fault("nan", 0, 3))],
)
def test_fault_hook_parses(text: str, fault: Fault) -> None:
    assert parse_fault(text) == fault


@pytest.mark.parametrize("text", ["stall", "crash:rank=1:round=2", "nan:rank=1", "nan:rank=1:round=2:extra=3"])
def test_fault_hook_refuses_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="UNIFY_DIST_FAULT"):
        parse_fault(text)


def test_checkpointer_skips_damaged_files_with_a_one_line_warning(tmp_path: Path) -> None:
    warnings: list[str] = []
    ckpt = Checkpointer(tmp_path, owner="rank0", keep=3, warn=warnings.append)
    stale = ckpt.dir / ".round_00002.pt.tmp99999999"  # as if a process died mid-write
    for round_ in (1, 2, 3):
        if round_ == 2:
            stale.write_bytes(b"half a checkpoint")
        ckpt.save(round_, {"model": {"w": torch.full((3,), float(round_))}})
    assert not stale.exists()
    ckpt.path(3).write_bytes(ckpt.path(3).read_bytes()[:100])
    assert ckpt.readable_rounds() == [2, 1]
    assert len(warnings) == 1 and "\n" not in warnings[0] and str(ckpt.path(3)) in warnings[0]
    ckpt.save(4, {"model": {}})  # keep = 3: round 1 goes, the damaged round 3 stays until it ages out
    assert ckpt.rounds() == [4, 3, 2]
