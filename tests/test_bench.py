"""The benchmark runs end to end and writes every section; the fast avg path it times equals torch's
average_parameters. No timing assertions: speed is what the benchmark reports, not what tests check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.world import cli, run_world
from benchmarks.bench import SECTIONS, collective_cost
from benchmarks.bench import main as bench_main
from unify_dist.config import ModelConfig, UnifyConfig
from unify_dist.flat import FlatState
from unify_dist.models import build_model
from unify_dist.collectives import tail_size
from unify_dist.unifier import Unifier


def _ratios(result: dict) -> list[float]:
    rows = result["unify"] + result["epoch"]["rows"] + result["stream"]["rows"] + result["scaling"] + result["absmax_memory"]
    return [r["ratio"] if "ratio" in r else r["ratio_vs_avg"] for r in rows]


def test_quick_bench_writes_every_section(tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--quick", "--models", "paper_cnn", "--owners", "2", "--scaling-owners", "2",
            "--sizes", "5000", "--epoch-images", "256", "--stream-items", "16", "--out", str(out)]  # fmt: skip
    proc = cli(args, timeout=300, module="benchmarks.bench")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(SECTIONS) <= set(result), sorted(result)
    assert all(result[s] for s in SECTIONS), [s for s in SECTIONS if not result[s]]
    ratios = _ratios(result)
    assert ratios and all(math.isfinite(r) and r > 0 for r in ratios), ratios
    targeted = [r for r in result["unify"] + result["epoch"]["rows"] + result["stream"]["rows"] + result["trust"]["rows"] if r["target"]]
    assert len(targeted) == 7 and all(isinstance(r["pass"], bool) for r in targeted)
    assert [m["items"] for m in result["stream"]["memory"]] == [16, 160, 1600]  # N, 10N, 100N, each in its own process
    assert {r["impl"] for r in result["absmax_memory"]} == {"avg", "absmax_reduce", "absmax_gather"}
    assert "avg unify" in proc.stdout and "average_parameters" in proc.stdout  # the table was printed
    verify, signing = result["records"]["verify"], result["records"]["signing"]
    assert verify[0]["rounds"] == 100 and verify[0]["problems"] == 0 and verify[0]["verify_s"] > 0
    assert [r["owners"] for r in signing] == [2] and signing[0]["sent_bytes"] == 120 and isinstance(signing[0]["pass"], bool)


@pytest.mark.parametrize("bad", [["--owners", "1"], ["--models", "vgg"], ["--sizes", "many"]])
def test_bad_option_is_one_line_and_exit_2(bad: list[str], capsys: pytest.CaptureFixture) -> None:
    assert bench_main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unify-dist: error:") and "\n" not in err


@pytest.mark.parametrize("n,chunk,collectives", [(10, 4, 1 + 3), (8, 8, 1 + 1), (8, 100, 1 + 1)])
def test_gather_cost_counts_one_collective_per_chunk(n: int, chunk: int, collectives: int) -> None:
    assert collective_cost("absmax", "gather", n, 0, 3, chunk)["collectives"] == collectives
    assert collective_cost("avg", "reduce", n, 2, 3, chunk)["collectives"] == 1  # int counters ride in the tail
    # absmax's keys are as wide as the floats: the same payload as avg
    avg_cost = collective_cost("avg", "reduce", n, 2, 3, chunk)
    assert collective_cost("absmax", "reduce", n, 2, 3, chunk) == {**avg_cost, "rule": "absmax"}


def _avg_both_ways(rank: int, world: int) -> dict[str, list[torch.Tensor]]:
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    torch.manual_seed(rank)  # every owner starts different
    ours = build_model(ModelConfig(name="paper_cnn"), 1, 10, 28)
    theirs = build_model(ModelConfig(name="paper_cnn"), 1, 10, 28)
    theirs.load_state_dict(ours.state_dict())
    before = [p.detach().clone() for p in ours.parameters()]
    Unifier.over(FlatState(ours, tail=tail_size(world)), UnifyConfig()).unify(rule="avg")
    average_parameters(theirs.parameters(), None)
    return {"before": before, "ours": [p.detach().clone() for p in ours.parameters()],
            "theirs": [p.detach().clone() for p in theirs.parameters()]}  # fmt: skip


def test_fast_avg_equals_torch_average_parameters() -> None:
    results = run_world(_avg_both_ways, 2)
    for r in results:
        for ours, theirs in zip(r["ours"], r["theirs"], strict=True):
            torch.testing.assert_close(ours, theirs)
    assert not torch.equal(results[0]["before"][0], results[0]["ours"][0])  # it really averaged something
    for ours, a, b in zip(results[0]["ours"], results[0]["before"], results[1]["before"], strict=True):
        torch.testing.assert_close(ours, (a + b) / 2)
