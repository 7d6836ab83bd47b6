"""Owner identities: an Ed25519 key pair per owner, and the roster every owner holds (shared out of band).

The private key is a PEM file readable by its owner only (mode 0600); the public key is 32 bytes,
written in base64 beside it (`owner.key.pub`) and listed in the roster under the owner's name::

    # roster.toml: the same file on every owner's machine
    [owners]
    alice = "3q2+7w...="   # the text of alice's owner.key.pub
    bob = "yv66vg...="

Nothing here talks to other processes; admission (unify_dist.trust.admission) uses these.
"""

from __future__ import annotations

import base64
import binascii
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from unify_dist.errors import UserError

__all__ = ["Roster", "generate_key", "load_private_key", "load_roster", "public_bytes", "public_text"]


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key (of a private key: its public half)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_text(key: Ed25519PrivateKey | Ed25519PublicKey | bytes) -> str:
    """The roster's spelling of a public key: base64 of its 32 raw bytes."""
    raw = key if isinstance(key, bytes) else public_bytes(key)
    return base64.b64encode(raw).decode("ascii")


def generate_key(out: str | Path) -> tuple[Path, str]:
    """Write a fresh Ed25519 private key to `out` (mode 0600, never overwritten) and its public key to
    `out`.pub; return the public file's path and the public key's roster text."""
    path = Path(out)
    if path.exists():
        raise UserError(f"'{path}' already exists; an identity key is never overwritten: choose another --out")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    # created 0600 in one step: the secret is never readable by others, not even for a moment
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    text = public_text(key)
    public = path.with_name(path.name + ".pub")
    public.write_text(text + "\n")
    return public, text


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """This owner's identity key; refuses a file others can read (as ssh does)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"trust.key '{p}' does not exist; make one with `unify-dist keygen --out {p}`")
    if p.stat().st_mode & 0o077:
        raise UserError(f"trust.key '{p}' is readable by other users; run `chmod 600 {p}`")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise UserError(f"trust.key '{p}' is not an unencrypted PEM private key ({e}); make one with `unify-dist keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"trust.key '{p}' holds a {type(key).__name__}, not an Ed25519 key; make one with `unify-dist keygen`")
    return key


@dataclass(frozen=True)
class Roster:
    """Who may take part: owner name -> 32-byte Ed25519 public key (one key per owner, one owner per key)."""

    owners: dict[str, bytes]

    def owner_of(self, public: bytes) -> str | None:
        """The name listed with this public key, or None if the key is not in the roster."""
        return next((name for name, key in self.owners.items() if key == public), None)


def load_roster(path: str | Path) -> Roster:
    """Read and check a roster TOML file: an [owners] table of name = base64 public key."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"trust.roster '{p}' does not exist; write an [owners] table of name = public key (docs/trust.md)")
    try:
        raw = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"trust.roster '{p}' is not valid TOML ({e}); fix the syntax") from None
    table = raw.get("owners")
    if not isinstance(table, dict) or not table:
        raise UserError(f"trust.roster '{p}' has no [owners] table; list each owner as name = \"<its owner.key.pub>\"")
    owners: dict[str, bytes] = {}
    problems = []
    for name, text in table.items():
        key = _decode(text)
        if key is None:
            problems.append(f"owner '{name}' has no valid public key (32 bytes in base64, as keygen writes)")
        elif key in owners.values():
            problems.append(f"owners '{next(n for n, k in owners.items() if k == key)}' and '{name}' share one key")
        else:
            owners[name] = key
    if problems:
        raise UserError(f"trust.roster '{p}': " + "; ".join(problems))
    return Roster(owners)


def _decode(text: object) -> bytes | None:
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        return None
    return raw if len(raw) == 32 else None
