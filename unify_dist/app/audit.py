"""`unify-dist verify RUN_DIR --roster roster.toml`: check a run's records offline, with no owner online.

For every round in RUN_DIR/metrics.jsonl: every owner's signature verifies against the roster's key
for the name it signed under (so a changed byte anywhere in the record, or a signature by a key not in
the roster, is caught), the signers are the round's participants, every owner's digest is equal, and
the record binds the hash of the round before (a removed, reordered or changed round breaks the chain).
Then RUN_DIR/final.pt (loaded with weights_only=True) must hash (unify_dist.digest) to the last round's
digest. One line per problem, naming the round; or one summary line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unify_dist.app.record import GENESIS, SIGNATURE_BYTES, SIGNED, body_bytes
from unify_dist.errors import UserError

__all__ = ["verify_run", "main"]


def verify_run(run_dir: str | Path, roster_path: str | Path, workers: int | None = None) -> tuple[list[str], str]:
    """(problems, summary) for the run in `run_dir` against the roster file; no problems: it verifies.

    `workers`: processes that check signatures (default: one per CPU, for runs of 2,000 signatures or more).
    """
    from unify_dist.trust.identity import load_roster

    run = Path(run_dir)
    metrics = run / "metrics.jsonl" if run.is_dir() else run
    if not metrics.is_file():
        raise UserError(f"'{metrics}' does not exist; give the run directory (with metrics.jsonl and final.pt)")
    roster = load_roster(roster_path)
    lines = [(n, ln) for n, ln in enumerate(metrics.read_text(errors="replace").splitlines(), start=1) if ln.strip()]
    if not lines:
        return [f"{metrics}: no round records"], ""
    seen = _examine_all(lines, roster.owners, workers)
    problems = _chain_problems(seen)
    last = next((s for s in reversed(seen) if s.round is not None), None)
    problems += _check_final(run / "final.pt" if run.is_dir() else metrics.with_name("final.pt"), last)
    owners = max((s.owners for s in seen), default=0)
    summary = (
        f"verified {run}: {len(seen)} rounds, {owners} owners signing each, every signature checks against the "
        f"roster, every owner's digest equal, the chain unbroken, final.pt matches round "
        f"{last.round if last else '-'}'s digest {last.digest if last else '-'}"
    )
    return problems, summary


@dataclass(frozen=True)
class _Seen:
    """One metrics.jsonl line as examined: what the chain check and the final.pt check need, and its problems."""

    line: int
    round: int | None
    """None: the line is not a JSON record."""
    previous: str | None
    digest: str | None
    body_hash: str | None
    owners: int
    problems: list[str]
    local: tuple[str, ...] = ()
    """The tensors each owner kept as its own (roles): not in the digest, so left out of final.pt's check."""


def _examine_all(lines: list[tuple[int, str]], keys: dict[str, bytes], workers: int | None) -> list[_Seen]:
    """Every line examined, in order; in `workers` processes when there are many signatures to check
    (each Ed25519 verification costs 50-100 us, and verifying is what dominates)."""
    workers = workers if workers is not None else (os.cpu_count() or 1)
    signatures = len(lines) * max(1, lines[0][1].count('"digest"') - 1)  # about one per owner per line
    if workers <= 1 or signatures < 2000 or "fork" not in multiprocessing.get_all_start_methods():
        return _examine(lines, keys)
    chunks = [lines[i::workers] for i in range(workers)]  # interleaved: equal work, order restored below
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        done = list(pool.map(_examine, chunks, [keys] * workers))
    return sorted((s for part in done for s in part), key=lambda s: s.line)


