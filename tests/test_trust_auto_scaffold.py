"""rule = auto's vote and SCAFFOLD's control variates with trust on: both go through the sealed ring.

Through the real program (2 owners in one real group, generated keys): the same run with trust on and off
learns, ends with identical weights on both owners, and matches the other bit for bit (with 2 owners
the ring adds in gloo's order; the vote's counts are whole numbers, exact in any order). A watch on
torch.distributed (tests/hooks/plain_watch.py) shows that, from the first unify on, trust on calls no
plaintext collective at all, while trust off calls the vote's and SCAFFOLD's all_reduce in the clear:
the check can fail. Each test is one Scaffold through a SealedRing (no program), or two runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.hooks.plain_watch import PLAIN_ENV
from tests.test_trust_run import SMALL, _keys, _trust
from tests.trust_keys import fresh_keys, key, roster_of
from tests.world import cli_world, merged, run_world
from unify_dist.config import ModelConfig
from unify_dist.models import build_model
from unify_dist.scaffold import Scaffold
from unify_dist.trust import SealedRing, admit

AUTO = len(("avg", "max", "absmax")) * 2 * 10  # the vote: correct and total per class (10), per candidate


def _control_variates(rank: int, world: int, raws: list[bytes]) -> dict:
    """One SCAFFOLD round's end, plain and through the sealed ring, from the same c_i."""
    ring = SealedRing(admit(key(raws[rank]), f"owner{rank}", roster_of(raws), run_id="scaffold"), segment_bytes=256)
    out = {}
    for name, reducer in (("plain", None), ("sealed", ring)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(7, 30), nn.ReLU(), nn.Linear(30, 3))
        scaffold = Scaffold(model, reducer=reducer)
        scaffold.begin_round()
        for step in range(3):  # a few steps of this owner's own gradients
            g = torch.Generator().manual_seed(100 * rank + step)
            model(torch.randn(5, 7, generator=g)).square().mean().backward()
            scaffold.correct_grads()
            model.zero_grad()
        calls = ring.calls
        scaffold.end_round()  # collective
        out[name] = (scaffold.mine.clone(), scaffold.shared.clone(), ring.calls - calls)
    mean = torch.zeros_like(out["plain"][0])  # the reference: every owner's c_i, gathered in the clear
    mines = [torch.empty_like(mean) for _ in range(world)]
    dist.all_gather(mines, out["plain"][0])
    out["mean"] = torch.stack(mines).mean(0)
    return out


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_scaffold_through_the_sealed_ring(world: int) -> None:
    results = run_world(_control_variates, world, fresh_keys(world))
    for r in results:
        mine, shared, calls = r["sealed"]
        assert calls == 1, "SCAFFOLD's all_reduce did not go through the ring"
        assert torch.equal(mine, r["plain"][0])
        assert torch.equal(shared.view(torch.int32), results[0]["sealed"][1].view(torch.int32))  # same bits everywhere
        if world == 2:  # a + b in either order: the ring's sum is gloo's, bit for bit
            assert torch.equal(shared, r["plain"][1])
        torch.testing.assert_close(shared, r["plain"][1], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(shared, r["mean"], rtol=1e-6, atol=1e-7)
        assert r["plain"][2] == 0  # the plain one made no ring call


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _plaintext(folder: Path) -> list[list[list]]:
    """Each rank's plaintext collectives from the first unify on: [name, dtype, elements]."""
    return [json.loads((folder / f"{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_auto_and_scaffold_with_trust_on_are_sealed_and_equal_trust_off(tmp_path: Path, data_root) -> None:
    trust = _trust(tmp_path, _keys(tmp_path, ["owner0", "owner1"]))
    args = ["train", *SMALL, "--set", "unify.rule=auto", "--set", "train.scaffold=true", "--set", "output.progress=false"]
    runs = {}
    for mode, extra in (("on", trust), ("off", [])):
        watch = tmp_path / f"plain_{mode}"
        watch.mkdir()
        proc = merged(cli_world([*args, *extra, "--set", f"output.dir={tmp_path / mode}"], 2,
                                module="tests.hooks.plain_watch", env={PLAIN_ENV: str(watch)}))  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = (_records(tmp_path / mode), _plaintext(watch))
    (on, on_plain), (off, off_plain) = runs["on"], runs["off"]
    assert [r["round"] for r in on] == [1, 2]
    assert all(len({o["digest"] for o in r["owners"]}) == 1 for r in on)  # identical weights on both owners
    assert on[-1]["unified_test_acc"] > 0.3  # learns (chance is 0.1)
    assert [r["rule_used"] for r in on] == [r["rule_used"] for r in off]  # the same votes
    assert [r["digest"] for r in on] == [r["digest"] for r in off]  # bit for bit as trust off

    assert on_plain == [[], []], on_plain  # trust on: nothing in the clear once the rounds run
    n_params = sum(p.numel() for p in build_model(ModelConfig(name="paper_cnn"), (1, 28, 28), 10).parameters())
    for seen in off_plain:  # trust off: the same calls are gloo's, in the clear
        assert ["all_reduce", "torch.float64", AUTO] in seen, seen
        assert ["all_reduce", "torch.float32", n_params] in seen, seen
