"""all_gather over gloo with every receive posted before any send: what a slow link needs.

gloo's TCP transport writes a message only once the receiver has announced a buffer for it, and that
announcement travels on the same connection as whatever the receiver is already sending. gloo's
all_gather sends first: between two owners, one owner's announcement can sit behind megabytes of its
own outgoing data, so the other direction starts late and the link is busy one way at a time for
part of the transfer. Measured on a 20 Mbit/s tc-tbf link between two network namespaces (22.4 MB
each way, resnet18's bf16 update): gloo's all_gather 14.4 s (12.8 Mbit/s), a send before a receive
18.4 s (one direction after the other), the same messages with the receive posted first 9.6 s (19.6
Mbit/s, the link's rate). So here every rank posts its receives first: every announcement leaves
before any data, and both directions run at once (docs/performance.md, "Compressed unification").

Bytes are the same as a ring all_gather's: (W-1) times a rank's own tensor leave it; the messages go
straight to each peer instead of around the ring, each peer's first to the next rank's (rank + 1, + 2,
...) so no rank is everyone's first target.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather", "pairwise_sum_"]


def all_gather(out: list[Tensor], tensor: Tensor, group: dist.ProcessGroup | None = None) -> None:
    """out[i] <- rank i's `tensor`, on every rank (a collective); receives first where the group is gloo's
    and every tensor is a contiguous CPU tensor, else torch's all_gather."""
    if not _receive_first(out, tensor, group):
        dist.all_gather(out, tensor, group=group)
        return
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if out[rank] is not tensor:
        out[rank].copy_(tensor)
    peers = [(rank + k) % world for k in range(1, world)]
    receives = [dist.irecv(out[p], src=_global(group, p), group=group) for p in peers]  # announced before any data
    sends = [dist.isend(tensor, dst=_global(group, p), group=group) for p in peers]
    for request in receives + sends:
        request.wait()


def pairwise_sum_(tensor: Tensor, scratch: Tensor, group: dist.ProcessGroup | None = None) -> bool:
    """For two ranks over gloo: tensor <- the SUM over both, by one receive-first exchange and a local add
    (the bytes of a ring all_reduce between two ranks). Returns False, touching nothing, where it does not
    apply (another world size, backend or device): the caller all_reduces instead.

    Integers only (a float tensor returns False): their sum is exact in any order, so both ranks hold
    the same bits.
    """
    if dist.get_world_size(group) != 2 or tensor.is_floating_point() or not _receive_first([scratch], tensor, group):
        return False
    rank = dist.get_rank(group)
    rows = [tensor, scratch] if rank == 0 else [scratch, tensor]
    all_gather(rows, tensor, group)
    tensor.add_(scratch)
    return True


def _receive_first(out: list[Tensor], tensor: Tensor, group: dist.ProcessGroup | None) -> bool:
    backend = str(dist.get_backend(group))
    if backend != "gloo" and "cpu:gloo" not in backend:  # CPU tensors of a mixed group go through its gloo
        return False
    return all(t.device.type == "cpu" and t.is_contiguous() for t in (*out, tensor))


def _global(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)
