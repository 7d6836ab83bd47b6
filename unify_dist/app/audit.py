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
import json
import re
from pathlib import Path
from typing import Any

from unify_dist.app.record import GENESIS, SIGNATURE_BYTES, record_hash, signing_bytes
from unify_dist.errors import UserError

__all__ = ["verify_run", "verify_records", "main"]


def verify_run(run_dir: str | Path, roster_path: str | Path) -> tuple[list[str], str]:
    """(problems, summary) for the run in `run_dir` against the roster file; no problems: it verifies."""
    from unify_dist.trust.identity import load_roster

    run = Path(run_dir)
    metrics = run / "metrics.jsonl" if run.is_dir() else run
    if not metrics.is_file():
        raise UserError(f"'{metrics}' does not exist; give the run directory (with metrics.jsonl and final.pt)")
    roster = load_roster(roster_path)
    records, problems = _read(metrics)
    more, last = verify_records(records, roster.owners)
    problems += more
    problems += _check_final(run / "final.pt" if run.is_dir() else metrics.with_name("final.pt"), last)
    owners = max((len(r.get("owners", [])) for _, r in records), default=0)
    summary = (
        f"verified {run}: {len(records)} rounds, {owners} owners signing each, every signature checks against "
        f"the roster, every owner's digest equal, the chain unbroken, final.pt matches round "
        f"{last.get('round') if last else '-'}'s digest {last.get('digest') if last else '-'}"
    )
    return problems, summary


def verify_records(records: list[tuple[int, dict[str, Any]]], keys: dict[str, bytes]) -> tuple[list[str], dict[str, Any] | None]:
    """Problems of (line number, record) pairs against name -> public key; and the last record."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    publics = {name: Ed25519PublicKey.from_public_bytes(key) for name, key in keys.items()}
    problems: list[str] = []
    previous: dict[str, Any] | None = None
    for line, record in records:
        where = f"round {record.get('round', '?')} (line {line})"
        problems += _chain_problems(where, record, previous)
        problems += _digest_problems(where, record)
        message = signing_bytes(record)
        signers, signatures = record.get("signers"), record.get("signatures")
        if not isinstance(signers, list) or not isinstance(signatures, list):
            problems.append(f"{where}: not signed (the run had trust off, or the signatures were removed)")
        elif len(signers) != len(signatures) or len(signers) != len(record.get("owners", [])):
            problems.append(f"{where}: {len(signatures)} signatures for {len(signers)} signers and "
                            f"{len(record.get('owners', []))} owners")  # fmt: skip
        else:
            if signers != record.get("participants", signers):
                problems.append(f"{where}: signed by {signers} but the participants are {record.get('participants')}")
            for slot, (name, text) in enumerate(zip(signers, signatures)):
                public = publics.get(name)
                signature = _signature(text)
                if public is None:
                    problems.append(f"{where}: rank slot {slot} signed as '{name}', who is not in the roster")
                    continue
                try:
                    if signature is None:
                        raise InvalidSignature
                    public.verify(signature, message)
                except InvalidSignature:
                    problems.append(f"{where}: owner '{name}''s signature does not verify with the roster's key "
                                    "(the record was changed, or signed by a key not in the roster)")  # fmt: skip
        previous = record
    return problems, previous


def _read(metrics: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    records, problems = [], []
    for number, line in enumerate(metrics.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            found = re.search(r'"round": ?(\d+)', line)
            where = f"round {found.group(1)} (line {number})" if found else f"line {number}"
            problems.append(f"{where}: not a JSON record (changed bytes); the chain cannot be checked past it")
            continue
        records.append((number, record))
    if not records and not problems:
        problems.append(f"{metrics}: no round records")
    return records, problems


def _chain_problems(where: str, record: dict[str, Any], previous: dict[str, Any] | None) -> list[str]:
    expected = GENESIS if previous is None else record_hash(previous)
    if record.get("previous") == expected:
        if previous is not None and record.get("round") != previous.get("round", 0) + 1:
            return [f"{where}: follows round {previous.get('round')} but is numbered {record.get('round')}"]
        return []
    if previous is None:
        return [f"{where}: the chain does not start here (rounds before it are missing)"]
    return [f"{where}: does not bind round {previous.get('round')}'s record (a round before it was removed or changed)"]


def _digest_problems(where: str, record: dict[str, Any]) -> list[str]:
    digests = [o.get("digest") for o in record.get("owners", [])]
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


def _check_final(path: Path, last: dict[str, Any] | None) -> list[str]:
    """final.pt's model hashes to the last round's digest."""
    import torch

    from unify_dist.digest import state_digest

    if last is None:
        return []
    if not path.is_file():
        return [f"round {last.get('round')}: {path} is missing, so the final model cannot be checked"]
    try:
        final = torch.load(path, weights_only=True, map_location="cpu")
        digest = state_digest(final["model"].items())
    except Exception as e:  # any unreadable file is a finding, not a crash
        return [f"round {last.get('round')}: {path} is not a readable unify-dist model ({type(e).__name__}: {e})"]
    if digest != last.get("digest"):
        return [f"round {last.get('round')}: {path} hashes to {digest}, not the round's digest {last.get('digest')}"]
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
