"""Unified tensors in float dtypes narrower than the main buffer (bf16, fp16): one buffer per dtype.

A pretrained model often loads in bf16 with some fp32 tensors (norms, a new head). Each narrow dtype's
unified tensors live in their own flat buffer (unify_dist.flat.FlatState.narrow), keep their dtype, and
are unified after the main collective: every owner's raw bytes are gathered chunk by chunk, widened to
fp32 (the rule's arithmetic in fp32, not in 8 mantissa bits), combined by the rule's pure reference over
the healthy owners in rank order, and rounded back once. Every rank runs the same operations on the same
bytes, so every owner ends with the same bits; max and absmax pick one owner's value, which rounds back
to itself exactly.

Bytes: (owners - 1) x 2 bytes per element leave each owner (a gather), the bytes of a 16-bit all_reduce
at 2 owners; a 16-bit all_reduce would round at every hop instead.
"""

from __future__ import annotations

from collections.abc import Callable

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
    left out, as on the main path. A collective: one small all_gather of the owners' weights, then one
    all_gather per chunk of each buffer.
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
    for buffer in flat.narrow.values():
        _unify_buffer(core, buffer, combine, weights, healthy)


def _unify_buffer(core: Collective, buffer: Tensor, combine, weights: Tensor, healthy: list[int]) -> None:
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
