"""The digest of a model's state: a function of named tensors, so it can be computed offline from a state dict.

Every round's record holds each owner's digest of the unified state; `unify-dist verify` recomputes it
from `final.pt` (loaded with weights_only=True) and compares. The digest is BLAKE2b (8 bytes, 16 hex
digits) over every tensor in name order, each as its name, dtype, shape and its elements' bytes in
memory order (a channels_last weight hashes its NHWC bytes, as the flat buffer holds them). Names,
dtypes and shapes are hashed too, so two states with the same bytes laid out differently differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["state_digest", "memory_order_bytes"]

DIGEST_BYTES = 8


def memory_order_bytes(t: Tensor) -> memoryview:
    """The bytes of a dense tensor's elements in the order they sit in memory (a copy only for a GPU or
    an overlapping/gapped tensor, which then hashes in its logical order)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()  # host sync; the digest is taken once per round
    dims = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    ordered = t.permute(dims)  # a dense tensor permuted to memory order is contiguous: no copy
    flat = ordered.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def state_digest(named: Iterable[tuple[str, Tensor]]) -> str:
    """16 hex digits of BLAKE2b over (name, dtype, shape, memory-order bytes) of each tensor, in name order.

    A name given twice (a tied weight under both names in a state dict) is hashed under each name.
    """
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for name, t in sorted(named, key=lambda item: item[0]):
        head = f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{','.join(map(str, t.shape))}\0".encode()
        h.update(len(head).to_bytes(4, "big") + head)
        h.update(t.numel().to_bytes(8, "big"))
        h.update(memory_order_bytes(t))
    return h.hexdigest()
