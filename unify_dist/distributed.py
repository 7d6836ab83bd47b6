"""Process-group set-up, read once from the environment torchrun provides, and small agreement helpers.

Only `init_context` reads RANK / WORLD_SIZE / LOCAL_RANK. Everything else receives the frozen Context.
Without torchrun (no WORLD_SIZE), a one-owner group is made in-process so the same code path runs.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from unify_dist.config import DistConfig
from unify_dist.errors import UserError
from unify_dist.watch import FAILED, DONE, PeerGone, Watch
from unify_dist.wire import gather_floats, gather_json

__all__ = [
    "Context", "init_context", "shutdown", "leave", "end_process", "agree", "stage", "CollectiveTimeout", "PeerGone",
    "PeerStopped", "all_gather_floats",
]  # fmt: skip


@dataclass(frozen=True)
class Context:
    """Who this process is in the group of owners, and where it computes."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    timeout_s: float
    watch: Watch | None = None
    """This rank's connections to every peer (torchrun groups of two or more): who is gone, at once."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def wire_device(self) -> torch.device:
        """Where the group's collectives take their tensors: the GPU with NCCL, else host memory."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within dist.timeout_s: some owner stopped answering."""


class PeerStopped(RuntimeError):
    """Another owner stopped with its own error (which its own line names); this one cannot go on without it."""


def _pick_backend(requested: str) -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise UserError("dist.backend = 'nccl' needs CUDA, which this machine lacks; use --set dist.backend=gloo")
    return requested


def init_context(cfg: DistConfig) -> Context:
    """Join the group torchrun describes (or make a group of one) and pick this rank's device."""
    backend = _pick_backend(cfg.backend)
    env = os.environ
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", 0))
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs: "
                "use --nproc_per_node no larger than the GPU count"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif cfg.device == "cuda":  # gloo between owners, training on this machine's GPU (owners here may share it)
        if not torch.cuda.is_available():
            raise UserError("dist.device = 'cuda' but this machine has no usable GPU; use --set dist.device=cpu")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = timedelta(seconds=cfg.timeout_s)
    # torchvision (datasets, models) imports torch._dynamo. Imported after the group exists, it starts
    # gloo threads that destroy_process_group cannot stop, and at exit they could abort the process
    # (SIGABRT, 'terminate called without an active exception') after it had said why it stopped.
    # Every entry point that builds its group here (the program, the DDP baseline) is safe.
    importlib.import_module("torch._dynamo")  # (a plain import here would make `torch` a local name)
    watch = None
    if not dist.is_initialized():
        if "WORLD_SIZE" in env:
            kw = {"device_id": device} if backend == "nccl" else {}
            store = _attempt_store(timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **kw)
            if world > 1:
                master = (env["MASTER_ADDR"], int(env["MASTER_PORT"]))
                # gloo's own choice of interface, when the user made one: the watch listens there too
                interface = env.get("GLOO_SOCKET_IFNAME", "").split(",")[0] or None
                watch = Watch(rank, world, store, *master, cfg.timeout_s, interface=interface)
                watch.arm()  # from here on, a peer's death stops this owner at once
        else:  # one owner, no launcher: an in-process store keeps every collective call valid
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return Context(rank, world, local_rank, local_world, device, backend, cfg.timeout_s, watch)


