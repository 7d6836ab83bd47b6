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
from typing import Any

import torch
from torch import Tensor

from unify_dist.collectives import Collective

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
    """Each owner combines one shard of every chunk (module docstring): all_to_all, the rule, all_gather.

    Pipelined: chunk k+1's all_to_all and chunk k's all_gather are on the wire while chunk k is combined,
    so the widening and the rule's arithmetic hide behind the link instead of adding to it. Two sets of
    scratch buffers alternate; every rank issues the same collectives in the same order. Up to three
    exchanges are in flight at once between the same owners (chunk k+1's all_to_all, chunks k-1's and
    k's all_gathers), so each chunk's two exchanges carry their own tags: 2k+1 and 2k+2.
    """
    n, world, size = buffer.numel(), core.world, buffer.element_size()
    chunk = min(core.chunk_elements, max(n, 1))
    spans = [(start, min(n, start + chunk)) for start in range(0, n, chunk)]
    shard = -(-chunk // world)  # elements each owner combines per chunk; the last shard is padded
    device, wide, every = buffer.device, widened(buffer.dtype), len(healthy) == world
    send = [torch.zeros(world * shard, dtype=buffer.dtype, device=device) for _ in range(2)]
    received = [torch.empty(world * shard * size, dtype=torch.uint8, device=device) for _ in range(2)]
    gathered = [torch.empty(world * shard * size, dtype=torch.uint8, device=device) for _ in range(2)]
    mine = [torch.empty(shard, dtype=buffer.dtype, device=device) for _ in range(2)]
    gathers: list[tuple[Any, int, int] | None] = [None, None]  # per scratch set: (work, start, end) in flight

    def part(k: int) -> int:  # chunk k's shard length (the last chunk may be shorter)
        return -(-(spans[k][1] - spans[k][0]) // world)

    def exchange(k: int):  # start chunk k's all_to_all: owner r receives every owner's shard r
        (start, end), b, p = spans[k], k % 2, part(k)
        send[b][: end - start] = buffer[start:end]
        send[b][end - start : world * p].zero_()  # padding: combined, then never read
        return core._all_to_all(received[b][: world * p * size], send[b][: world * p].view(torch.uint8),
                                async_op=True, tag=2 * k + 1)  # fmt: skip

    def land(b: int) -> None:  # wait for a chunk's all_gather and write the combined chunk back
        if gathers[b] is not None:
            work, start, end = gathers[b]
            work.wait()
            buffer[start:end] = gathered[b][: (end - start) * size].view(buffer.dtype)
            gathers[b] = None

    pending = exchange(0)  # collective
    for k, (start, end) in enumerate(spans):
        b, p = k % 2, part(k)
        pending.wait()
        if k + 1 < len(spans):
            pending = exchange(k + 1)  # collective; its scratch set was last used by chunk k-1, exchanged already
        land(b)  # chunk k-2's gather used this set's gathered / mine
        stacked = received[b][: world * p * size].view(buffer.dtype).view(world, p)
        stacked = (stacked if every else stacked[healthy]).to(wide)
        mine[b][:p] = combine(stacked, weights.to(wide)).to(buffer.dtype)
        parts = [gathered[b][r * p * size : (r + 1) * p * size] for r in range(world)]
        work = core._all_gather(parts, mine[b][:p].view(torch.uint8), async_op=True, tag=2 * k + 2)  # collective
        gathers[b] = (work, start, end)
    land(0)
    land(1)
