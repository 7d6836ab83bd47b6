"""Compressed unification (unify.compress = bf16 / fp16 / int8) on real gloo groups of 2 and 3 ranks.

Checked: every rank ends with the same bits (digests and values), close to the uncompressed rule; the
int8 sum cannot overflow at its extreme; error feedback carries what a round could not send (and a
run with the residual dropped each round misses by far more); a checkpoint of state_dict() restored
into a fresh Unifier resumes bit for bit; rules for which lossy transport makes no sense are refused;
through the sealed ring (trust on) every mode ends with the same bits as through gloo.
One spawned group per world size runs the cases (spawning is the slow part).
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.world import cli_world, merged, run_world
from unify_dist.collectives import tail_size
from unify_dist.config import UnifyConfig
from unify_dist.flat import FlatState
from unify_dist.models import MODELS
from unify_dist.unifier import Unifier
from unify_dist.wrappers import COMPRESS_BLOCK, int8_levels

MODES = ("bf16", "fp16", "int8")
N = 3 * COMPRESS_BLOCK + 61  # three whole int8 blocks and a short one


class _Vec(nn.Module):
    """One flat parameter and an integer counter: the smallest model with both kinds of state."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(N))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))


def _unifier(world: int, **options) -> tuple[_Vec, FlatState, Unifier]:
    model = _Vec()
    flat = FlatState(model, tail=tail_size(world, model))
    return model, flat, Unifier.over(flat, UnifyConfig(**options))


def _update(rank: int, round_: int = 0) -> torch.Tensor:
    """Owner `rank`'s update in a round: reproducible anywhere, magnitudes differing by block."""
    g = torch.Generator().manual_seed(100 * round_ + rank)
    return torch.randn(N, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 0.1]).repeat_interleave(COMPRESS_BLOCK)[:N]


def _weight(rank: int) -> float:
    return float(10 * (rank + 1))


# ------------------------------------------------------------------------------------ one group per world size
def _one_round(rank: int, world: int, mode: str, rule: str, sick: bool = False) -> tuple:
    model, flat, unifier = _unifier(world, rule=rule, compress=mode, nonfinite="skip")
    model.steps.fill_(5 + rank)
    flat.values.add_(_update(rank))
    if sick and rank == 1:
        flat.values[7] = float("nan")
    outcome = unifier.unify(weight=_weight(rank))  # verify=True: DivergenceError if any rank differs
    return flat.values.clone(), outcome.digest, outcome.bytes_sent, outcome.skipped, int(model.steps)


def _extreme(rank: int, world: int) -> torch.Tensor:
    """int8 at its edge: every owner sends +max in block 0 and -max in block 1, all quantised to +-levels,
    so the int8 SUM is +-W x levels; a wrap past 127 would flip the sign."""
    _, flat, unifier = _unifier(world, compress="int8")
    flat.values[:COMPRESS_BLOCK] = 3.0
    flat.values[COMPRESS_BLOCK : 2 * COMPRESS_BLOCK] = -3.0
    unifier.unify()
    return flat.values.clone()


def _refused_at_runtime(rank: int, world: int) -> str:
    _, _, unifier = _unifier(world, compress="int8")
    try:
        unifier.unify(rule="max")
    except ValueError as e:
        return str(e)
    return "no error"


