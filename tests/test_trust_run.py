"""Trust through the real program: 2 owners in one real group (forked ranks, torchrun's worker environment),
generated keys on one machine. With trust on the run is admitted, sealed and learns with identical weights;
an impostor's key is refused with exit 2. Two torchrun agents with trust off warn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.world import cli, cli_world, merged

SMALL = ["--config", "configs/demo_cpu.toml", "--set", "data.train_per_owner=500", "--set", "data.test_size=500",
         "--set", "train.max_rounds=2"]  # fmt: skip


def _keys(tmp: Path, names: list[str]) -> Path:
    """keygen for each owner; a roster listing them; returns the roster path."""
    lines = ["[owners]"]
    for i, name in enumerate(names):
        done = cli(["keygen", "--out", str(tmp / f"owner{i}.key"), "--name", name])
        assert done.returncode == 0, done.stderr
        lines.append(done.stdout.splitlines()[-1].split(": ", 1)[1])  # the printed roster line
    roster = tmp / "roster.toml"
    roster.write_text("\n".join(lines) + "\n")
    return roster


def _trust(tmp: Path, roster: Path) -> list[str]:
    sets = [f"trust.enabled=true", f"trust.roster={roster}", f"trust.key={tmp}/owner{{rank}}.key", "trust.owner=owner{rank}"]
    return [x for s in sets for x in ("--set", s)]


@pytest.mark.slow
def test_trust_on_admits_seals_and_learns(tmp_path: Path, data_root) -> None:
    roster = _keys(tmp_path, ["owner0", "owner1"])
    run_dir = tmp_path / "run"
    proc = merged(cli_world(["train", *SMALL, *_trust(tmp_path, roster), "--set", f"output.dir={run_dir}"], 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trust: on: admitted roster owners 0=owner0, 1=owner1" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(len({o["digest"] for o in r["owners"]}) == 1 for r in records)
    assert records[-1]["unified_test_acc"] > 0.3  # chance is 0.1


@pytest.mark.slow
def test_impostor_key_is_refused_with_exit_2(tmp_path: Path, data_root) -> None:
    roster = _keys(tmp_path, ["owner0", "owner1"])
    (tmp_path / "owner1.key").unlink()  # rank 1 now holds a key the roster has never seen
    assert cli(["keygen", "--out", str(tmp_path / "owner1.key")]).returncode == 0
    ranks = cli_world(["train", *SMALL, *_trust(tmp_path, roster), "--set", f"output.dir={tmp_path / 'run'}"], 2)
    proc = merged(ranks)
    assert proc.returncode != 0
    refusals = [line for line in proc.stderr.splitlines() if "admission refused" in line]
    assert refusals and all("rank slot 1: its key" in line and "is not in the roster" in line for line in refusals), proc.stderr[-2000:]
    assert [p.returncode for p in ranks] == [2, 2], proc.stderr[-2000:]  # both owners' processes exited 2
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no round ran


@pytest.mark.slow
def test_trust_off_across_machines_warns(tmp_path: Path, data_root) -> None:
    """Two torchrun agents (two 'machines', one owner each) with trust off: every owner says what that means."""
    import subprocess
    import sys

    from tests.world import free_port

    port, agents = free_port(), []
    for node_rank in (0, 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}", "--nproc_per_node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=trust-off", "-m", "unify_dist", "train",
            *SMALL, "--set", "train.max_rounds=1", "--set", "train.threads=1", "--set", f"output.dir={tmp_path}",
        ]  # fmt: skip
        agents.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [a.communicate(timeout=300) for a in agents]
    assert all(a.returncode == 0 for a in agents), outputs[0][1][-2000:]
    assert "trust: off" in outputs[0][0]  # rank 0's start-up lines
    for _, err in outputs:
        assert "owners are on several machines with trust off: anyone who reaches the rendezvous port" in err
