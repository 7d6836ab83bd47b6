"""One direction-keyed AEAD link to a peer: AES-256-GCM with a counter nonce per direction.

Each direction of each pair has its own key (from admission's key agreement), so a 96-bit nonce made
of a message counter is unique for the key's whole life; both ends count the messages of a direction
in the same order (point-to-point traffic of one pair is ordered), so the nonce is never sent. The
associated data names the link and the step (call, stage, chunk), so a sealed chunk moved to another
place, another round or another link fails authentication like a flipped byte does.
"""

from __future__ import annotations

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["TAG_BYTES", "IntegrityError", "Link"]

TAG_BYTES = 16
"""AES-GCM's authentication tag, appended to every sealed message."""


class IntegrityError(RuntimeError):
    """A sealed message failed authentication: bytes were changed in transit (or a peer is an impostor)."""


class Link:
    """This rank's sealing state towards one peer: a send key and counter, a receive key and counter."""

    def __init__(self, rank: int, peer: int, send_key: bytes, recv_key: bytes):
        self.rank, self.peer = rank, peer
        self._send, self._recv = AESGCM(send_key), AESGCM(recv_key)
        self.sent = 0
        self.received = 0

    def seal_into(self, data: np.ndarray, label: str, out: np.ndarray) -> None:
        """Encrypt and authenticate `data` (bytes) into `out` (len(data) + TAG_BYTES bytes)."""
        nonce = self.sent.to_bytes(12, "big")
        self.sent += 1
        self._send.encrypt_into(nonce, data, _aad(self.rank, self.peer, label), out)

    def open_into(self, sealed: np.ndarray, label: str, out: np.ndarray) -> bool:
        """Check and decrypt the peer's next message into `out`; False (and `out` unspecified) on a bad tag.

        Returns a flag instead of raising so the caller can finish the protocol step that every rank is
        in (no rank left waiting) and then stop everyone together.
        """
        nonce = self.received.to_bytes(12, "big")
        self.received += 1
        try:
            self._recv.decrypt_into(nonce, sealed, _aad(self.peer, self.rank, label), out)
        except InvalidTag:
            return False
        return True


def _aad(src: int, dst: int, label: str) -> bytes:
    return f"unify-dist/v1 {src}>{dst} {label}".encode()
