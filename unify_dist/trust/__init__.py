"""Trust across organisations: only roster owners join, and unify traffic is sealed (AEAD) on the wire.

identity   Ed25519 keys (`unify-dist keygen`) and the roster of owners' public keys;
admission  a signed transcript of fresh nonces and X25519 keys, checked against the roster, and the
           pairwise keys derived from it (HKDF, one per direction);
channel    one sealed link to a peer (AES-256-GCM, counter nonces, the step bound in);
ring       SealedRing: the reducer a Collective uses instead of gloo's plaintext collectives.
"""

from unify_dist.trust.admission import Admission, AdmissionError, admit
from unify_dist.trust.channel import IntegrityError, Link
from unify_dist.trust.identity import Roster, generate_key, load_private_key, load_roster, public_text
from unify_dist.trust.ring import SealedRing

__all__ = [
    "Admission", "AdmissionError", "IntegrityError", "Link", "Roster", "SealedRing",
    "admit", "generate_key", "load_private_key", "load_roster", "public_text",
]  # fmt: skip
