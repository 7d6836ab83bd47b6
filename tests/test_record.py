"""Signed, chained round records and `unify-dist verify`: a real trust-on run verifies, and every kind of
tampering (a changed byte in any record, a removed round, a signature by a key not in the roster, a
final.pt that is not the last round's model) makes verify name the round and exit 1."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.test_trust_run import SMALL, _keys, _trust
from tests.trust_keys import fresh_keys, key, roster_of
from tests.world import cli, cli_world, merged, run_world
from unify_dist.app.record import GENESIS, RecordMismatch, chain, record_hash, sign_round, signing_bytes
from unify_dist.trust import SealedRing, admit


def _sign(rank: int, world: int, raws: list[bytes], differ: bool) -> dict | str:
    ring = SealedRing(admit(key(raws[rank]), f"owner{rank}", roster_of(raws), run_id="records"))
    record = {"round": 1, "participants": [f"owner{r}" for r in range(world)], "loss": 0.25}
    if differ and rank == world - 1:
        record["loss"] = 0.5  # this owner computed another figure: its body differs
    chain(record, None)
    try:
        sign_round(record, ring)  # collective
    except RecordMismatch as e:
        return str(e)
    return record


@pytest.mark.parametrize("world", [2, 3])
def test_every_owner_signs_the_same_body_or_every_owner_stops(world: int) -> None:
    raws = fresh_keys(world)
    same = run_world(_sign, world, raws, False)
    assert all(r == same[0] for r in same) and same[0]["previous"] == GENESIS
    assert same[0]["signers"] == [f"owner{r}" for r in range(world)]
    for raw, text in zip(raws, same[0]["signatures"]):
        key(raw).public_key().verify(base64.b64decode(text), signing_bytes(same[0]))
    differ = run_world(_sign, world, raws, True)
    assert all(isinstance(r, str) for r in differ), differ  # every owner stops, none writes a record
    assert f"owner{world - 1} (rank {world - 1}) signed another record" in differ[0]


def test_trust_off_signs_nothing_staged_or_not() -> None:
    from unify_dist.staging import HostStaged

    for reducer in (None, HostStaged(None)):  # HostStaged(None): GPU owners over plain gloo
        record = {"round": 1}
        chain(record, None)
        sign_round(record, reducer)
        assert record == {"round": 1, "previous": GENESIS}


@pytest.fixture(scope="module")
def signed_run(tmp_path_factory, data_root) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("signed")
    roster = _keys(tmp, ["owner0", "owner1"])
    run_dir = tmp / "run"
    proc = merged(cli_world(["train", *SMALL, *_trust(tmp, roster), "--set", f"output.dir={run_dir}",
                             "--set", "output.progress=false"], 2))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, roster


def _copy(run: tuple[Path, Path], tmp: Path) -> Path:
    shutil.copytree(run[0], tmp / "run", ignore=shutil.ignore_patterns("checkpoints"))
    return tmp / "run"


def _verify(run_dir: Path, roster: Path) -> tuple[int, list[str]]:
    done = cli(["verify", str(run_dir), "--roster", str(roster)])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    return done.returncode, done.stdout.splitlines()


def _lines(run_dir: Path) -> list[str]:
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def _write(run_dir: Path, lines: list[str]) -> None:
    (run_dir / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))


@pytest.mark.slow
def test_a_real_run_verifies(signed_run) -> None:
    run_dir, roster = signed_run
    records = [json.loads(ln) for ln in _lines(run_dir)]
    assert [r["round"] for r in records] == [1, 2]
    assert records[0]["previous"] == GENESIS and records[1]["previous"] == record_hash(records[0])
    assert all(len(r["signatures"]) == 2 and r["signers"] == ["owner0", "owner1"] for r in records)
    assert all(len(r["config"]) == 64 and r["unify"]["rule"] == "avg" for r in records)
    made = (run_dir / "final.pt").stat().st_mtime
    assert made - 600 < records[0]["time"] <= records[1]["time"] <= made  # rank 0's clock, in the run
    assert all(o["unify_bytes"] > 0 and len(o["digest"]) == 16 for r in records for o in r["owners"])
    assert "dp_epsilon" not in records[0]
    code, out = _verify(run_dir, roster)
    assert code == 0 and len(out) == 1 and out[0].startswith(f"verified {run_dir}: 2 rounds, 2 owners"), out


@pytest.mark.slow
@pytest.mark.parametrize("round_", [1, 2])
@pytest.mark.parametrize("where", ['"unified_test_acc": ', '"time": ', '"signatures": ["'])
def test_a_changed_byte_in_any_record_names_its_round(signed_run, tmp_path: Path, round_: int, where: str) -> None:
    run_dir = _copy(signed_run, tmp_path)
    lines = _lines(run_dir)
    line = lines[round_ - 1]
    at = line.index(where) + len(where) + 2  # a digit or base64 character inside the value
    lines[round_ - 1] = line[:at] + ("7" if line[at] != "7" else "3") + line[at + 1 :]
    _write(run_dir, lines)
    code, out = _verify(run_dir, signed_run[1])
    assert code == 1 and any(o.startswith(f"round {round_} (line {round_}): owner 'owner") for o in out), out
    if round_ == 1 and where != '"signatures": ["':  # the body changed: round 2 no longer binds it
        assert any(o.startswith("round 2 (line 2): does not bind round 1's record") for o in out), out


@pytest.mark.slow
def test_a_removed_round_breaks_the_chain(signed_run, tmp_path: Path) -> None:
    run_dir = _copy(signed_run, tmp_path)
    _write(run_dir, _lines(run_dir)[1:])
    code, out = _verify(run_dir, signed_run[1])
    assert code == 1 and out == ["round 2 (line 1): the chain does not start here (rounds before it are missing)"], out
    run_dir = _copy(signed_run, tmp_path / "last")
    _write(run_dir, _lines(run_dir)[:1])  # the last round removed: final.pt is no longer the last record's model
    code, out = _verify(run_dir, signed_run[1])
    assert code == 1 and len(out) == 1 and out[0].startswith("round 1: ") and "hashes to" in out[0], out


@pytest.mark.slow
def test_a_signature_by_a_key_not_in_the_roster_is_named(signed_run, tmp_path: Path) -> None:
    run_dir = _copy(signed_run, tmp_path)
    lines = _lines(run_dir)
    record = json.loads(lines[1])
    stranger = key(fresh_keys(1)[0])
    record["signatures"][1] = base64.b64encode(stranger.sign(signing_bytes(record))).decode()
    _write(run_dir, [lines[0], json.dumps(record)])
    code, out = _verify(run_dir, signed_run[1])
    assert code == 1 and out == ["round 2 (line 2): owner 'owner1''s signature does not verify with the roster's key "
                                 "(the record was changed, or signed by a key not in the roster)"], out  # fmt: skip
    # the same run against a roster whose owner1 is someone else: every round names owner1
    other = tmp_path / "roster.toml"
    text = signed_run[1].read_text().splitlines()
    stranger_public = base64.b64encode(stranger.public_key().public_bytes_raw()).decode()
    other.write_text("\n".join([*text[:2], f'owner1 = "{stranger_public}"']) + "\n")
    code, out = _verify(signed_run[0], other)
    assert code == 1 and [o.split(":")[0] for o in out] == ["round 1 (line 1)", "round 2 (line 2)"], out


@pytest.mark.slow
def test_a_final_model_that_is_not_the_last_rounds_is_named(signed_run, tmp_path: Path) -> None:
    run_dir = _copy(signed_run, tmp_path)
    final = torch.load(run_dir / "final.pt", weights_only=True)
    weight = next(t for t in final["model"].values() if t.is_floating_point())
    weight.view(-1)[0] += 1e-3
    torch.save(final, run_dir / "final.pt")
    code, out = _verify(run_dir, signed_run[1])
    assert code == 1 and len(out) == 1 and out[0].startswith("round 2: ") and "hashes to" in out[0], out


def test_verify_in_worker_processes_finds_what_one_process_finds(tmp_path: Path) -> None:
    from benchmarks.record_bench import make_run
    from unify_dist.app.audit import verify_run

    run_dir = tmp_path / "run"
    roster = make_run(run_dir, rounds=300, owners=8)  # 2,400 signatures: enough for the worker processes
    assert verify_run(run_dir, roster, workers=2)[0] == []
    lines = _lines(run_dir)
    lines[149] = lines[149].replace('"unified_test_acc": 0.8798', '"unified_test_acc": 0.8799')
    del lines[200]  # round 201
    _write(run_dir, lines)
    alone, _ = verify_run(run_dir, roster, workers=1)
    assert verify_run(run_dir, roster, workers=2)[0] == alone
    expected = ["round 150 (line 150)"] * 8 + ["round 151 (line 151)", "round 202 (line 201)"]
    assert [p.split(":")[0] for p in alone] == expected


@pytest.mark.slow
def test_a_resumed_run_continues_the_chain_and_verifies(signed_run, tmp_path: Path) -> None:
    run_dir, roster = tmp_path / "run", signed_run[1]
    shutil.copytree(signed_run[0], run_dir)  # checkpoints included: the run resumes from round 2
    proc = merged(cli_world(["train", *SMALL, *_trust(roster.parent, roster), "--set", f"output.dir={run_dir}",
                             "--set", "output.progress=false", "--set", "train.max_rounds=3"], 2))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from round 2" in proc.stdout + proc.stderr
    records = [json.loads(ln) for ln in _lines(run_dir)]
    assert [r["round"] for r in records] == [1, 2, 3] and records[2]["previous"] == record_hash(records[1])
    code, out = _verify(run_dir, roster)
    assert code == 0 and out[0].startswith(f"verified {run_dir}: 3 rounds, 2 owners"), out
