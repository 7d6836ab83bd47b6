"""`unify-dist launch`: torch's launcher with one line per failure, through real subprocesses and torchrun.

A bad config stops before any worker starts; workers that agree on a user mistake give one line and exit
code 2 (plain torchrun: a line per worker, its ChildFailedError report, exit 1); any other failure gives
one line and exit code 1.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.test_bad_input import ERROR_PREFIX
from tests.test_folder_owners import make_owner_folder
from tests.test_new_user_failures import owners_that_disagree
from tests.world import cli
from unify_dist.app.launch import split_argv, verdict
from unify_dist.errors import UserError

LAUNCH = ["launch", "--standalone", "--nproc_per_node=2"]


def folder_owners(tmp_path: Path) -> list[str]:
    """Two tiny owner folders, one small model: a run of a few seconds."""
    make_owner_folder(tmp_path / "owner0", seed=0, per_class=6)
    make_owner_folder(tmp_path / "owner1", seed=1, per_class=6)
    return [
        "--set", "data.dataset=folder", "--set", "data.partition=folder", "--set", f"data.folder={tmp_path}/owner{{rank}}",
        "--set", "data.image_size=16", "--set", "model.name=mlp", "--set", "train.max_rounds=1",
        "--set", "output.progress=false",
    ]  # fmt: skip


def lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


def said(proc: subprocess.CompletedProcess) -> list[str]:
    """The program's own lines (a worker's library warnings are not the launcher's to hide)."""
    return [ln for ln in lines(proc) if ln.startswith("unify-dist:")]


def assert_no_launcher_report(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    assert "exitcode" not in proc.stderr and "closing signal" not in proc.stderr, proc.stderr[-3000:]


def test_bad_config_stops_before_any_worker(tmp_path: Path) -> None:
    logs = tmp_path / "logs"  # torchrun makes a folder here for every launch of workers
    proc = cli([*LAUNCH, "--log-dir", str(logs), "--", "train", "--set", "train.lr=0", "--set", f"output.dir={tmp_path}/run"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines(proc) == [f"{ERROR_PREFIX} train.lr must be > 0, got 0.0"], proc.stderr[-2000:]
    assert not logs.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv,phrase",
    [
        (["--nproc_per_node=2", "train"], "needs '--'"),
        (["--nproc_per_node=2", "--", "report", "x"], "launch runs 'train'"),
        (["--no-such-option", "--", "train"], "torchrun does not know the option(s) --no-such-option"),
        (["script.py", "--", "train"], "give only torchrun options before '--'"),
    ],
)
def test_launch_misuse_is_one_line(argv: list[str], phrase: str) -> None:
    from unify_dist.app.launch import main

    with pytest.raises(UserError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        main(argv)


def test_split_argv() -> None:
    assert split_argv(["--nproc_per_node=2", "--", "train", "--set", "a=1"]) == (["--nproc_per_node=2"], ["train", "--set", "a=1"])


def test_verdict_first_failure_decides() -> None:
    said = "unify-dist: error: owners disagree"
    # rank 1 said the mistake and exited 2 first; torchrun then stopped rank 0 with SIGTERM
    assert verdict({0: -15, 1: 2}, 1, {1: (2, said)}) == (2, said)
    assert verdict({0: 1}, 0, {0: (1, "unify-dist: run failed (rank 0): OSError: x")}) == (1, "unify-dist: run failed (rank 0): OSError: x")
    code, line = verdict({1: -6, 0: -15}, 1, {})
    assert code == 1 and "worker rank 1 was killed by SIGABRT" in line


@pytest.mark.slow
def test_workers_user_error_is_one_line_exit_2(tmp_path: Path) -> None:
    args, env = owners_that_disagree(tmp_path)  # the owners' model factories build different widths
    proc = cli([*LAUNCH, "--", *args], env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(said(proc)) == 1, proc.stderr[-3000:]  # not one per worker
    assert said(proc)[0].startswith(ERROR_PREFIX) and "'model architecture' differs" in said(proc)[0]
    assert_no_launcher_report(proc)


@pytest.mark.slow
def test_workers_other_failure_is_one_line_exit_1(tmp_path: Path) -> None:
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should go")
    proc = cli([*LAUNCH, "--", "train", *folder_owners(tmp_path), "--set", f"output.dir={blocker}"], timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(said(proc)) == 1 and said(proc)[0].startswith("unify-dist: run failed"), proc.stderr[-3000:]
    assert "FileExistsError" in said(proc)[0]
    assert_no_launcher_report(proc)


@pytest.mark.slow
def test_workers_success_exit_0(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    proc = cli([*LAUNCH, "--log-dir", str(logs), "--", "train", *folder_owners(tmp_path), "--set", f"output.dir={tmp_path}/run"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "final.pt").exists()
    assert any(logs.iterdir())  # workers that start leave a trace here: the bad-config test's witness
    assert "unify-dist: 2 owners" in proc.stdout
