"""GPU owners, host-side unification: every unify collective runs on pinned host copies of GPU tensors.

An owner may train on its GPU while the owners meet over gloo (NCCL across NAT and WAN links is
fragile), and with trust on the sealed ring seals host bytes only. `HostStaged` is a reducer for
Collective (the same `all_reduce(tensor, op)` / `all_gather(out, tensor)` as a SealedRing): it copies a
GPU tensor into a pinned host buffer, runs the inner reducer (the sealed ring) or gloo's collective on
it, and copies the result back. Host tensors pass straight through. The buffers are kept across calls,
so a round costs two copies over PCIe, not an allocation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from unify_dist import exchange

__all__ = ["HostStaged"]


class HostStaged:
    """Stage GPU tensors through pinned host memory around `inner` (None: gloo's collectives on `group`)."""

    def __init__(self, inner=None, group: dist.ProcessGroup | None = None):
        self.inner, self.group = inner, group
        self._pool: dict[tuple[str, torch.dtype], Tensor] = {}

    @property
    def pair_secrets(self):
        """The inner reducer's pair secrets (trust on); None: secure_avg exchanges its own."""
        return getattr(self.inner, "pair_secrets", None)

    @property
    def admission(self):
        return getattr(self.inner, "admission", None)

    def all_reduce(self, tensor: Tensor, op=dist.ReduceOp.SUM) -> None:
        """tensor <- the reduction over ranks (a collective), through host memory if it lives on a GPU."""
        if tensor.device.type == "cpu":
            self._all_reduce(tensor, op)
            return
        host = self._host("reduce", tensor)
        self._all_reduce(host, op)
        tensor.copy_(host.view_as(tensor), non_blocking=True)  # the next call's copy-in waits for it (one stream)

    def all_gather(self, out: list[Tensor], tensor: Tensor) -> None:
        """out[i] <- rank i's `tensor`, on every rank (a collective)."""
        if tensor.device.type == "cpu" and all(t.device.type == "cpu" for t in out):
            self._all_gather(out, tensor)
            return
        mine = self._host("mine", tensor)
        rows = self._buffer("rows", len(out) * tensor.numel(), tensor.dtype).view(len(out), -1).unbind(0)
        self._all_gather(list(rows), mine)
        for t, row in zip(out, rows):
            t.copy_(row.view_as(t), non_blocking=True)

    def _all_reduce(self, host: Tensor, op) -> None:
        if self.inner is None:
            dist.all_reduce(host, op, group=self.group)
        else:
            self.inner.all_reduce(host, op)

    def _all_gather(self, out: list[Tensor], host: Tensor) -> None:
        if self.inner is None:
            exchange.all_gather(out, host, self.group)  # receives first: a slow link runs both ways at once
        else:
            self.inner.all_gather(out, host)

    def _host(self, role: str, tensor: Tensor) -> Tensor:
        """A pinned host copy of `tensor`, flat, complete when this returns."""
        host = self._buffer(role, tensor.numel(), tensor.dtype)
        host.copy_(tensor.reshape(-1), non_blocking=True)
        torch.cuda.current_stream(tensor.device).synchronize()  # the bytes must be there before gloo reads them
        return host

    def _buffer(self, role: str, numel: int, dtype: torch.dtype) -> Tensor:
        pool = self._pool.get((role, dtype))
        if pool is None or pool.numel() < numel:
            pool = self._pool[(role, dtype)] = torch.empty(numel, dtype=dtype, pin_memory=torch.cuda.is_available())
        return pool[:numel]
