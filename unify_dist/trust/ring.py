"""The sealed ring: SUM / MAX all_reduce and all_gather as rings of AEAD-sealed chunks over send/recv.

gloo's collectives cannot encrypt, so with trust on the Collective (unify_dist.collectives) hands its
reductions to a SealedRing instead of dist.all_reduce. all_reduce is a ring reduce-scatter (rank r ends
owning the complete chunk (r + 1) mod n, combined once) then a ring all-gather that forwards the owner's
exact bytes, so every rank ends with the same bits, whatever the summation order. Each step is
pipelined: receives are posted first, segments are sealed and sent as they are ready, and each arriving
segment is opened and combined while later ones are still on the wire.

A segment that fails authentication is not combined; the rank finishes the step (nobody is left
waiting), and every call ends with a sealed exchange of each rank's verdict, so every rank raises the
same IntegrityError naming the link, before the caller applies anything.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from unify_dist.trust.admission import Admission
from unify_dist.trust.channel import TAG_BYTES, IntegrityError, Link

__all__ = ["SealedRing", "SEGMENT_BYTES"]

SEGMENT_BYTES = 1 << 20
"""Bytes per sealed message: small enough to overlap sealing with sending, large enough to amortise a message."""


_AHEAD = 1 << 20
"""First message tag of a step's forwarded stream (a step has fewer segments than this: SEGMENT_BYTES each)."""


