"""Identities, roster, config and admission: keygen through the real CLI, admission on real gloo groups
(one honest run, then impostors of every kind in the same group, each refused on every rank)."""

from __future__ import annotations

import functools
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.trust_keys import fresh_keys, key, roster_of
from tests.world import cli, run_world
from unify_dist.app.config import load_config
from unify_dist.errors import UserError
from unify_dist.trust import AdmissionError, Roster, admit, load_private_key, load_roster
from unify_dist.trust.admission import build_transcript, check_hellos, check_signatures
from unify_dist.trust.identity import public_bytes, public_text


# ---------------------------------------------------------------------------------------- identities
def test_keygen_writes_private_0600_and_public_beside(tmp_path) -> None:
    out = tmp_path / "alice.key"
    done = cli(["keygen", "--out", str(out), "--name", "alice"])
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    public = (tmp_path / "alice.key.pub").read_text().strip()
    assert public_text(load_private_key(out)) == public
    assert f'alice = "{public}"' in done.stdout
    again = cli(["keygen", "--out", str(out)])  # an identity is never overwritten
    assert again.returncode == 2 and "already exists" in again.stderr


def test_private_key_readable_by_others_is_refused(tmp_path) -> None:
    out = tmp_path / "k"
    assert cli(["keygen", "--out", str(out)]).returncode == 0
    out.chmod(0o644)
    with pytest.raises(UserError, match="chmod 600"):
        load_private_key(out)


def test_roster_reads_names_and_refuses_bad_entries(tmp_path) -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    good = tmp_path / "roster.toml"
    good.write_text(f'[owners]\nalice = "{public_text(a)}"\nbob = "{public_text(b)}"\n')
    roster = load_roster(good)
    assert roster.owner_of(public_bytes(b)) == "bob" and roster.owner_of(b"x" * 32) is None
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[owners]\nalice = "{public_text(a)}"\ncarol = "{public_text(a)}"\ndave = "not base64!"\n')
    with pytest.raises(UserError, match="'alice' and 'carol' share one key.*'dave' has no valid public key"):
        load_roster(bad)


def test_trust_config_off_by_default_and_checked_when_on(tmp_path) -> None:
    assert load_config(None).trust.enabled is False
    with pytest.raises(UserError, match="trust.enabled needs trust.roster, trust.key, trust.owner"):
        load_config(None, ["trust.enabled=true"])


# ---------------------------------------------------------------------------------------- admission
def _hello(name: str, k: Ed25519PrivateKey, nonce: bytes) -> bytes:
    return name.encode().ljust(64, b"\0") + public_bytes(k) + nonce + bytes(32)


def test_a_signature_from_another_run_does_not_verify() -> None:
    """Replay: slot 1 resends its hello and signature from an earlier run; slot 0's fresh nonce differs."""
    k0, k1 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    old = [_hello("a", k0, b"0" * 32), _hello("b", k1, b"1" * 32)]
    old_signature = k1.sign(build_transcript("run", old))
    new = [_hello("a", k0, b"2" * 32), old[1]]
    transcript = build_transcript("run", new)
    problems = check_signatures(transcript, new, [k0.sign(transcript), old_signature])
    assert problems == ["rank slot 1: wrong signature over this run's transcript (forged, or replayed from another run)"]


def test_a_replayed_nonce_is_named() -> None:
    k0, k1 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    hellos = [_hello("a", k0, b"n" * 32), _hello("b", k1, b"n" * 32)]
    roster = Roster({"a": public_bytes(k0), "b": public_bytes(k1)})
    assert check_hellos(hellos, roster) == ["rank slot 1: replays rank slot 0's nonce"]


class _Forger:
    """Holds a roster key's public half but signs with another key (or not at all): an impostor."""

    def __init__(self, shown: Ed25519PrivateKey, signs_with: Ed25519PrivateKey | None):
        self.shown, self.signs_with = shown, signs_with

    def public_bytes(self, *args) -> bytes:
        return self.shown.public_key().public_bytes(*args)

    def sign(self, data: bytes) -> bytes:
        return self.signs_with.sign(data) if self.signs_with else bytes(64)


SCENARIOS = {
    "honest": None,
    "unknown key": "rank slot 2: its key",
    "duplicate owner": "rank slot 2: duplicate owner 'owner1', who already holds rank slot 1",
    "wrong name": "rank slot 2: claims owner 'owner0' but its key is owner 'owner2''s",
    "wrong signature": "rank slot 2: wrong signature over this run's transcript",
    "missing signature": "rank slot 2: missing signature",
}


def _admissions(rank: int, world: int, raws: list[bytes], outsider: bytes) -> dict:
    roster, out = roster_of(raws), {}
    for scenario in SCENARIOS:
        identity, name = key(raws[rank]), f"owner{rank}"
        if rank == 2:  # the odd one out, in every scenario but the honest one
            identity, name = {
                "honest": (identity, name),
                "unknown key": (key(outsider), name),
                "duplicate owner": (key(raws[1]), "owner1"),
                "wrong name": (identity, "owner0"),
                "wrong signature": (_Forger(identity, key(outsider)), name),
                "missing signature": (_Forger(identity, None), name),
            }[scenario]
        try:
            a = admit(identity, name, roster, run_id=f"test {scenario}")
            out[scenario] = (a.owners, a.transcript_hash, a.link_keys, a.pair_secrets)
        except AdmissionError as e:
            out[scenario] = str(e)
    return out


@functools.cache
def _results() -> list[dict]:
    return run_world(_admissions, 3, fresh_keys(3), fresh_keys(1)[0])


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "honest"])
def test_impostor_refused_on_every_rank_naming_slot_and_reason(scenario: str) -> None:
    for result in _results():
        message = result[scenario]
        assert isinstance(message, str) and message.startswith("admission refused: "), message
        assert SCENARIOS[scenario] in message and "no weight was sent" in message


def test_honest_admission_gives_directional_keys_both_ends_agree_on() -> None:
    results = [r["honest"] for r in _results()]
    assert all(r[0] == ["owner0", "owner1", "owner2"] for r in results)
    assert len({r[1] for r in results}) == 1  # one transcript
    for i in range(3):
        for j in range(3):
            if i != j:
                send_ij, recv_ij = results[i][2][j]
                assert send_ij == results[j][2][i][1] and recv_ij == results[j][2][i][0]
                assert send_ij != recv_ij  # one key per direction
                assert results[i][3][j] == results[j][3][i]  # secure averaging's pair secret
