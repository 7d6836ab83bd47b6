"""A reduction in shards: every owner combines one shard of each chunk, pipelined over the chunks.

Each chunk of `source` is cut into one shard per owner; an all_to_all hands owner r every owner's shard
r, owner r combines them into shard r of `target`, and an all_gather of the combined shards gives every
owner the whole chunk of `target`. (W-1)/W of a chunk of `source` and (W-1)/W of one of `target` leave
each owner: a ring all_reduce's bytes when both have the same dtype, the least any all_reduce sends.
Each shard's bits are computed once, by one owner, so every owner holds the same bits; a coordinate-wise
combine gives a shard the bits it would have inside the whole vector.

Used by unify_dist.narrow (bf16 / fp16 tensors: source and target the same buffer) and by the 16-bit
compressed sum of 4 or more owners (Collective._half_gather: 16-bit updates in, float32 sums out).
`core` is a unify_dist.collectives.Collective (its _all_to_all, _all_gather, world, chunk_elements).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["sharded_combine"]


def sharded_combine(core: Any, source: Tensor, target: Tensor, combine: Callable[[Tensor], Tensor]) -> None:
    """target <- combine applied shard by shard to every owner's `source` (1-d, as many elements as target).

    combine: every owner's shard [world, p] in source's dtype, rank order (padding included) -> the
    combined shard [p] in target's dtype; coordinate-wise. A collective: per chunk of core.chunk_elements
    one all_to_all and one all_gather, on every owner in the same order. `target` may be `source`.

    Pipelined: chunk k+1's all_to_all and chunk k's all_gather are on the wire while chunk k is combined,
    so the widening and the rule's arithmetic hide behind the link instead of adding to it. Two sets of
    scratch buffers alternate. Up to three exchanges are in flight at once between the same owners
    (chunk k+1's all_to_all, chunks k-1's and k's all_gathers), so each chunk's two exchanges carry their
    own tags: 2k+1 and 2k+2 (unify_dist.exchange).
    """
    n, world, size, out_size = source.numel(), core.world, source.element_size(), target.element_size()
    chunk = min(core.chunk_elements, max(n, 1))
    spans = [(start, min(n, start + chunk)) for start in range(0, n, chunk)]
    shard = -(-chunk // world)  # elements each owner combines per chunk; the last shard is padded
    device = source.device
    send = [torch.zeros(world * shard, dtype=source.dtype, device=device) for _ in range(2)]
    received = [torch.empty(world * shard * size, dtype=torch.uint8, device=device) for _ in range(2)]
    gathered = [torch.empty(world * shard * out_size, dtype=torch.uint8, device=device) for _ in range(2)]
    mine = [torch.empty(shard, dtype=target.dtype, device=device) for _ in range(2)]
    gathers: list[tuple[Any, int, int] | None] = [None, None]  # per scratch set: (work, start, end) in flight

    def part(k: int) -> int:  # chunk k's shard length (the last chunk may be shorter)
        return -(-(spans[k][1] - spans[k][0]) // world)

    def exchange(k: int):  # start chunk k's all_to_all: owner r receives every owner's shard r
        (start, end), b, p = spans[k], k % 2, part(k)
        send[b][: end - start] = source[start:end]
        send[b][end - start : world * p].zero_()  # padding: combined, then never read
        return core._all_to_all(received[b][: world * p * size], send[b][: world * p].view(torch.uint8),
                                async_op=True, tag=2 * k + 1)  # fmt: skip

    def land(b: int) -> None:  # wait for a chunk's all_gather and write the combined chunk back
        if gathers[b] is not None:
            work, start, end = gathers[b]
            work.wait()
            target[start:end] = gathered[b][: (end - start) * out_size].view(target.dtype)
            gathers[b] = None

    pending = exchange(0)  # collective
    for k, (start, end) in enumerate(spans):
        b, p = k % 2, part(k)
        pending.wait()
        if k + 1 < len(spans):
            pending = exchange(k + 1)  # collective; its scratch set was last used by chunk k-1, exchanged already
        land(b)  # chunk k-2's gather used this set's gathered / mine
        mine[b][:p] = combine(received[b][: world * p * size].view(source.dtype).view(world, p))
        parts = [gathered[b][r * p * out_size : (r + 1) * p * out_size] for r in range(world)]
        work = core._all_gather(parts, mine[b][:p].view(torch.uint8), async_op=True, tag=2 * k + 2)  # collective
        gathers[b] = (work, start, end)
    land(0)
    land(1)
