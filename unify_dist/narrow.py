"""Unified tensors in float dtypes narrower than the main buffer (bf16, fp16): one buffer per dtype.

A pretrained model often loads in bf16 with some fp32 tensors (norms, a new head). Each narrow dtype's
unified tensors live in their own flat buffer (unify_dist.flat.FlatState.narrow), keep their dtype, and
are unified after the main collective, chunk by chunk: the owners' raw 16-bit values are widened to fp32
(the rule's arithmetic in fp32, not in 8 mantissa bits), combined by the rule's pure reference over the
healthy owners in rank order, and rounded back once. A 16-bit all_reduce would round at every hop instead.
max and absmax pick one owner's value, which rounds back to itself exactly. Two ways to move the bytes:

  sharded  (3 or more owners, gloo's or NCCL's collectives) each chunk cut into one shard per owner; an
           all_to_all hands owner r every owner's shard r, owner r combines it, and an all_gather of the
           combined shards gives every owner the whole chunk. 2 (W-1)/W x 2 bytes per element leave each
           owner: a ring all_reduce's bytes, the least any all_reduce sends. Each shard's bits are
           computed once, by one owner, so every owner holds the same bits. Over gloo both exchanges
           post every receive first (unify_dist.exchange): 1.17-1.23x the link's floor for a bf16
           LLaMA-7B-shaped adapter at 100 Mbit, against 1.48-1.54x with gloo's own (docs/finetune.md).
  gather   (2 owners, or a reducer such as trust's sealed ring, which offers all_reduce and all_gather
           only) every owner's chunk gathered to every owner, each combining all of it in the same order:
           the same bits everywhere. (W-1) x 2 bytes per element: the sharded path's bytes at 2 owners,
           twice them at 4.

The rules are coordinate-wise (a RuleSpec's `combine`, or a reference that the gather path already
runs per chunk), so a shard combines alone to the same bits as inside its whole vector.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from unify_dist.collectives import Collective
from unify_dist.sharded import sharded_combine

__all__ = ["unify_narrow", "widened"]


def widened(dtype: torch.dtype) -> torch.dtype:
    """The dtype a rule's arithmetic runs in for tensors of `dtype`: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def unify_narrow(core: Collective, combine: Callable[[Tensor, Tensor], Tensor], weight: float, flags: list[float]) -> None:
    """Unify every narrow-dtype buffer of core.flat in place with `combine` (stacked, weights) -> unified.

    `flags`: each owner's sick flag from the main collective (the same on every rank); sick owners are
    left out, as on the main path. A collective: one small all_gather of the owners' weights, then per
    chunk of each buffer an all_to_all and an all_gather (sharded) or one all_gather (gather).
    """
    flat = core.flat
    if not flat.narrow:
        return
    healthy = [r for r in range(core.world) if not flags[r]]
    if not healthy:
        return
    device = next(iter(flat.narrow.values())).device
    mine = torch.tensor([weight], dtype=torch.float64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(core.world)]
    core._all_gather(everyone, mine)  # collective: weighted rules need every owner's weight
    weights = torch.cat([everyone[r] for r in healthy])
    # the sealed ring (core.reducer) has no all_to_all, and at 2 owners gathering sends the same bytes
    unify = _unify_sharded if core.reducer is None and core.world > 2 else _unify_buffer
    for buffer in flat.narrow.values():
        unify(core, buffer, combine, weights, healthy)


def _unify_buffer(core: Collective, buffer: Tensor, combine, weights: Tensor, healthy: list[int]) -> None:
    """Every owner gathers every owner's chunk and combines all of it (module docstring: gather)."""
    n = buffer.numel()
    chunk = min(core.chunk_elements, max(n, 1))
    # raw bytes on the wire: every backend gathers uint8, whatever it thinks of bf16
    rows = torch.empty(core.world, chunk * buffer.element_size(), dtype=torch.uint8, device=buffer.device)
    wide = widened(buffer.dtype)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        size = (end - start) * buffer.element_size()
        parts = [rows[r, :size] for r in range(core.world)]
        core._all_gather(parts, buffer[start:end].view(torch.uint8))  # collective
        stacked = torch.stack([rows[r, :size].view(buffer.dtype) for r in healthy]).to(wide)
        buffer[start:end] = combine(stacked, weights.to(wide)).to(buffer.dtype)


def _unify_sharded(core: Collective, buffer: Tensor, combine, weights: Tensor, healthy: list[int]) -> None:
    """Each owner combines one shard of every chunk (module docstring; unify_dist.sharded: all_to_all, the
    rule, all_gather, pipelined over the chunks)."""
    wide, every = widened(buffer.dtype), len(healthy) == core.world

    def shard(stacked: Tensor) -> Tensor:  # every owner's shard, rank order -> the rule over the healthy ones
        return combine((stacked if every else stacked[healthy]).to(wide), weights.to(wide)).to(buffer.dtype)

    sharded_combine(core, buffer, buffer, shard)
