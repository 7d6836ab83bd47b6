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
...) so no rank is everyone's first target. all_to_all (equal parts) is the same exchange with a
different part for each peer: (W-1)/W of the tensor leaves each rank.

async_op: the requests are left in flight and a Pending is returned, whose wait() waits for them all
(narrow.py pipelines chunks this way: one chunk's all_to_all and the previous chunk's all_gather on the
wire together). Exchanges in flight together between the same ranks each need their own `tag` (a
point-to-point tag, >= 0), so a message can only be matched to the exchange it belongs to: then the
order in which ranks start them does not matter here (tests/test_exchange.py starts them in opposite
orders), but torch's collectives, where receive-first does not apply, need the same order everywhere,
so every rank issues the same exchanges with the same tags in the same order.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

__all__ = ["Pending", "all_gather", "all_to_all", "pairwise_sum_"]


class Pending:
    """One exchange's requests in flight; wait() waits for every one of them (the sends' buffers may then
    be reused, the receives' read)."""

    def __init__(self, requests: list[dist.Work]):
        self._requests = requests

    def wait(self) -> None:
        for request in self._requests:
            request.wait()
        self._requests = []


def all_gather(out: list[Tensor], tensor: Tensor, group: dist.ProcessGroup | None = None, async_op: bool = False,
               tag: int = 0) -> Pending | dist.Work | None:  # fmt: skip
    """out[i] <- rank i's `tensor`, on every rank (a collective); receives first where the group is gloo's
    and every tensor is a contiguous CPU tensor, else torch's all_gather. async_op: returns what to wait()
    on (a Pending, or torch's work), else None once done."""
    if not _receive_first(out, tensor, group):
        return dist.all_gather(out, tensor, group=group, async_op=async_op)
    rank = dist.get_rank(group)
    if out[rank] is not tensor:
        out[rank].copy_(tensor)
    return _exchange(out, [tensor] * len(out), group, async_op, tag)


def all_to_all(out: Tensor, tensor: Tensor, group: dist.ProcessGroup | None = None, async_op: bool = False,
               tag: int = 0) -> Pending | dist.Work | None:  # fmt: skip
    """Equal parts: part r of `tensor` goes to rank r, part r of `out` comes from rank r (a collective, as
    torch's all_to_all_single without split sizes); receives first under _receive_first's conditions,
    else torch's all_to_all_single. async_op as all_gather's."""
    world = dist.get_world_size(group)
    if tensor.numel() % world or out.numel() != tensor.numel() or not _receive_first([out], tensor, group):
        return dist.all_to_all_single(out, tensor, group=group, async_op=async_op)
    rank, size = dist.get_rank(group), tensor.numel() // world
    into, parts = list(out.split(size)), list(tensor.split(size))  # contiguous views: 1-d, equal parts
    into[rank].copy_(parts[rank])
    return _exchange(into, parts, group, async_op, tag)


def _exchange(into: list[Tensor], parts: list[Tensor], group: dist.ProcessGroup | None, async_op: bool,
              tag: int) -> Pending | None:  # fmt: skip
    """into[p] <- what peer p sends; parts[p] -> peer p; every receive posted before any send."""
    rank, world = dist.get_rank(group), len(into)
    peers = [(rank + k) % world for k in range(1, world)]
    receives = [dist.irecv(into[p], src=_global(group, p), group=group, tag=tag) for p in peers]  # announced first
    sends = [dist.isend(parts[p], dst=_global(group, p), group=group, tag=tag) for p in peers]
    pending = Pending(receives + sends)
    if async_op:
        return pending
    pending.wait()
    return None


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
