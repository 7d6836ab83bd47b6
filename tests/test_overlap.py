"""Overlapped unify (unify.overlap): round r's unify in the background, applied at the end of round r+1 with
that round's progress on top. On real gloo groups against the schedule worked by hand on stacked tensors
(the unified state every owner holds, proven by digests every round), through the program with a kill and
resume bit-identical, and the combinations it does not serve refused in one line."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.world import cli_world, merged, run_world
from unify_dist.app.config import RunConfig, TrustConfig
from unify_dist.collectives import tail_size
from unify_dist.config import TrainConfig, UnifyConfig
from unify_dist.flat import FlatState
from unify_dist.overlap import MIN_PIECE, PACE_SHARE, OverlappedUnifier, _Pace

ROUNDS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))  # BatchNorm: an integer buffer too


def _progress(rank: int, n: int, round_: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(100 * round_ + rank)) * (rank + 1) * 0.1


def _overlapped(rank: int, world: int, start: str) -> dict:
    model = _model()
    flat = FlatState(model, tail=tail_size(world, model))
    unifier = OverlappedUnifier(model, flat, UnifyConfig(overlap_start=start), dist.new_group(backend="gloo"))
    held, own, digests = [], [], []
    for round_ in range(1, ROUNDS + 1):
        unifier.begin_round()
        own.append(flat.values.clone())  # what this owner trains on
        flat.values.add_(_progress(rank, flat.numel, round_))  # "training"
        digests.append(unifier.unify().digest)
        held.append(flat.values.clone())  # the unified state, the same on every owner
    unifier.finish()
    return {"held": held, "own": own, "digests": digests, "final": flat.values.clone()}


def _by_hand(world: int, begin: str) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], torch.Tensor]:
    """a_1 = start; a round starts from b_i (own: x_i; eager: a + (x_i - a) / W; unified: a); at the end of
    round r: a_r = mean(s_{r-1}), x_i <- x_i - b_i + a_r, s_{r,i} = x_i."""
    start = FlatState(_model()).values.clone()
    x = [start.clone() for _ in range(world)]
    sent, unified = None, start.clone()
    held, own = [], []
    for round_ in range(1, ROUNDS + 1):
        b = {"own": x, "eager": [unified + (xi - unified) / world for xi in x], "unified": [unified] * world}[begin]
        own.append([bi.clone() for bi in b])
        x = [bi + _progress(i, start.numel(), round_) for i, bi in enumerate(b)]
        if sent is not None:
            unified = torch.stack(sent).mean(0)
            x = [xi - bi + unified for xi, bi in zip(x, b)]
        sent = [xi.clone() for xi in x]
        held.append(unified)
    return held, own, torch.stack(sent).mean(0)


@pytest.mark.parametrize(("world", "start"), [(2, "own"), (3, "own"), (3, "eager"), (2, "unified")])
def test_overlapped_schedule_by_hand_on_every_rank(world: int, start: str) -> None:
    results = run_world(_overlapped, world, start)
    held, own, final = _by_hand(world, start)
    for rank, r in enumerate(results):
        assert r["digests"] == results[0]["digests"] and None not in r["digests"]
        for round_ in range(ROUNDS):
            torch.testing.assert_close(r["held"][round_], held[round_], rtol=1e-5, atol=1e-6)
            assert torch.equal(r["held"][round_], results[0]["held"][round_])  # identical bits on every owner
            torch.testing.assert_close(r["own"][round_], own[round_][rank], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["final"], final, rtol=1e-5, atol=1e-6)
        assert torch.equal(r["final"], results[0]["final"])
    if start != "unified":
        assert not torch.equal(results[0]["own"][2], results[1]["own"][2])  # owners train on their own weights
    else:
        assert torch.equal(results[0]["own"][2], results[0]["held"][1])  # round 3 trains from round 2's unified state


FRAGMENTS, TRAIN_S = 4, 0.2


def _fragmented(rank: int, world: int) -> dict:
    """The same rounds with the background unify in one burst and in FRAGMENTS paced pieces; each round
    "trains" for TRAIN_S (a sleep: what is tested is the pieces' start times against the round's length)."""
    out = {}
    for fragments in (1, FRAGMENTS):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.Linear(256, 10))  # 19.7K values: 4 pieces
        flat = FlatState(model, tail=tail_size(world, model))
        cfg = UnifyConfig(overlap_start="unified", overlap_fragments=fragments)
        unifier = OverlappedUnifier(model, flat, cfg, dist.new_group(backend="gloo"))
        held, paces = [], []
        for round_ in range(1, ROUNDS + 1):
            unifier.begin_round()
            time.sleep(TRAIN_S)
            flat.values.add_(_progress(rank, flat.numel, round_))
            unifier.unify()
            held.append(flat.values.clone())
            paces.append(unifier.pace)
        unifier.finish()
        out[fragments] = {"held": held, "final": flat.values.clone(), "started": [p and p.started for p in paces]}
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_fragments_spread_the_unify_and_keep_its_values(world: int) -> None:
    results = run_world(_fragmented, world)
    one, paced = [r[1] for r in results], [r[FRAGMENTS] for r in results]
    for rank in range(world):
        for round_ in range(ROUNDS):
            assert torch.equal(paced[rank]["held"][round_], paced[0]["held"][round_])  # identical on every owner
            if world == 2:  # one sum per element: the same bits as one burst
                assert torch.equal(paced[rank]["held"][round_], one[rank]["held"][round_])
            else:  # gloo's ring may add an element's terms in another order
                torch.testing.assert_close(paced[rank]["held"][round_], one[rank]["held"][round_], rtol=1e-6, atol=1e-7)
        assert torch.equal(paced[rank]["final"], paced[0]["final"])
        # each round's pieces: piece k after k / 4 of 3/4 of TRAIN_S (the last round's: hurried by finish())
        for started in paced[rank]["started"][:-1]:
            assert len(started) == FRAGMENTS
            assert all(t >= k * PACE_SHARE * TRAIN_S / FRAGMENTS - 1e-3 for k, t in enumerate(started)), started
            assert started[-1] >= PACE_SHARE * TRAIN_S * (FRAGMENTS - 1) / FRAGMENTS - 1e-3
        assert one[rank]["started"] == [None] * ROUNDS


def test_hurried_pieces_go_at_once() -> None:
    tensor = torch.arange(4 * MIN_PIECE, dtype=torch.float32)
    pace, pieces = _Pace(4, seconds=600.0), []
    sender = threading.Thread(target=lambda: [pieces.append(p) for p in pace(tensor)])
    sender.start()
    time.sleep(0.2)
    assert len(pieces) < 4  # the last one's slot is 450 s away
    pace.hurry()
    sender.join(timeout=60)
    assert not sender.is_alive() and len(pieces) == 4
    assert torch.equal(torch.cat(pieces), tensor)  # consecutive slices, all of it
    assert list(_Pace(4, 600.0)(torch.ones(3))) and len(list(_Pace(4, 600.0)(torch.ones(3)))) == 1  # small: whole


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_overlap_through_the_program_resumes_bit_identical(tmp_path: Path, data_root) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    base = ["train", "--config", "configs/demo_cpu.toml", "--set", "data.train_per_owner=600", "--set",
            "data.test_size=400", "--set", "train.threads=1", "--set", "output.progress=false", "--set",
            "unify.overlap=true", "--set", "unify.outer=nesterov", "--set", "train.local_steps=6",
            "--set", "unify.normalize_steps=true", "--set", "unify.overlap_start=eager"]  # fmt: skip
    # the cut run stops after round 2 and resumes; it sends in 8 pieces (the same sums with 2 owners: same bits)
    for out, rounds, pieces in ((whole, 4, 1), (cut, 2, 8), (cut, 4, 8)):
        proc = merged(cli_world([*base, "--set", f"train.max_rounds={rounds}", "--set", f"output.dir={out}",
                                 "--set", f"unify.overlap_fragments={pieces}"], 2))  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from round 2" in proc.stdout
    assert "oscillates" not in proc.stdout  # an outer step: no label-skew advice
    a, b = _records(whole), _records(cut)
    assert [r["digest"] for r in a] == [r["digest"] for r in b] and len(a) == ROUNDS
    assert len({r["digest"] for r in a}) == ROUNDS  # the unified state moves every round
    final_a = torch.load(whole / "final.pt", weights_only=True)["model"]
    final_b = torch.load(cut / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


@pytest.mark.parametrize(
    ("cfg", "words"),
    [(RunConfig(unify=UnifyConfig(overlap=True, rule="median")), "serves avg and weighted_avg, not unify rule 'median'"),
     (RunConfig(unify=UnifyConfig(overlap=True, compress="int8")), "unify.compress = 'int8'"),
     (RunConfig(unify=UnifyConfig(overlap=True, compare=["max"])), "side-by-side candidates"),
     (RunConfig(unify=UnifyConfig(overlap=True), trust=TrustConfig(enabled=True, roster="pyproject.toml", key="k",
                                                                    owner="o")), "sealed ring"),
     (RunConfig(unify=UnifyConfig(overlap=True), train=TrainConfig(scaffold=True)), "SCAFFOLD"),
     (RunConfig(unify=UnifyConfig(overlap=True, overlap_start="late")), "unify.overlap_start"),
     (RunConfig(unify=UnifyConfig(overlap_start="eager")), "unify.overlap is off"),
     (RunConfig(unify=UnifyConfig(overlap_fragments=4)), "overlap_fragments = 4 spreads"),
     (RunConfig(unify=UnifyConfig(overlap=True, overlap_fragments=0)), "overlap_fragments must be >= 1")],
)  # fmt: skip
def test_overlap_refuses_what_it_does_not_serve(cfg: RunConfig, words: str) -> None:
    (problem,) = cfg.problems()
    assert words in problem
