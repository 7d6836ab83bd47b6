"""Signed round records: what signing costs an owner each round, and how fast `unify-dist verify` reads a run.

    python -m benchmarks.record_bench [--rounds 1000] [--owners 8] [--reps 3]

Verify: a run directory of `--rounds` records of `--owners` owners (each record shaped as the program
writes it: 10 classes, every owner's figures), each chained and signed by every owner's fresh key, and a
final.pt that matches; the time of unify_dist.app.audit.verify_run over it (median of --reps).
Signing: sign_round (canonical body, Ed25519 signature, the sealed ring's all_gather of 64 bytes and
the check of every signature) timed per call on every rank of a real gloo group, median over repeats of
the slowest rank, beside the same owner's work without the exchange and the exchange alone (sealed, and
gloo's plain all_gather of the same 64 bytes as the baseline); bytes an owner sends for it (the ring's
sealed messages) and adds to the record file.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tests.trust_keys import fresh_keys, key, roster_of
from tests.world import run_world
from unify_dist.app.audit import verify_run
from unify_dist.app.record import chain, sign_round, signing_bytes
from unify_dist.digest import state_digest
from unify_dist.trust import SealedRing, admit
from unify_dist.trust.channel import TAG_BYTES
from unify_dist.trust.identity import public_text

__all__ = ["verify_seconds", "signing_cost", "TARGETS"]

TARGETS = {"verify_s": 1.0, "sign_s_per_owner_round": 0.005, "sign_bytes_per_owner_round": 1024}
"""verify 1,000 rounds of 8 owners in <= 1 s; signing <= 5 ms and <= 1 KB per owner per round."""


def _record(round_: int, owners: int, digest: str, classes: int = 10) -> dict[str, Any]:
    """A record shaped as unify_dist.app.loop writes it (values are arbitrary but realistic)."""
    names = [f"owner{i}" for i in range(owners)]
    return {
        "round": round_, "rule": "avg", "name": "bench",
        "owners": [{"rank": r, "n_train": 6000, "loss": 0.3123456789 + r, "local_val_acc": 0.8712345,
                    "unified_val_acc": 0.8812345, "unify_s": 0.0123456789, "digest": digest, "unify_bytes": 900148,
                    "name": n} for r, n in enumerate(names)],
        "skipped": [], "min_unified_val_acc": 0.8812345, "unified_test_acc": 0.8798, "candidates": {},
        "per_class": {"local": [[0.81234567891234 + c / 100 for c in range(classes)] for _ in names],
                      "unified": [0.83234567891234 + c / 100 for c in range(classes)]},
        "digest": digest, "time": 1796462480.8546543 + round_, "rule_used": "avg", "participants": names, "joined": [],
        "left": [], "unify": {"rule": "avg"}, "config": "ab" * 32,
    }  # fmt: skip


def make_run(run_dir: Path, rounds: int, owners: int) -> Path:
    """A signed run directory (metrics.jsonl, final.pt) and its roster; returns the roster's path."""
    raws = fresh_keys(owners)
    keys = [key(r) for r in raws]
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))
    digest = state_digest(model.state_dict().items())
    lines, previous = [], None
    for round_ in range(1, rounds + 1):
        record = _record(round_, owners, digest)
        chain(record, previous)
        record["signers"] = list(record["participants"])
        message = signing_bytes(record)
        record["signatures"] = [base64.b64encode(k.sign(message)).decode() for k in keys]
        lines.append(json.dumps(record))
        previous = record
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))
    torch.save({"model": model.state_dict(), "metrics": []}, run_dir / "final.pt")
    roster = run_dir.parent / "roster.toml"
    roster.write_text("[owners]\n" + "".join(f'owner{i} = "{public_text(k)}"\n' for i, k in enumerate(keys)))
    return roster


def verify_seconds(rounds: int = 1000, owners: int = 8, reps: int = 3) -> dict[str, Any]:
    """verify_run over a generated signed run: median seconds, and the problems it found (none expected)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        roster = make_run(run_dir, rounds, owners)
        times, problems = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            problems, _ = verify_run(run_dir, roster)
            times.append(time.perf_counter() - t0)
        size = (run_dir / "metrics.jsonl").stat().st_size
    return {"rounds": rounds, "owners": owners, "verify_s": statistics.median(times), "problems": len(problems),
            "metrics_bytes": size}  # fmt: skip


def _local_work(record: dict[str, Any], signer: Any, publics: list[Any]) -> None:
    """sign_round's work on one owner without its exchange: encode the body, sign it, check every signature."""
    message = signing_bytes(record)
    signature = signer.sign(message)
    for public in publics:
        public.verify(signature, message)  # one check per owner, as sign_round makes (all of this owner's here)


def _sign_times(rank: int, world: int, raws: list[bytes], reps: int) -> dict[str, list[float]]:
    torch.set_num_threads(1)
    ring = SealedRing(admit(key(raws[rank]), f"owner{rank}", roster_of(raws), run_id="record bench"))
    signer = key(raws[rank])
    publics = [signer.public_key()] * world
    previous, times = None, {"sign_round": [], "local": [], "sealed_gather": [], "plain_gather": []}
    mine = torch.zeros(64, dtype=torch.uint8)
    out = [torch.empty_like(mine) for _ in range(world)]
    for round_ in range(1, reps + 2):  # the first is a warm-up
        record = _record(round_, world, "0123456789abcdef")
        chain(record, previous)
        steps = {
            "sign_round": lambda: sign_round(record, ring),  # collective
            "local": lambda: _local_work(dict(record, signers=record["participants"]), signer, publics),
            "sealed_gather": lambda: ring.all_gather(out, mine),  # collective
            "plain_gather": lambda: dist.all_gather(out, mine),  # collective
        }
        for name, step in steps.items():
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
        previous = record
    return {name: ts[1:] for name, ts in times.items()}


def signing_cost(owners: int, reps: int = 5) -> dict[str, Any]:
    """sign_round per owner per round in a real group (median over rounds of the slowest rank), beside its
    own work without the exchange, the sealed all_gather of 64 bytes alone and gloo's plain one (the
    baseline); bytes an owner sends for it and adds to the record file."""
    per_rank = run_world(_sign_times, owners, fresh_keys(owners), reps)
    timed = {name: statistics.median(max(ts) for ts in zip(*(r[name] for r in per_rank))) for name in per_rank[0]}
    # the ring's all_gather: n-1 sealed messages of 64 bytes; its verdict exchange: n-1 of 3 int64
    # (unify_dist.trust.ring); each sealed message carries a TAG_BYTES tag
    sent = (owners - 1) * (64 + TAG_BYTES) + (owners - 1) * (24 + TAG_BYTES)
    record = _record(1, owners, "0123456789abcdef")
    plain = len(json.dumps(record))
    record["signers"] = list(record["participants"])
    record["signatures"] = [base64.b64encode(bytes(64)).decode()] * owners
    stored = (len(json.dumps(record)) - plain) / owners
    return {"owners": owners, "sign_s": timed["sign_round"], "local_s": timed["local"],
            "sealed_gather_s": timed["sealed_gather"], "plain_gather_s": timed["plain_gather"],
            "sent_bytes": sent, "stored_bytes": stored}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--owners", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps({"verify": verify_seconds(args.rounds, args.owners, args.reps),
                      "signing": [signing_cost(w, args.reps) for w in (2, 4)]}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
