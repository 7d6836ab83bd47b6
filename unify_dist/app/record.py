"""Each round's record as a signed, chained statement every owner holds the same copy of.

The record rank 0 writes to metrics.jsonl is built on every owner from gathered figures only, so every
owner holds the same *body* (the record without its `signatures`): the figures, every owner's own
digest, the participants, the rule and its options, the config fingerprint's hash, the privacy spent,
rank 0's clock, and `previous`, the hash of the round before's body (a chain: a removed or changed
round breaks it). With trust on, each owner signs the body with its admission (Ed25519 identity) key;
the 64-byte signatures are gathered through the sealed ring and stored with the record, and each owner
checks every other owner's signature against its own body on the spot, so owners whose records differ
stop the run instead of signing different histories. `unify-dist verify` (unify_dist.app.audit) checks
the lot offline against the roster.

The body's bytes are its canonical JSON (sorted keys, no spaces), which a reader recomputes exactly
from the metrics.jsonl line: Python's float repr round-trips.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the trust package needs `cryptography`, imported only when trust is on
    from unify_dist.trust import SealedRing

__all__ = [
    "GENESIS", "SIGNATURE_BYTES", "RecordMismatch", "body_bytes", "record_hash", "signing_bytes", "chain",
    "fingerprint_hash", "sign_round",
]  # fmt: skip

GENESIS = "0" * 64
"""`previous` of a run's first round: no round before it."""

SIGNATURE_BYTES = 64
SIGNED = b"unify-dist round record v1\0"
"""Prefixed to the body before signing: a record signature can never pass for an admission one."""


class RecordMismatch(RuntimeError):
    """An owner signed a record body other than this owner's: the owners' records differ."""


def body_bytes(record: dict[str, Any]) -> bytes:
    """The canonical JSON of the record without its signatures: what is hashed and signed."""
    body = {k: v for k, v in record.items() if k != "signatures"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 (hex) of the record's body: the next round's `previous`."""
    return hashlib.sha256(body_bytes(record)).hexdigest()


def signing_bytes(record: dict[str, Any]) -> bytes:
    """The bytes each owner signs for this record."""
    return SIGNED + body_bytes(record)


def chain(record: dict[str, Any], previous: dict[str, Any] | None) -> None:
    """Bind the record to the round before (GENESIS for the first round of a run)."""
    record["previous"] = record_hash(previous) if previous is not None else GENESIS


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    """SHA-256 (hex) of the consistency fingerprint every owner checked equal before training."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def sign_round(record: dict[str, Any], reducer: SealedRing | Any | None) -> None:
    """Trust on: sign the record's body, gather every owner's signature sealed, check each against this
    owner's body, store them with the record. A collective (the ring's all_gather); trust off: nothing.

    Raises RecordMismatch on every owner whose body differs from a signer's (then every owner raises:
    whoever differs from anyone sees that owner's signature fail).
    """
    admission = getattr(reducer, "admission", None)  # HostStaged (GPU owners) passes its inner ring's on
    if admission is None or admission.signer is None:  # trust off (plain gloo, staged or not)
        return
    import torch
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    record["signers"] = list(admission.owners)  # in the body: who signs, by roster name, in rank order
    message = signing_bytes(record)
    mine = torch.frombuffer(bytearray(admission.signer.sign(message)), dtype=torch.uint8)
    everyone = [torch.empty_like(mine) for _ in range(len(admission.owners))]
    reducer.all_gather(everyone, mine)  # collective, sealed: 64 bytes per owner
    signatures = [bytes(t.tolist()) for t in everyone]
    differ = []
    for slot, (public, signature) in enumerate(zip(admission.identities, signatures)):
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        except InvalidSignature:
            differ.append(f"{admission.owners[slot]} (rank {slot})")
    if differ:
        raise RecordMismatch(
            f"round {record['round']}: {', '.join(differ)} signed another record than owner "
            f"{admission.owners[admission.rank]}'s: the owners' records differ (their unify options or figures are "
            "not the same), so no round record is written"
        )
    record["signatures"] = [base64.b64encode(s).decode("ascii") for s in signatures]
