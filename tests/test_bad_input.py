"""Bad input gets one clear line on stderr and exit code 2, never a traceback, through the real CLI.

Single-process cases run `python -m unify_dist train ...` as subprocesses; they are launched together by
one fixture (each one spends most of its time importing torch, so running a few at once keeps this file
quick on a small machine) and each parametrized test checks one of them. label_split with more owners than
classes needs a group of 11, folder owners with different classes a group of 2: their ranks are forked the
same way, in one real group (tests.world.cli_world).
"""

from __future__ import annotations

import json

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.test_folder_owners import make_owner_folder
from tests.world import cli, cli_world, merged

ERROR_PREFIX = "unify-dist: error:"
TINY = ["--set", "data.train_per_owner=200", "--set", "data.test_size=200", "--set", "train.max_rounds=1"]

# id -> (CLI arguments after `train`, extra environment, a phrase the error line must contain).
# "{tmp}" stands for a scratch folder holding bad.toml (malformed) and empty/ (a data root with no data).
CASES: dict[str, tuple[list[str], dict[str, str], str]] = {
    "missing config file": (["--config", "{tmp}/nope.toml"], {}, "does not exist"),
    "malformed TOML": (["--config", "{tmp}/bad.toml"], {}, "is not valid TOML"),
    "unknown key": (["--set", "train.learning_rate=0.1"], {}, "unknown config key 'train.learning_rate'"),
    "unknown --set section": (["--set", "training.lr=0.1"], {}, "unknown config key 'training'"),
    "section given a value": (["--set", "train=3"], {}, "'train' is a section"),
    "wrong type": (["--set", 'train.batch_size="big"'], {}, "train.batch_size must be of type int"),
    "bool for an int": (["--set", "train.max_rounds=true"], {}, "train.max_rounds must be of type int"),
    "unknown rule": (["--set", "unify.rule=no_such_rule"], {}, "unify.rule = 'no_such_rule' is not known"),
    "unknown compared rule": (["--set", "unify.compare=avg,bogus"], {}, "unify.rule = 'bogus' is not known"),
    "unknown dataset": (["--set", "data.dataset=imagenet"], {}, "data.dataset = 'imagenet' is not known"),
    "unknown model": (["--set", "model.name=vgg16"], {}, "model.name = 'vgg16' is not known"),
    "lr zero": (["--set", "train.lr=0"], {}, "train.lr must be > 0"),
    "lr negative": (["--set", "train.lr=-0.1"], {}, "train.lr must be > 0"),
    "batch_size zero": (["--set", "train.batch_size=0"], {}, "train.batch_size must be > 0"),
    "batch_size negative": (["--set", "train.batch_size=-8"], {}, "train.batch_size must be > 0"),
    "target_accuracy above 1": (["--set", "train.target_accuracy=1.5"], {}, "train.target_accuracy is a fraction"),
    "unknown nonfinite policy": (["--set", "unify.nonfinite=ignore"], {}, "unify.nonfinite = 'ignore' is not known"),
    "timeout zero": (["--set", "dist.timeout_s=0"], {}, "dist.timeout_s must be > 0"),
    "unknown device": (["--set", "dist.device=gpu"], {}, "dist.device = 'gpu' is not known"),
    "nccl on the cpu": (["--set", "dist.device=cpu", "--set", "dist.backend=nccl"], {}, "NCCL reduces GPU tensors only"),
    "keep no checkpoints": (["--set", "output.keep_checkpoints=0"], {}, "output.keep_checkpoints must be >= 1"),
    "--set without =": (["--set", "train.lr"], {}, "has no '='"),
    "folder without partition": (["--set", "data.dataset=folder", "--set", "data.folder=x"], {}, "go together"),
    "dataset missing offline": (
        ["--set", "data.download=false", *TINY, "--set", "output.dir={tmp}/run"],
        {"UNIFY_DIST_DATA_ROOT": "{tmp}/empty"},
        "{tmp}/empty",
    ),
    "owner folder missing": (
        ["--set", "data.dataset=folder", "--set", "data.partition=folder", "--set", "data.folder={tmp}/nobody{rank}",
         "--set", "output.dir={tmp}/run"],
        {},
        "owner 0's image folder '{tmp}/nobody0' does not exist",
    ),  # fmt: skip
    "several problems at once": (["--set", "train.lr=0", "--set", "model.hidden=0"], {}, "model.hidden must be > 0"),
}


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