def _examine(lines: list[tuple[int, str]], keys: dict[str, bytes]) -> list[_Seen]:
    """Parse each line; check its digests and its signatures over its own body; hash the body for the chain."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    publics = {name: Ed25519PublicKey.from_public_bytes(key) for name, key in keys.items()}
    seen = []
    for number, line in lines:
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            found = re.search(r'"round": ?(\d+)', line)
            where = f"round {found.group(1)} (line {number})" if found else f"line {number}"
            problem = f"{where}: not a JSON record (changed bytes); the chain cannot be checked past it"
            seen.append(_Seen(number, None, None, None, None, 0, [problem]))
            continue
        where = f"round {record.get('round', '?')} (line {number})"
        body = body_bytes(record)  # encoded once: signed as it is, hashed for the next round's chain check
        problems = _digest_problems(where, record) + _signature_problems(where, record, SIGNED + body, publics)
        round_ = record.get("round") if isinstance(record.get("round"), int) else -1
        digest, owners = record.get("digest"), len(record.get("owners", []))
        local = tuple(str(n) for n in record.get("local_tensors", []))
        seen.append(_Seen(number, round_, record.get("previous"), digest, hashlib.sha256(body).hexdigest(), owners, problems,
                          local))  # fmt: skip
    return seen


def _signature_problems(where: str, record: dict[str, Any], message: bytes, publics: dict[str, Any]) -> list[str]:
    """Every signer's signature over the record's body, against the roster's key for the name it signed as."""
    from cryptography.exceptions import InvalidSignature

    signers, signatures = record.get("signers"), record.get("signatures")
    owners = len(record.get("owners", []))
    if not isinstance(signers, list) or not isinstance(signatures, list):
        return [f"{where}: not signed (the run had trust off, or the signatures were removed)"]
    if len(signers) != len(signatures) or len(signers) != owners:
        return [f"{where}: {len(signatures)} signatures for {len(signers)} signers and {owners} owners"]
    problems = []
    if signers != record.get("participants", signers):
        problems.append(f"{where}: signed by {signers} but the participants are {record.get('participants')}")
    for slot, (name, text) in enumerate(zip(signers, signatures)):
        public = publics.get(name)
        if public is None:
            problems.append(f"{where}: rank slot {slot} signed as '{name}', who is not in the roster")
            continue
        try:
            signature = _signature(text)
            if signature is None:
                raise InvalidSignature
            public.verify(signature, message)
        except InvalidSignature:
            problems.append(f"{where}: owner '{name}''s signature does not verify with the roster's key "
                            "(the record was changed, or signed by a key not in the roster)")  # fmt: skip
    return problems


def _chain_problems(seen: list[_Seen]) -> list[str]:
    """Each record's problems, after the chain's: it binds the body of the record before it (GENESIS first)."""
    problems: list[str] = []
    previous: _Seen | None = None
    for s in seen:
        if s.round is not None:
            where = f"round {s.round} (line {s.line})"
            expected = previous.body_hash if previous is not None else GENESIS
            if s.previous != expected and previous is None:
                problems.append(f"{where}: the chain does not start here (rounds before it are missing)")
            elif s.previous != expected:
                problems.append(f"{where}: does not bind round {previous.round}'s record (a round before it was "
                                "removed or changed)")
            elif previous is not None and s.round != previous.round + 1:
                problems.append(f"{where}: follows round {previous.round} but is numbered {s.round}")
            previous = s
        problems += s.problems
    return problems


def _digest_problems(where: str, record: dict[str, Any]) -> list[str]:
    owners = record.get("owners", [])  # an owner of several processes lists every process's digest too
    digests = [o.get("digest") for o in owners] + [d for o in owners for d in o.get("process_digests", [])]
    if not digests or any(d != record.get("digest") for d in digests):
        return [f"{where}: owners' digests differ or are missing ({digests}; the record says {record.get('digest')})"]
    return []


def _signature(text: Any) -> bytes | None:
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        return None
    return raw if len(raw) == SIGNATURE_BYTES else None


def _check_final(path: Path, last: _Seen | None) -> list[str]:
    """final.pt's model hashes to the last round's digest."""
    import torch

    from unify_dist.digest import state_digest

    if last is None:
        return []
    if not path.is_file():
        return [f"round {last.round}: {path} is missing, so the final model cannot be checked"]
    try:
        final = torch.load(path, weights_only=True, map_location="cpu")
        digest = state_digest((n, t) for n, t in final["model"].items() if n not in last.local)
    except Exception as e:  # any unreadable file is a finding, not a crash
        return [f"round {last.round}: {path} is not a readable unify-dist model ({type(e).__name__}: {e})"]
    if digest != last.digest:
        return [f"round {last.round}: {path} hashes to {digest}, not the round's digest {last.digest}"]
    return []


def main(run_dir: str, roster: str) -> int:
    """The CLI's verify: one line per problem and 1, or one summary line and 0."""
    problems, summary = verify_run(run_dir, roster)
    for p in problems:
        print(p)
    if problems:
        return 1
    print(summary)
    return 0