def _feedback(rank: int, world: int, mode: str, keep_residual: bool, rounds: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """`rounds` rounds in which every owner's update is `_sub_resolution(mode)`: returns (the unified
    weights, which are the sum of the rounds' unified updates since the start is 0, this owner's residual)."""
    _, flat, unifier = _unifier(world, compress=mode)
    update = _sub_resolution(mode)
    for _ in range(rounds):
        if not keep_residual:
            unifier.compress.residual.zero_()  # what a transport without error feedback would do
        flat.values.add_(update)  # the anchor is the last unified state: this is the round's update
        unifier.unify()
    return flat.values.clone(), unifier.compress.residual.clone()


def _sub_resolution(mode: str) -> torch.Tensor:
    """An update that loses 0.4 of a resolution step to every compression, every round: bf16/fp16 values
    just above 1.0; int8 blocks whose first element (1.0) sets the scale and the rest lie below half a level."""
    if mode == "int8":
        update = torch.full((N,), 0.4 / int8_levels(2))
        update[::COMPRESS_BLOCK] = 1.0
        return update
    eps = torch.finfo(torch.bfloat16 if mode == "bf16" else torch.float16).eps
    return torch.full((N,), 1.0 + 0.4 * eps)


def _resolution(mode: str) -> float:
    return 1.0 / int8_levels(2) if mode == "int8" else torch.finfo(torch.bfloat16 if mode == "bf16" else torch.float16).eps


def _resume(rank: int, world: int, mode: str) -> dict[str, object]:
    """Three rounds straight, against two rounds, a checkpoint of state_dict() restored into a fresh
    Unifier, and round three; plus a restore that drops the residual (which must differ)."""
    cfg = dict(rule="weighted_avg", compress=mode)

    def round_(flat: FlatState, unifier: Unifier, r: int) -> None:
        flat.values.add_(_update(rank, r) * 1e-2)  # this owner's local training, from the unified state
        unifier.unify(weight=_weight(rank))

    _, flat, straight = _unifier(world, **cfg)
    for r in (1, 2, 3):
        round_(flat, straight, r)
    out: dict[str, object] = {"straight": flat.values.clone()}
    _, flat, first = _unifier(world, **cfg)
    for r in (1, 2):
        round_(flat, first, r)
    blob = io.BytesIO()
    torch.save({"weights": flat.values.clone(), "unifier": first.state_dict()}, blob)
    for name, drop in (("resumed", False), ("no_residual", True)):
        blob.seek(0)
        saved = torch.load(blob, weights_only=True)  # as a checkpoint is read
        if drop:
            del saved["unifier"]["compress_residual"]
        _, fresh_flat, fresh = _unifier(world, **cfg)
        fresh_flat.values.copy_(saved["weights"])
        fresh.load_state_dict(saved["unifier"])
        round_(fresh_flat, fresh, 3)
        out[name] = fresh_flat.values.clone()
    out["residual_norm"] = float(first.state_dict()["compress_residual"].norm())
    return out


def _all_cases(rank: int, world: int) -> dict[tuple, object]:
    results: dict[tuple, object] = {}
    for mode in ("none", *MODES):
        for rule in ("avg", "weighted_avg"):
            results[("round", mode, rule)] = _one_round(rank, world, mode, rule)
    for mode in MODES:
        results[("skip", mode)] = _one_round(rank, world, mode, "avg", sick=True)
        results[("resume", mode)] = _resume(rank, world, mode)
    results[("extreme",)] = _extreme(rank, world)
    results[("refused",)] = _refused_at_runtime(rank, world)
    if world == 2:
        for mode in MODES:
            for keep in (True, False):
                results[("feedback", mode, keep)] = _feedback(rank, world, mode, keep)
    return results


@functools.cache
def _results(world: int) -> list[dict[tuple, object]]:
    return run_world(_all_cases, world)


# ------------------------------------------------------------------------------------ the checks
def _reference(world: int, rule: str, healthy: list[int]) -> torch.Tensor:
    stacked = torch.stack([_update(r).double() for r in healthy])
    w = torch.tensor([_weight(r) if rule == "weighted_avg" else 1.0 for r in healthy], dtype=torch.float64)
    return (stacked * w[:, None]).sum(0) / w.sum()


def _tolerance(mode: str, world: int, healthy: list[int]) -> torch.Tensor:
    """Per element: one rounding step of each owner's largest value in that block."""
    top = torch.stack([_update(r).abs() for r in healthy]).amax(0)
    block_top = torch.stack([top[i : i + COMPRESS_BLOCK].amax() for i in range(0, N, COMPRESS_BLOCK)])
    if mode == "int8":
        return block_top.repeat_interleave(COMPRESS_BLOCK)[:N] / int8_levels(world)
    return top * torch.finfo(torch.bfloat16 if mode == "bf16" else torch.float16).eps + 1e-7


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", ["avg", "weighted_avg"])
def test_every_rank_holds_the_same_bits_close_to_the_rule(world: int, mode: str, rule: str) -> None:
    per_rank = [r[("round", mode, rule)] for r in _results(world)]
    values, digest, sent, skipped, steps = per_rank[0]
    for other in per_rank[1:]:
        assert torch.equal(other[0], values) and other[1] == digest
    assert skipped == [] and steps == 5 + world - 1  # counters: the furthest owner
    error = (values.double() - _reference(world, rule, list(range(world)))).abs()
    assert (error <= _tolerance(mode, world, list(range(world)))).all(), float(error.max())
    assert error.max() > 0  # it did compress


@pytest.mark.parametrize("world", [2, 3])
def test_bytes_sent_per_unify(world: int) -> None:
    """What each path hands to ring collectives, header bytes included (one int64 counter here):
    none: one float32 all_reduce of values and tail; bf16/fp16: an all_gather of 2 bytes per weight plus
    flag, weight and counter; int8: an all_reduce of scales, flags, weights and counter pieces, then
    one of 1 byte per weight."""
    sent = {mode: _results(world)[0][("round", mode, "avg")][2] for mode in ("none", *MODES)}
    ring = 2 * (world - 1) / world
    blocks = -(-N // COMPRESS_BLOCK)
    assert sent["none"] == int(ring * 4 * (N + world + 1 + 3 * world))  # a counter rides as 3 exact pieces
    assert sent["bf16"] == sent["fp16"] == (world - 1) * (8 + 8 + 2 * N)
    assert sent["int8"] == int(ring * 4 * (blocks + 2 * world + 3 * world)) + int(ring * N)
    assert sent["int8"] < sent["bf16"] < sent["none"]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_skip_leaves_a_sick_owner_out(world: int, mode: str) -> None:
    per_rank = [r[("skip", mode)] for r in _results(world)]
    healthy = [r for r in range(world) if r != 1]
    for values, _, _, skipped, _ in per_rank:
        assert skipped == [1]
        assert torch.equal(values, per_rank[0][0])
        error = (values.double() - _reference(world, "avg", healthy)).abs()
        assert (error <= _tolerance(mode, world, healthy)).all()


@pytest.mark.parametrize("world", [2, 3])
def test_int8_sum_cannot_overflow(world: int) -> None:
    for values in (r[("extreme",)] for r in _results(world)):
        torch.testing.assert_close(values[:COMPRESS_BLOCK], torch.full((COMPRESS_BLOCK,), 3.0))
        torch.testing.assert_close(values[COMPRESS_BLOCK : 2 * COMPRESS_BLOCK], torch.full((COMPRESS_BLOCK,), -3.0))
        assert (values[2 * COMPRESS_BLOCK :] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_error_feedback_carries_what_a_round_could_not_send(mode: str) -> None:
    """20 rounds of an update that loses 0.4 of a step each round: with feedback the unified sum trails the
    true sum by less than one step (exactly by the mean residual); without, by 20 x 0.4 = 8 steps."""
    rounds, step = 20, _resolution(mode)
    truth = rounds * _sub_resolution(mode).double()
    with_feedback = [r[("feedback", mode, True)] for r in _results(2)]
    residuals = torch.stack([res.double() for _, res in with_feedback])
    unified = with_feedback[0][0].double()
    assert (unified - truth).abs().max() < step
    torch.testing.assert_close(unified + residuals.mean(0), truth, rtol=0, atol=1e-4)  # nothing else was lost
    without = _results(2)[0][("feedback", mode, False)][0].double()
    assert (without - truth).abs().max() > 5 * step


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_resume_from_state_dict_is_bit_identical(world: int, mode: str) -> None:
    for out in (r[("resume", mode)] for r in _results(world)):
        assert out["residual_norm"] > 0  # there is something to lose
        assert torch.equal(out["resumed"], out["straight"])
        assert not torch.equal(out["no_residual"], out["straight"])  # so the residual is what carried it


def test_a_rule_compression_cannot_serve_is_refused_at_unify() -> None:
    for message in (r[("refused",)] for r in _results(2)):
        assert "serves sums only" in message and "'max'" in message


@pytest.mark.parametrize(
    "options,words",
    [
        (dict(rule="max"), ["'max'", "MAX keeps one owner's value"]),
        (dict(rule="avg", compare=["absmax"]), ["'absmax'", "MAX"]),
        (dict(rule="median"), ["'median'", "vote"]),
        (dict(rule="secure_avg"), ["'secure_avg'", "masks"]),
        (dict(rule="auto"), ["'auto'", "unify.compare"]),
    ],
)
def test_rules_without_meaning_under_compression_are_refused(options: dict, words: list[str]) -> None:
    problems = UnifyConfig(compress="int8", **options).problems()
    assert len(problems) == 1 and all(w in problems[0] for w in words), problems
    assert UnifyConfig(compress="none", **options).problems() == []


def test_unknown_mode_is_refused_with_the_choices() -> None:
    (problem,) = UnifyConfig(compress="int4").problems()
    assert "unify.compress = 'int4'" in problem and "bf16, fp16, int8" in problem


@pytest.mark.slow
def test_compressed_run_through_the_cli_records_bytes(tmp_path: Path, data_root: Path) -> None:
    """The program: int8 for two rounds, every owner's unify_bytes in the round record, equal digests."""
    args = ["train", "--config", "configs/demo_cpu.toml", "--set", "data.train_per_owner=300",
            "--set", "data.test_size=300", "--set", "model.name=mlp", "--set", "output.progress=false",
            "--set", "train.max_rounds=2", "--set", "unify.compress=int8", "--set", f"output.dir={tmp_path}"]  # fmt: skip
    proc = merged(cli_world(args, 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(records) == 2
    for record in records:
        assert len({o["digest"] for o in record["owners"]}) == 1
        sent = [o["unify_bytes"] for o in record["owners"]]
        params = sum(t.numel() for t in MODELS["mlp"](in_shape=(1, 28, 28), num_classes=10).parameters())
        # int8 on 2 owners: one byte per weight, and 4 bytes of scale per 256 of them
        assert sent[0] == sent[1] and params < sent[0] < 1.1 * params, sent


def _sealed_and_plain(rank: int, world: int, raws: list[bytes]) -> dict:
    """Two rounds of every mode through gloo (receive-first gathers; int8's two-owner exchange) and through
    a SealedRing (trust on): each path's values and digest per round."""
    from tests.trust_keys import key, roster_of
    from unify_dist.trust import SealedRing, admit

    ring = SealedRing(admit(key(raws[rank]), f"owner{rank}", roster_of(raws), run_id="test"), segment_bytes=96)
    out = {}
    for mode in MODES:
        for reducer in (None, ring):
            model = _Vec()
            flat = FlatState(model, tail=tail_size(world, model))
            unifier = Unifier.over(flat, UnifyConfig(rule="weighted_avg", compress=mode), reducer=reducer)
            rounds = []
            for round_ in range(2):  # the second round sends the first one's residual too
                flat.values.add_(_update(rank, round_))
                outcome = unifier.unify(weight=_weight(rank))
                rounds.append((flat.values.clone(), outcome.digest))
            out[(mode, reducer is None)] = rounds
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_the_sealed_ring_carries_compressed_updates_to_the_same_bits(world: int) -> None:
    from tests.trust_keys import fresh_keys

    per_rank = run_world(_sealed_and_plain, world, fresh_keys(world))
    for mode in MODES:
        plain, sealed = per_rank[0][(mode, True)], per_rank[0][(mode, False)]
        for (values, digest), (values_sealed, digest_sealed) in zip(plain, sealed):
            # the 16-bit rows arrive as their owners' bytes, and an int8 sum is exact in any order
            assert torch.equal(values, values_sealed) and digest == digest_sealed
        for other in per_rank[1:]:
            assert [d for _, d in other[(mode, True)]] == [d for _, d in plain]


# ------------------------------------------------------------------------------------ 4 owners: sharded 16 bits
def _sharded_half(rank: int, world: int, chunk: int) -> dict:
    """bf16 / fp16 at 4 owners (the sharded sum): one weighted round with every owner healthy, one with
    owner 1 sick, `chunk` elements per chunk; values, digest, bytes and any warning at construction."""
    import warnings

    out = {}
    for mode in ("bf16", "fp16"):
        for sick in (False, True):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model, flat, unifier = _unifier(world, rule="weighted_avg", compress=mode, nonfinite="skip",
                                                chunk_elements=chunk)  # fmt: skip
            model.steps.fill_(5 + rank)
            flat.values.add_(_update(rank))
            if sick and rank == 1:
                flat.values[7] = float("nan")
            outcome = unifier.unify(weight=_odd_weight(rank))  # verify=True: DivergenceError if any rank differs
            out[(mode, sick)] = (flat.values.clone(), outcome.digest, outcome.bytes_sent, outcome.skipped,
                                 int(model.steps), [str(w.message) for w in caught])  # fmt: skip
    return out


def _odd_weight(rank: int) -> float:
    """Weights with full float32 mantissas: the products round, so the order of the sum shows in its bits."""
    return 1.0 / (rank + 3)


def _half_sum(mode: str, healthy: list[int]) -> torch.Tensor:
    """The gather path's arithmetic, written out: each healthy owner's 16-bit update widened, times its
    weight, summed in float32 in rank order, times 1 / the total weight."""
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    total = sum(float(torch.tensor(_odd_weight(r))) for r in healthy)  # weights travel as float32
    acc = torch.zeros(N)
    for i, r in enumerate(healthy):
        row = _update(r).to(dtype).float().mul_(_odd_weight(r))
        acc = row if i == 0 else acc.add_(row)
    return acc.mul_(1.0 / total)


@pytest.mark.parametrize("chunk", [1 << 20, 300])  # one chunk; 4 chunks of 300, the last short
def test_four_owners_sum_16_bit_updates_in_shards_to_the_gather_paths_bits(chunk: int) -> None:
    """From 4 owners the 16-bit sum is sharded (all_to_all of 16-bit shards, all_gather of float32 sums):
    the same bits as summing every owner's rows on every owner, 3/4 of the gather's bytes, no warning."""
    world = 4
    per_rank = run_world(_sharded_half, world, chunk)
    spans = [min(chunk, N - s) for s in range(0, N, chunk)]
    # headers (flag, weight, one counter) gathered; per chunk an all_to_all of 2-byte and a gather of 4-byte shards
    expected_bytes = (world - 1) * 16 + sum((world - 1) * (2 + 4) * -(-n // world) for n in spans)
    for mode in ("bf16", "fp16"):
        for sick in (False, True):
            healthy = [r for r in range(world) if not (sick and r == 1)]
            reference = _half_sum(mode, healthy)
            for result in per_rank:
                values, digest, sent, skipped, steps, warned = result[(mode, sick)]
                assert torch.equal(values, reference), (mode, sick, float((values - reference).abs().max()))
                assert digest == per_rank[0][(mode, sick)][1] and skipped == ([1] if sick else [])
                assert steps == 5 + world - 1 and warned == []
                assert sent == expected_bytes < (world - 1) * (16 + 2 * N)


def test_sixteen_bits_through_a_reducer_at_four_owners_warn_of_their_bytes() -> None:
    from unify_dist.unifier import _check_compress_world

    with pytest.warns(UserWarning, match="through a reducer"):
        _check_compress_world("bf16", 4, reducer=object())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_compress_world("bf16", 4, reducer=None)  # sharded: 3/4 of avg's bytes, nothing to warn of
        _check_compress_world("fp16", 3, reducer=object())
