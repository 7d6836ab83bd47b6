"""Secure averaging: pairwise additive masks that cancel in the all_reduce SUM, so it reveals only the sum.

Threat model: honest-but-curious owners who follow the protocol but read everything they receive, and
who do not collude. Plain all_reduce is not private even with many owners: in a ring all_reduce the
first hop of every chunk carries one owner's raw values. With masks, what leaves an owner is
fixed-point(x) + sum of its pair masks (mod 2^64), uniformly distributed for anyone lacking the pair
secrets. With 2 owners masking gains nothing: the sum minus your own weights is the peer's weights.

How: every pair (i, j) shares a 256-bit secret. With [trust] on it comes from admission's X25519 key
agreement (unify_dist.trust: never sent, bound to the signed transcript); with trust off it is sent once
from i to j point-to-point, in the clear (seen by no third owner, but by anyone on the path). Each unify, both derive the same mask
stream from (secret, nonce) with Philox; the lower rank adds it, the higher subtracts it. Arithmetic is
in int64 fixed point with wrap-around, where the masks cancel exactly.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["FRACTION_BITS", "SecureSum", "exchange_pair_secrets", "masked_contribution", "secure_sum_"]

FRACTION_BITS = 40
"""Fixed-point resolution 2^-40 (about 1e-12); values up to 2^22 / owners in magnitude fit in int64."""


def exchange_pair_secrets(group: dist.ProcessGroup | None = None) -> dict[int, bytes]:
    """A fresh secret shared with each other owner: {peer rank: 32 bytes}. A collective of sends/recvs.

    Pairs go in one global order; the smallest pending pair always has both ends ready, so no deadlock.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shared: dict[int, bytes] = {}
    for i in range(world):
        for j in range(i + 1, world):
            if rank == i:
                secret = secrets.token_bytes(32)
                dist.send(torch.frombuffer(bytearray(secret), dtype=torch.uint8), dst=j, group=group)
                shared[j] = secret
            elif rank == j:
                buf = torch.empty(32, dtype=torch.uint8)
                dist.recv(buf, src=i, group=group)
                shared[i] = bytes(buf.tolist())
    return shared


def _mask(secret: bytes, nonce: int, n: int) -> Tensor:
    """The pair's mask stream for this unify: n uniform int64 values, equal at both ends of the pair."""
    key = hashlib.blake2b(secret + nonce.to_bytes(8, "little"), digest_size=16).digest()
    bits = np.random.Philox(key=int.from_bytes(key, "little")).random_raw(n)
    return torch.from_numpy(bits.view(np.int64))


def to_fixed(values: Tensor) -> Tensor:
    return torch.round(values.double() * 2.0**FRACTION_BITS).to(torch.int64)


def masked_contribution(values: Tensor, pair_secrets: dict[int, bytes], rank: int, nonce: int) -> Tensor:
    """What this owner sends: fixed-point values plus (lower rank) or minus (higher rank) each pair's mask."""
    limit = 2.0 ** (62 - FRACTION_BITS) / max(len(pair_secrets) + 1, 1)
    if values.numel() and float(values.abs().max()) >= limit:
        raise ValueError(f"secure averaging handles weights below {limit:g} in magnitude; these are larger")
    out = to_fixed(values.cpu())
    for peer, secret in sorted(pair_secrets.items()):
        mask = _mask(secret, nonce, out.numel())
        out = out + mask if rank < peer else out - mask  # int64 wraps mod 2^64, so masks cancel exactly
    return out


def secure_sum_(values: Tensor, pair_secrets: dict[int, bytes], nonce: int, group: dist.ProcessGroup | None = None) -> None:
    """values <- the sum over owners of values, computed from masked contributions (one all_reduce SUM).

    `nonce` must differ between calls with the same secrets (e.g. the round number): reused masks
    would let an observer subtract two rounds' contributions.
    """
    contribution = masked_contribution(values, pair_secrets, dist.get_rank(group), nonce)
    dist.all_reduce(contribution, dist.ReduceOp.SUM, group=group)  # what travels is masked
    values.copy_((contribution.double() / 2.0**FRACTION_BITS).to(values.dtype))


class SecureSum:
    """One owner's side of secure averaging: its pair secrets and the call counter that keeps masks fresh.

    Built collectively (the pair secrets are exchanged point-to-point on construction). The counter is
    the mask nonce: equal on every rank, never reused with one set of secrets; new secrets are drawn in
    every process, so a restarted run starts its counter at 0 safely.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, reducer=None):
        self.group, self.reducer = group, reducer
        self.rank = dist.get_rank(group)
        secrets = getattr(reducer, "pair_secrets", None)
        if secrets is not None:  # trust on: secrets from admission's key agreement, never sent
            self.secrets = dict(secrets)
        else:
            self.secrets = exchange_pair_secrets(group)  # collective (sends and receives)
        self.calls = 0

    def mean_(self, values: Tensor, tail: Tensor, sick: bool) -> None:
        """values <- the mean over healthy owners; `tail` (flags, weight, integer halves) is summed in the
        clear beside them, in the same int64 buffer: one all_reduce SUM. A sick owner masks zeros."""
        mine = torch.zeros_like(values) if sick else values
        sent = masked_contribution(mine, self.secrets, self.rank, nonce=self.calls)
        self.calls += 1
        # masks are made on the CPU (numpy's Philox); NCCL needs the buffer on the GPU
        buffer = torch.cat([sent, tail.round().to(torch.int64).cpu()]).to(values.device)
        if self.reducer is None:
            dist.all_reduce(buffer, dist.ReduceOp.SUM, group=self.group)  # only masked values travel
        else:
            self.reducer.all_reduce(buffer, dist.ReduceOp.SUM)  # masked, and sealed on the wire
        n, world = values.numel(), dist.get_world_size(self.group)
        tail.copy_(buffer[n:].to(tail.dtype))
        total = float(tail[world])  # host sync: the healthy owners' count
        if total > 0:
            values.copy_((buffer[:n].double() / (2.0**FRACTION_BITS * total)).to(values.dtype))
