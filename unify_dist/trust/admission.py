"""Admission: before any data-derived byte leaves a rank, every rank proves it is a roster owner.

Protocol (every rank, one all_gather of hellos and one of signatures, over the plain group):
  1. hello = owner name, identity public key, a fresh 32-byte nonce, a fresh X25519 public key, and the
     hashes of what owners must share: the run id (the program's: its shared config, no local paths)
     and the roster;
  2. every rank compares every hello's two hashes with slot 0's (a mismatch is named as one: "runs
     another configuration", "holds another roster"), then checks every hello against the roster: known
     key, the name the roster gives that key, no owner twice, no nonce twice;
  3. transcript = run id + every rank's slot and hello; each rank signs it with its Ed25519 key;
  4. every rank verifies every signature. Fresh nonces from every honest owner bind the transcript to
     this run, so a signature recorded from another run (a replay) does not verify.
Any failure raises AdmissionError (a UserError: exit 2) on every honest rank, naming the slot and the
reason; all ranks see the same gathered bytes, so they stop at the same step and no one is left waiting.

Pairwise keys: X25519 between the ephemeral keys, then HKDF-SHA256 salted with the transcript's hash,
one key per direction (i->j differs from j->i) and one secret per pair for secure averaging's masks.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from unify_dist.errors import UserError
from unify_dist.trust.identity import Roster, public_bytes, public_text

__all__ = ["Admission", "AdmissionError", "admit", "check_shared", "roster_hash", "HELLO_BYTES"]

NAME_BYTES = 64
HELLO_BYTES = NAME_BYTES + 32 + 32 + 32 + 32 + 32  # name, identity key, nonce, ephemeral X25519 key, run and roster hashes
SIGNATURE_BYTES = 64


class AdmissionError(UserError):
    """A rank slot is not held by a roster owner who signed this run's transcript."""


@dataclass(frozen=True)
class Admission:
    """What admission established, the same on every rank except the keys (each rank's own)."""

    rank: int
    owners: list[str]
    """The roster name holding each rank slot."""
    transcript_hash: bytes
    """SHA-256 of the signed transcript: the session's name, equal on every rank."""
    link_keys: dict[int, tuple[bytes, bytes]]
    """peer -> (key for this rank's messages to the peer, key for the peer's messages to this rank)."""
    pair_secrets: dict[int, bytes]
    """peer -> 32 bytes both ends share, for secure averaging's masks (never sent)."""
    identities: list[bytes] = field(default_factory=list)
    """Each rank slot's 32-byte Ed25519 identity key, as checked against the roster."""
    signer: Ed25519PrivateKey | None = field(default=None, repr=False)
    """This rank's identity key: it signs each round's record (unify_dist.app.record)."""