class SealedRing:
    """A reducer for Collective: `all_reduce(tensor, op)` (SUM or MAX) and `all_gather(out, tensor)`, sealed.

    Built from an Admission on every rank of the group; each call is a collective of point-to-point
    messages to the next rank and from the previous one. CPU tensors only (gloo point-to-point).
    """

    def __init__(self, admission: Admission, group: dist.ProcessGroup | None = None, segment_bytes: int = SEGMENT_BYTES):
        self.group, self.segment_bytes, self.admission = group, segment_bytes, admission
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.links = {p: Link(self.rank, p, *keys) for p, keys in admission.link_keys.items()}
        self.pair_secrets = admission.pair_secrets
        self.calls = 0  # the same on every rank: every rank makes every call; bound into each message
        self._bad: tuple[int, int] | None = None  # (src, dst) of the first message that failed here
        self._pool: dict[str, Tensor] = {}  # send and receive buffers, reused (every step waits for its sends)

    # ------------------------------------------------------------------------------- the reducer API
    def all_reduce(self, tensor: Tensor, op=dist.ReduceOp.SUM) -> None:
        """tensor <- the SUM or MAX over ranks, bit-identical on every rank. A collective."""
        combine = {dist.ReduceOp.SUM: torch.add, dist.ReduceOp.MAX: torch.maximum}.get(op)
        if combine is None:
            raise ValueError(f"the sealed ring reduces with SUM or MAX, not {op}")
        flat = self._flat(tensor)
        if self.world == 1:
            return
        call = self._begin()
        chunks = list(flat.tensor_split(self.world))
        size = max(c.numel() for c in chunks)
        scratch = self._pool.get(f"scratch {flat.dtype}")
        if scratch is None or scratch.numel() < size:  # kept across calls, as the sealed buffers are
            scratch = self._pool[f"scratch {flat.dtype}"] = torch.empty(size, dtype=flat.dtype)
        r, n = self.rank, self.world
        for s in range(n - 2):  # reduce-scatter: after n-1 steps rank r holds chunk (r + 1) mod n complete
            self._step(chunks[(r - s) % n], chunks[(r - s - 1) % n], f"{call} reduce {s}", combine, scratch)
        # The last reduce step forwards each segment as soon as it is complete: the all-gather's first step
        # rides on it instead of waiting for the whole chunk (sealing overlaps the wire, as gloo's ring does).
        s = n - 2
        self._step(chunks[(r - s) % n], chunks[(r - s - 1) % n], f"{call} reduce {s}", combine, scratch,
                   forward=(f"{call} gather 0", chunks[r % n]))  # fmt: skip
        self._circulate(chunks, 1, f"{call} gather", start=1)
        self._settle(call)

    def all_gather(self, out: list[Tensor], tensor: Tensor) -> None:
        """out[i] <- rank i's `tensor` (same shape on every rank), on every rank. A collective."""
        if len(out) != self.world:
            raise ValueError(f"all_gather needs {self.world} output tensors, got {len(out)}")
        out[self.rank].copy_(tensor)
        if self.world == 1:
            return
        call = self._begin()
        blocks = [self._flat(t) for t in out]
        self._circulate(blocks, 0, f"{call} all_gather")
        self._settle(call)

    # ------------------------------------------------------------------------------- the ring
    def _begin(self) -> str:
        self.calls += 1
        self._bad = None
        return f"call {self.calls}"

    def _circulate(self, blocks: list[Tensor], shift: int, label: str, start: int = 0) -> None:
        """Ring all-gather: rank r starts holding blocks[(r + shift) mod n]; each step forwards the block
        just received, so after n-1 steps every rank holds every block, as its owner's exact bytes."""
        r, n = self.rank, self.world
        for s in range(start, n - 1):
            self._step(blocks[(r + shift - s) % n], blocks[(r + shift - s - 1) % n], f"{label} {s}", None, None)

    def _step(self, send: Tensor, recv: Tensor, label: str, combine, scratch: Tensor | None,
              forward: tuple[str, Tensor] | None = None) -> None:  # fmt: skip
        """Send `send` to the next rank and receive the previous rank's matching chunk into `recv`:
        combined into it (reduce) or copied over it (gather), segment by segment. Point-to-point.

        `forward` (label, block): also the next gather step, pipelined: each segment of `recv`, once
        complete, is sealed and sent on to the next rank, and the previous rank's forwarded segments
        arrive into `block`. Every message sealed to a peer is opened there in the same order (the
        nonces are counters): all of this step's segments first, then the forwarded ones.
        """
        nxt, prv = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        recv_parts, send_parts = self._segments(recv), self._segments(send)
        boxes = self._boxes("recv", recv_parts)
        pending = [dist.irecv(b, src=self._global(prv), group=self.group, tag=k) for k, b in enumerate(boxes)]
        if forward is not None:  # tags from _AHEAD on: the two streams never match each other's messages
            ahead, ahead_parts = _AHEAD, self._segments(forward[1])
            ahead_boxes = self._boxes("recv ahead", ahead_parts)
            ahead_pending = [dist.irecv(b, src=self._global(prv), group=self.group, tag=ahead + k) for k, b in enumerate(ahead_boxes)]
            onward = self._boxes("send ahead", recv_parts)
        sends = []
        for k, (part, sealed) in enumerate(zip(send_parts, self._boxes("send", send_parts))):
            self.links[nxt].seal_into(_bytes(part), f"{label} segment {k}", sealed.numpy())
            sends.append(dist.isend(sealed, dst=self._global(nxt), group=self.group, tag=k))
        for k, (req, box, part) in enumerate(zip(pending, boxes, recv_parts)):
            req.wait()
            target = part if combine is None else scratch[: part.numel()]
            if not self.links[prv].open_into(box.numpy(), f"{label} segment {k}", _bytes(target)):
                self._bad = self._bad or (prv, self.rank)  # not combined; everyone learns it in _settle
            elif combine is not None:
                combine(part, target, out=part)
            if forward is not None:  # sent even when bad: the next rank is waiting for it
                self.links[nxt].seal_into(_bytes(part), f"{forward[0]} segment {k}", onward[k].numpy())
                sends.append(dist.isend(onward[k], dst=self._global(nxt), group=self.group, tag=ahead + k))
        if forward is not None:
            for k, (req, box, part) in enumerate(zip(ahead_pending, ahead_boxes, ahead_parts)):
                req.wait()
                if not self.links[prv].open_into(box.numpy(), f"{forward[0]} segment {k}", _bytes(part)):
                    self._bad = self._bad or (prv, self.rank)
        for req in sends:
            req.wait()

    def _settle(self, call: str) -> None:
        """Every rank's verdict on this call, exchanged sealed; raise the same IntegrityError everywhere."""
        verdicts = torch.zeros(self.world, 3, dtype=torch.int64)
        if self._bad is not None:
            verdicts[self.rank] = torch.tensor([1, *self._bad])
        rows = list(verdicts.unbind(0))
        r, n = self.rank, self.world
        for s in range(n - 1):
            before = self._bad
            self._step(rows[(r - s) % n], rows[(r - s - 1) % n], f"{call} verdicts {s}", None, None)
            if self._bad is not None and before is None:  # a verdict itself was changed: that link is named
                rows[(r - s - 1) % n].copy_(torch.tensor([1, *self._bad]))
        bad = [(int(src), int(dst)) for flag, src, dst in verdicts.tolist() if flag] or ([self._bad] if self._bad else [])
        if bad:
            src, dst = bad[0]
            raise IntegrityError(
                f"sealed unify traffic from rank {src} to rank {dst} failed authentication ({call}): bytes were "
                "changed in transit or the sender is not the admitted owner; no unified weight is applied, the run stops"
            )

    def _boxes(self, role: str, parts: list[Tensor]) -> list[Tensor]:
        """Sealed-size byte buffers for these segments, carved from one buffer kept across steps and calls
        (a fresh large allocation per step costs page faults comparable to the cipher itself)."""
        sizes = [p.numel() * p.element_size() + TAG_BYTES for p in parts]
        pool = self._pool.get(role)
        if pool is None or pool.numel() < sum(sizes):
            pool = self._pool[role] = torch.empty(sum(sizes), dtype=torch.uint8)
        return list(pool[: sum(sizes)].split(sizes))

    def _segments(self, chunk: Tensor) -> list[Tensor]:
        per = max(1, self.segment_bytes // chunk.element_size())
        return list(chunk.split(per)) if chunk.numel() else [chunk]

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    @staticmethod
    def _flat(tensor: Tensor) -> Tensor:
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError("the sealed ring works on contiguous CPU tensors (gloo point-to-point)")
        return tensor.view(-1)


def _bytes(t: Tensor) -> np.ndarray:
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    return t.view(-1).view(torch.uint8).numpy()
