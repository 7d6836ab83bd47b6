"""Owners of several processes in the program (dist.procs_per_owner), on CPU/gloo.

What must be equal: 2 owners of 2 processes each (4 processes on one machine, as torchrun --nproc_per_node=4
starts them, procs_per_owner = 2) train the same thing as 2 single-process owners (2 processes) on the same
shares; the ranks are forked as torchrun's workers (tests.world.cli_world); a miscount goes through the real
`unify-dist launch`. Each process of an owner takes half of every batch of the owner's seeded order and the
two halves' gradients are averaged every step, so the owner's step is the single-process owner's full-batch
step up to float rounding (a sum in another order); the owners then unify with avg, as the single-process
owners do. So: the same rounds, step counts, names and shares; final weights equal to rounding (not bit for
bit); and inside the 4-process run, every process of every owner holds the same bits after every round (every
process's digest, in the record).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.world import cli, cli_world, merged
from unify_dist.app.config import RunConfig
from unify_dist.app.config import TrustConfig
from unify_dist.config import DistConfig, TrainConfig, UnifyConfig
from unify_dist.digest import state_digest

TINY = [
    "--config", "configs/demo_cpu.toml", "--set", "data.train_per_owner=200", "--set", "data.test_size=200",
    "--set", "model.name=mlp", "--set", "model.hidden=16", "--set", "train.max_rounds=2", "--set", "train.batch_size=32",
    "--set", "train.optimizer=sgd", "--set", "train.lr=0.05", "--set", "output.progress=false",
]  # fmt: skip


def _run(tmp_path: Path, name: str, nproc: int, procs: int) -> tuple[list[dict], dict]:
    out = tmp_path / name
    args = ["train", *TINY, "--set", f"dist.procs_per_owner={procs}", "--set", f"output.dir={out}"]
    proc = merged(cli_world(args, nproc))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, torch.load(out / "final.pt", weights_only=True)


@pytest.mark.slow
def test_two_owners_of_two_processes_train_as_two_single_process_owners(tmp_path: Path, data_root) -> None:
    single, single_final = _run(tmp_path, "single", nproc=2, procs=1)
    multi, multi_final = _run(tmp_path, "multi", nproc=4, procs=2)
    assert [r["round"] for r in multi] == [r["round"] for r in single] == [1, 2]
    for s, m in zip(single, multi):
        assert [o["name"] for o in m["owners"]] == [o["name"] for o in s["owners"]] == ["rank0", "rank1"]
        assert [(o["n_train"], o["steps"]) for o in m["owners"]] == [(o["n_train"], o["steps"]) for o in s["owners"]]
        for owner in m["owners"]:  # every process of every owner: the same bits as the record's digest
            assert owner["digest"] == m["digest"] and owner["process_digests"] == [m["digest"]] * 2
        assert "process_digests" not in s["owners"][0]
    assert state_digest(multi_final["model"].items()) == multi[-1]["digest"]  # final.pt is what every process held
    assert multi_final["model"].keys() == single_final["model"].keys()
    for name, weight in multi_final["model"].items():  # the same training, up to the order of a sum
        torch.testing.assert_close(weight, single_final["model"][name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_processes_that_do_not_divide_into_owners_are_refused_in_one_line(tmp_path: Path, data_root) -> None:
    launch = ["launch", "--standalone", "--nproc_per_node=3", "--", "train", *TINY]
    proc = cli([*launch, "--set", "dist.procs_per_owner=2", "--set", f"output.dir={tmp_path}"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("unify-dist")]
    assert len(lines) == 1 and "dist.procs_per_owner = 2 but 3 processes" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_settings_that_do_not_compose_with_owners_of_several_processes() -> None:
    two = DistConfig(procs_per_owner=2)
    assert RunConfig(dist=two).problems() == []
    assert RunConfig(dist=DistConfig(procs_per_owner=0)).problems() == [
        "dist.procs_per_owner must be >= 1 (processes per owner), got 0"
    ]
    refused = {
        "trust.enabled": RunConfig(dist=two, trust=TrustConfig(enabled=True, roster="r.toml", key="k", owner="a")),
        "unify.overlap": RunConfig(dist=two, unify=UnifyConfig(overlap=True)),
        "train.round_seconds": RunConfig(dist=two, train=TrainConfig(round_seconds=5)),
        "dist.device = 'cuda' over gloo": RunConfig(dist=DistConfig(procs_per_owner=2, device="cuda", backend="gloo")),
    }
    for key, cfg in refused.items():
        said = [p for p in cfg.problems() if p.startswith("dist.procs_per_owner = 2")]
        assert len(said) == 1 and key in said[0], (key, cfg.problems())