def _attempt_store(timeout: timedelta) -> dist.Store:
    """The launcher's store, under a prefix unique to this restart attempt (torchrun --max-restarts).

    Elastic runs (owners leave and join: --nnodes=MIN:MAX) must set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on
    every agent, so that each rendezvous round gets a store of its own.

    torchrun keeps one store for all attempts; without the prefix, a restarted group can read the dead
    group's addresses from it and fail to connect ("Connection refused") instead of resuming.
    """
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (elastic runs): a fresh store every rendezvous round, and agents
        # that joined at different times count restarts differently, so no prefix may depend on that count
        return store
    return dist.PrefixStore(f"unify_dist/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown() -> None:
    """Leave the process group now, while the interpreter is whole, and never raise.

    Destroyed here, gloo's threads are joined and its pending work freed in order. Left to the
    interpreter's teardown, they can abort the process (SIGABRT, 'terminate called without an active
    exception') after it has already said why it stops. When a peer has already exited (the usual
    case after a failure every owner agreed on), the destroy itself may fail: that must not replace
    the error the user needs to see.
    """
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def leave(ctx: Context, finished: bool) -> None:
    """Tell every peer this owner leaves (finished, or failed with its own error), then leave the group.

    Said first, so that no peer takes this orderly exit for a death; never raises.
    """
    if ctx.watch is not None:
        ctx.watch.close(DONE if finished else FAILED)
    shutdown()


def end_process(code: int) -> NoReturn:
    """Exit with `code` right now: streams flushed, interpreter teardown and C++ static destructors skipped.

    For a worker that has said why it fails and left the group: nothing it still holds (the dataset,
    the model, torch's thread pools) needs a teardown, and skipping it means no late abort can turn
    the exit code the launcher reads into anything else.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


@contextlib.contextmanager
def stage(name: str, ctx: Context) -> Iterator[None]:
    """Name the collective step, so a failure says where every rank was and what happened.

    A peer whose connection closed is named as gone (not as a timeout); one that stopped with its own
    error is named as such; only a peer alive but silent for dist.timeout_s is a CollectiveTimeout.
    """
    began = time.monotonic()
    if ctx.watch is not None:
        ctx.watch.doing = name
        ctx.watch.inside += 1
    try:
        yield
    except RuntimeError as e:
        text = str(e).lower()
        closed = any(w in text for w in ("connection closed", "connection reset", "broken pipe", "connection refused"))
        timed_out = "timeout" in text or "timed out" in text
        if not (closed or timed_out):
            raise
        cause = str(e).splitlines()[0][:160]
        if ctx.watch is not None:
            if closed:  # gloo can see the closed connection a moment before the watch thread does
                ctx.watch.wait_for_news(2.0)
            dead = ctx.watch.gone()
            if dead:
                t = (dead[0].closed_at or began) - began
                where = f"{t:.1f} s into collective '{name}'" if t >= 0 else f"{-t:.1f} s before collective '{name}' began"
                raise PeerGone(ctx.watch.describe(where)) from e
            stopped = ctx.watch.failed() if closed else []  # a timeout of our own stays a timeout
            if stopped:
                raise PeerStopped(
                    f"rank {ctx.rank}: {ctx.watch.name(stopped[0].rank)} stopped with its own error (its line says "
                    f"why), so collective '{name}' failed after {time.monotonic() - began:.1f} s"
                ) from e
        if closed:
            raise PeerGone(
                f"rank {ctx.rank}: a peer's connection closed during collective '{name}', which failed after "
                f"{time.monotonic() - began:.1f} s: another owner's process ended or its machine went away ({cause})"
            ) from e
        raise CollectiveTimeout(
            f"rank {ctx.rank}: collective '{name}' failed after waiting up to dist.timeout_s = "
            f"{ctx.timeout_s:g}s: another owner stopped answering ({cause})"
        ) from e
    finally:
        if ctx.watch is not None:
            ctx.watch.inside -= 1
    if ctx.watch is not None and ctx.watch.gone():  # died as the collective completed: stop now, not at the next one
        raise PeerGone(ctx.watch.describe(f"as collective '{name}' completed"))


def all_gather_floats(values: list[float], ctx: Context) -> list[list[float]]:
    """Every rank's small float vector, on every rank (one all_gather of len(values) doubles)."""
    mine = torch.tensor(values, dtype=torch.float64, device=ctx.wire_device)
    out = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]  # host sync: these figures go to the table and the JSONL


def agree(error: str | None, ctx: Context, what: str, reducer=None) -> None:
    """Raise the same UserError on every rank if any rank failed `what`: the failing owner's own message.

    Every rank must call this (it is a collective): a failure seen by one owner must stop all of them,
    not leave the others waiting in the next collective until the timeout. Every rank raises the same
    words, so a launcher can print one line for the whole group. With `reducer` (trust on: the sealed
    ring) the flags and the words travel sealed; the words are UTF-8 JSON, never a pickle.
    """
    mine = [0.0 if error is None else 1.0]
    flags = all_gather_floats(mine, ctx) if reducer is None else gather_floats(mine, reducer=reducer)  # collective
    failed = [r for r, (f,) in enumerate(flags) if f]
    if not failed:
        return
    # collective, only on failure: the words travel, once, capped (a message is one line, not a file)
    messages = gather_json(error, reducer=reducer, limit=64 << 10, what=f"the error message of {what}")
    said = messages[failed[0]]
    first = said if isinstance(said, str) and said else f"{what} failed"
    also = f" (owner(s) {failed[1:]} failed {what} too)" if len(failed) > 1 else ""
    raise UserError(first + also)
