"""Metadata between owners as typed tensors, decoded by our own parsers: never a pickle from the network.

torch.distributed's `all_gather_object` / `broadcast_object_list` run `pickle.loads` on whatever arrives,
so anyone who can put bytes into a gloo stream runs code on every owner. Here a message crosses as a
length (one int64 per rank), checked against a cap, then as padded uint8 bytes; JSON messages are
decoded with `json.loads` and checked for the type the caller expects. A message that is over its cap
or does not parse raises WireError, naming the sender's rank.

Every function takes `group=None` (WORLD) and `reducer=None`: with a reducer (unify_dist.trust.SealedRing,
or HostStaged around one) every byte travels through it, so with trust on metadata is sealed and
authenticated like the weights. A broadcast through a reducer is a SUM of the source's bytes and
everyone else's zeros: exactly the source's bytes, on every rank.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["MAX_BYTES", "WireError", "broadcast_bytes", "broadcast_tensor", "gather_bytes", "gather_floats", "gather_json"]

MAX_BYTES = 16 << 20
"""Default cap of one rank's message: a length past it is refused before any buffer is allocated."""


class WireError(RuntimeError):
    """A peer's message is over its cap or does not parse: changed on the way, or sent by a broken peer."""


def gather_bytes(mine: bytes, group: dist.ProcessGroup | None = None, reducer=None, *, limit: int = MAX_BYTES,
                 what: str = "message") -> list[bytes]:  # fmt: skip
    """Every rank's byte string, on every rank: an all_gather of lengths, then of padded uint8. A collective.

    A length over `limit` raises WireError on every rank that sees it (an honest rank's own long message
    included: it is sent as a length, so nobody is left waiting).
    """
    world = dist.get_world_size(group)
    device = _device(group, reducer)
    lengths = _gather(torch.tensor([len(mine)], dtype=torch.int64, device=device), world, group, reducer)  # collective
    sizes = [int(t) for t in lengths]
    bad = [(r, n) for r, n in enumerate(sizes) if not 0 <= n <= limit]
    if bad:
        rank, n = bad[0]
        raise WireError(f"{what} from rank {rank} claims {n} bytes, outside 0..{limit}; a peer is broken or the bytes "
                        "were changed on the way (set [trust] to seal them)")  # fmt: skip
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    if mine:
        padded[: len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
    rows = _gather(padded.to(device), world, group, reducer)  # collective
    return [bytes(row[:n].cpu().numpy().tobytes()) for row, n in zip(rows, sizes)]


def gather_json(value: Any, group: dist.ProcessGroup | None = None, reducer=None, *, limit: int = MAX_BYTES,
                what: str = "message") -> list[Any]:  # fmt: skip
    """Every rank's JSON-able value (None, bool, numbers, str, lists, str-keyed dicts), on every rank.

    A collective. Tuples come back as lists and dict keys as strings: compare decoded values with decoded
    values. A message that is not UTF-8 JSON raises WireError naming its rank.
    """
    raw = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    return [_parse(b, r, what) for r, b in enumerate(gather_bytes(raw, group, reducer, limit=limit, what=what))]


def broadcast_bytes(mine: bytes | None, src: int = 0, group: dist.ProcessGroup | None = None, reducer=None, *,
                    limit: int = MAX_BYTES, what: str = "message") -> bytes:  # fmt: skip
    """Rank `src`'s bytes (group rank; others pass None or anything), on every rank. A collective."""
    device = _device(group, reducer)
    is_src = dist.get_rank(group) == src
    mine = (mine or b"") if is_src else b""
    size = torch.tensor([len(mine)], dtype=torch.int64, device=device)
    _broadcast(size, src, group, reducer)  # collective
    n = int(size)
    if not 0 <= n <= limit:
        raise WireError(f"{what} from rank {src} claims {n} bytes, outside 0..{limit}; a peer is broken or the bytes "
                        "were changed on the way (set [trust] to seal them)")  # fmt: skip
    buffer = torch.zeros(n, dtype=torch.uint8)
    if is_src and n:
        buffer.copy_(torch.frombuffer(bytearray(mine), dtype=torch.uint8))
    buffer = buffer.to(device)
    _broadcast(buffer, src, group, reducer)  # collective
    return bytes(buffer.cpu().numpy().tobytes())


def broadcast_tensor(tensor: Tensor, src: int = 0, group: dist.ProcessGroup | None = None, reducer=None) -> None:
    """tensor <- rank `src`'s tensor (group rank; contiguous, same shape and dtype everywhere). A collective.

    Through a reducer it is a SUM of the source's bytes and zeros: integer addition of bytes, so the
    result is the source's exact bits, whatever the dtype (NaN payloads and signed zeros included).
    """
    _broadcast(tensor, src, group, reducer)


def gather_floats(values: list[float], group: dist.ProcessGroup | None = None, reducer=None) -> list[list[float]]:
    """Every rank's float vector (the same length on every rank), on every rank, as float64. A collective."""
    mine = torch.tensor(values, dtype=torch.float64, device=_device(group, reducer))
    return [t.tolist() for t in _gather(mine, dist.get_world_size(group), group, reducer)]


def _gather(mine: Tensor, world: int, group: dist.ProcessGroup | None, reducer) -> list[Tensor]:
    out = [torch.empty_like(mine) for _ in range(world)]
    if reducer is None:
        dist.all_gather(out, mine, group=group)  # collective
    else:
        reducer.all_gather(out, mine)  # collective, sealed
    return out


def _broadcast(tensor: Tensor, src: int, group: dist.ProcessGroup | None, reducer) -> None:
    if reducer is None:
        dist.broadcast(tensor, src=src if group is None else dist.get_global_rank(group, src), group=group)  # collective
        return
    raw = tensor.view(-1).view(torch.uint8)
    if dist.get_rank(group) != src:
        raw.zero_()
    reducer.all_reduce(raw)  # collective, sealed: the source's bytes plus zeros, added as bytes


def _device(group: dist.ProcessGroup | None, reducer) -> torch.device:
    """Where the collective takes its tensors: host memory, or the current GPU for NCCL's own collectives."""
    if reducer is None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _parse(raw: bytes, rank: int, what: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WireError(f"{what} from rank {rank} is not valid JSON ({type(e).__name__}: {str(e)[:80]}); a peer is "
                        "broken or the bytes were changed on the way (set [trust] to seal them)") from None  # fmt: skip