def admit(identity: Ed25519PrivateKey, owner: str, roster: Roster, run_id: str, group: dist.ProcessGroup | None = None) -> Admission:
    """Run admission on every rank of `group` (a collective: two all_gathers); raise AdmissionError."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ephemeral = X25519PrivateKey.generate()
    hello = _hello(owner, public_bytes(identity), secrets.token_bytes(32), _raw(ephemeral.public_key()))
    hello += hashlib.sha256(run_id.encode()).digest() + roster_hash(roster)  # what every owner must share
    hellos = _all_gather_bytes(hello, world, group)  # collective: public values only
    problems = check_hellos(hellos, roster)
    if problems:
        raise AdmissionError(_refusal(problems))
    transcript = build_transcript(run_id, hellos)
    signatures = _all_gather_bytes(identity.sign(transcript), world, group)  # collective
    problems = check_signatures(transcript, hellos, signatures)
    if problems:
        raise AdmissionError(_refusal(problems))
    digest = hashlib.sha256(transcript).digest()
    keys, pair = {}, {}
    for peer in range(world):
        if peer != rank:
            shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(_fields(hellos[peer])[3]))
            keys[peer] = (_derive(shared, digest, f"link {rank}>{peer}"), _derive(shared, digest, f"link {peer}>{rank}"))
            pair[peer] = _derive(shared, digest, f"secure-sum {min(rank, peer)}-{max(rank, peer)}")
    owners = [_fields(h)[0] for h in hellos]
    return Admission(rank, owners, digest, keys, pair, [_fields(h)[1] for h in hellos], identity)


def check_hellos(hellos: list[bytes], roster: Roster) -> list[str]:
    """Every slot's problems with its hello: another run id or roster than slot 0's (only those, when
    any: the roster checks below would differ from rank to rank), an unknown key, a wrong name, an owner
    or nonce seen twice."""
    mismatches = check_shared(hellos)
    if mismatches:
        return mismatches
    problems, holders, nonces = [], {}, {}
    for slot, hello in enumerate(hellos):
        name, key, nonce, _ = _fields(hello)
        listed = roster.owner_of(key)
        if listed is None:
            problems.append(f"rank slot {slot}: its key {public_text(key)[:12]}... is not in the roster (claims owner '{name}')")
        elif listed != name:
            problems.append(f"rank slot {slot}: claims owner '{name}' but its key is owner '{listed}''s")
        elif name in holders:
            problems.append(f"rank slot {slot}: duplicate owner '{name}', who already holds rank slot {holders[name]}")
        elif nonce in nonces:
            problems.append(f"rank slot {slot}: replays rank slot {nonces[nonce]}'s nonce")
        holders.setdefault(name, slot)
        nonces.setdefault(nonce, slot)
    return problems


def check_shared(hellos: list[bytes]) -> list[str]:
    """Every slot whose run id (the program's shared config) or roster hash differs from slot 0's."""
    problems = []
    first = _shared(hellos[0])
    for slot, hello in enumerate(hellos[1:], start=1):
        run, roster = _shared(hello)
        if run != first[0]:
            problems.append(f"rank slot {slot} runs another configuration: its shared-config hash {run.hex()[:12]} is "
                            f"not rank slot 0's {first[0].hex()[:12]} (every config section but local paths and keys "
                            "must match: docs/trust.md)")  # fmt: skip
        if roster != first[1]:
            problems.append(f"rank slot {slot} holds another roster: hash {roster.hex()[:12]}, rank slot 0's "
                            f"{first[1].hex()[:12]}")  # fmt: skip
    return problems


def roster_hash(roster: Roster) -> bytes:
    """SHA-256 of the roster's names and keys in name order: equal exactly when two rosters are."""
    lines = sorted(f"{name}={public_text(key)}\n" for name, key in roster.owners.items())
    return hashlib.sha256("".join(lines).encode()).digest()


def check_signatures(transcript: bytes, hellos: list[bytes], signatures: list[bytes]) -> list[str]:
    """Every slot whose signature is missing or does not verify over this run's transcript."""
    problems = []
    for slot, (hello, signature) in enumerate(zip(hellos, signatures)):
        if not any(signature):
            problems.append(f"rank slot {slot}: missing signature")
            continue
        try:
            Ed25519PublicKey.from_public_bytes(_fields(hello)[1]).verify(signature, transcript)
        except InvalidSignature:
            problems.append(f"rank slot {slot}: wrong signature over this run's transcript (forged, or replayed from another run)")
    return problems


def build_transcript(run_id: str, hellos: list[bytes]) -> bytes:
    """What every rank signs: the protocol, the run id, the owner count, and each slot with its hello."""
    run = run_id.encode()
    parts = [b"unify-dist admission v1\0", len(run).to_bytes(4, "big"), run, len(hellos).to_bytes(4, "big")]
    for slot, hello in enumerate(hellos):
        parts += [slot.to_bytes(4, "big"), hello]
    return b"".join(parts)


def _hello(owner: str, identity: bytes, nonce: bytes, ephemeral: bytes) -> bytes:
    name = owner.encode()
    if not name or len(name) > NAME_BYTES:
        raise UserError(f"trust.owner must be 1 to {NAME_BYTES} bytes of UTF-8, got {owner!r}; use this owner's roster name")
    return name.ljust(NAME_BYTES, b"\0") + identity + nonce + ephemeral


def _fields(hello: bytes) -> tuple[str, bytes, bytes, bytes]:
    """(name, identity key, nonce, ephemeral key) of a hello."""
    name = hello[:NAME_BYTES].rstrip(b"\0").decode(errors="replace")
    rest = hello[NAME_BYTES:]
    return name, rest[:32], rest[32:64], rest[64:96]


def _shared(hello: bytes) -> tuple[bytes, bytes]:
    """(run id hash, roster hash) of a hello."""
    rest = hello[NAME_BYTES + 96 :]
    return rest[:32], rest[32:64]


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _derive(shared: bytes, salt: bytes, label: str) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, f"unify-dist/v1 {label}".encode()).derive(shared)


def _all_gather_bytes(mine: bytes, world: int, group: dist.ProcessGroup | None) -> list[bytes]:
    """Every rank's fixed-length byte string (one all_gather of uint8)."""
    tensor = torch.tensor(list(mine), dtype=torch.uint8)
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor, group=group)
    return [bytes(t.tolist()) for t in out]


def _refusal(problems: list[str]) -> str:
    mismatch = any(" runs another configuration" in p or " holds another roster" in p for p in problems)
    fix = "give every owner the same config and roster" if mismatch else "fix the roster, trust.key or trust.owner"
    return "admission refused: " + "; ".join(problems) + f"; no weight was sent ({fix})"
