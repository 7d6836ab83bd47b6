"""Test identities: fresh Ed25519 keys made in the test process and handed to spawned ranks as raw bytes."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from unify_dist.trust.identity import Roster, public_bytes


def fresh_keys(world: int) -> list[bytes]:
    """Raw private bytes of `world` new identity keys (picklable, for run_world)."""
    keys = [Ed25519PrivateKey.generate() for _ in range(world)]
    return [k.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()) for k in keys]


def key(raw: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(raw)


def roster_of(raws: list[bytes], names: list[str] | None = None) -> Roster:
    """A roster listing owner{i} (or the given names) with each key's public half."""
    names = names or [f"owner{i}" for i in range(len(raws))]
    return Roster({n: public_bytes(key(r)) for n, r in zip(names, raws)})