def _run_case(case: str, tmp: Path) -> subprocess.CompletedProcess:
    args, env, _ = CASES[case]
    return cli(["train", *(_fill(a, tmp) for a in args)], env={k: _fill(v, tmp) for k, v in env.items()})


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bad_input")
    (tmp / "bad.toml").write_text('[train]\nlr = 0.1\nbatch_size = "unterminated\n')
    (tmp / "empty").mkdir()
    return tmp


@pytest.fixture(scope="module")
def outcomes(scratch: Path) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = pool.map(lambda case: _run_case(case, scratch), CASES)
        return dict(zip(CASES, procs))


def assert_one_clear_line(proc: subprocess.CompletedProcess, phrase: str) -> None:
    """Exit code 2, the last stderr line is our error line with `phrase`, and no traceback anywhere."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines and lines[-1].startswith(ERROR_PREFIX), proc.stderr[-2000:]
    assert phrase in lines[-1], lines[-1]
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(case: str, outcomes: dict, scratch: Path) -> None:
    assert_one_clear_line(outcomes[case], _fill(CASES[case][2], scratch))


@pytest.mark.parametrize(("setting", "phrase"), [
    ("dist.backend=nccl", "dist.backend = 'nccl' needs CUDA"),
    ("dist.device=cuda", "dist.device = 'cuda' but this machine has no usable GPU"),
])  # fmt: skip
def test_gpu_choices_without_cuda(setting: str, phrase: str, scratch: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so the GPU choices are valid")
    proc = cli(["train", "--set", setting, "--set", f"output.dir={scratch}/run"])
    assert_one_clear_line(proc, phrase)


def assert_workers_said(proc: subprocess.CompletedProcess, phrase: str) -> None:
    """Under torchrun: it fails, the workers printed our one line, and no traceback comes from our code.

    torchrun adds its own failure report (with a traceback of the launcher itself) after the workers' lines.
    The workers' exit codes are not checked: torchrun ends the others as soon as the first one exits.
    """
    ours = [ln for ln in proc.stderr.splitlines() if ERROR_PREFIX in ln]
    assert proc.returncode != 0
    assert ours, proc.stderr[-3000:]  # torchrun may stop a worker before it speaks: at least one line, all whole
    assert all(ln.startswith(ERROR_PREFIX) and ln.count(ERROR_PREFIX) == 1 and phrase in ln for ln in ours), ours
    assert "unify_dist/" not in proc.stderr, proc.stderr[-3000:]  # no frame of ours in any traceback


@pytest.mark.slow
def test_folder_owners_with_different_class_names_train_on_their_union(tmp_path: Path) -> None:
    # Not a mistake any more (issue 11): owners agree on the union of their class folders; each owner that
    # lacks a class still takes part. A misspelt folder therefore shows up as one more class, named in the record.
    make_owner_folder(tmp_path / "owner0", seed=0, per_class=6)
    make_owner_folder(tmp_path / "owner1", seed=1, per_class=6)
    (tmp_path / "owner1" / "dots").rename(tmp_path / "owner1" / "spots")
    proc = merged(cli_world([
        "train", "--set", "data.dataset=folder", "--set", "data.partition=folder",
        "--set", f"data.folder={tmp_path}/owner{{rank}}", "--set", "data.image_size=16", "--set", "model.name=mlp",
        "--set", "train.max_rounds=1", "--set", f"output.dir={tmp_path / 'run'}",
    ], 2))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(record["per_class"]["unified"]) == 4  # circle, dots, spots, stripes


def test_label_split_with_more_owners_than_classes(tmp_path: Path, data_root: Path) -> None:
    # 11 ranks of one real group (forked, as torchrun's workers would be started but without its agent: the
    # check runs once the group exists, so no single-process run can meet it). Each rank's own words are seen.
    ranks = cli_world(["train", "--set", "data.partition=label_split", *TINY, "--set", f"output.dir={tmp_path}"], 11)
    said = "\n".join(p.stderr for p in ranks)
    assert all(p.returncode != 0 for p in ranks), [p.returncode for p in ranks]
    assert any(p.returncode == 2 for p in ranks), said[-3000:]  # a user mistake, not a failed run
    ours = [ln for ln in said.splitlines() if ERROR_PREFIX in ln]
    assert ours, said[-3000:]
    assert all(ln.startswith(ERROR_PREFIX) and ln.count(ERROR_PREFIX) == 1 and "11 owners > 10 classes" in ln
               for ln in ours), ours  # fmt: skip
    assert "Traceback" not in said and "unify_dist/" not in said, said[-3000:]
    assert not (tmp_path / "checkpoints").exists()
