"""Real process groups for tests: `run_world(fn, world_size, *args)` runs fn(rank, world_size, *args)
in `world_size` new processes joined in a gloo group, and returns each rank's return value.

No collective is mocked: the processes talk through gloo over loopback TCP, as owners would. Each call
starts new processes, forked from a fork server that imported torch once per session (see PRELOAD): a rank
begins with nothing of an earlier test's (no group, no default dtype, no seed, no environment but the test's).
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:port (a rendezvous endpoint is up)."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def process_tree(root: int) -> list[int]:
    """A process and all its descendants, from /proc (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [root], []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def kill_tree(root: int) -> None:
    """SIGKILL a process and all its descendants: an owner's agent and its worker gone at once."""
    for pid in process_tree(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple, env: dict) -> None:
    # A forked rank has the environment the fork server started with: take the test's, as a spawned one would.
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    gc.freeze()  # the fork server's imports are never garbage: a collection need not walk (and copy) them
    torch.set_num_threads(1)
    importlib.import_module("torch._dynamo")  # before the group, as init_context does (an optimizer imports it)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        result: Any = fn(rank, world_size, *args)
    except BaseException as e:  # ship the failure back to the test, with its traceback
        result = RuntimeError(f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    # The result is on disk and the group is gone: skip the interpreter's teardown, where gloo's C++ state can
    # still abort the process (SIGABRT, 'terminate called without an active exception', seen once in CI in
    # test_scaffold after every assertion's data was saved), as unify_dist.distributed.end_process does.
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


# What every rank imports anyway, loaded once into the fork server: each rank is then a fork of a process that
# has torch (and torch._dynamo, as init_context imports it) but never held a group, a thread pool or a test's
# state, instead of a fresh interpreter paying 3-5 s of imports. UNIFY_DIST_TEST_START=spawn restores spawn.
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "torchvision", "unify_dist", "unify_dist.app.loop",
           "tests.world"]  # fmt: skip
START_METHOD = os.environ.get("UNIFY_DIST_TEST_START", "forkserver")
if START_METHOD == "forkserver":
    mp.set_forkserver_preload(PRELOAD)


def run_world(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Run fn(rank, world_size, *args) on every rank of a fresh gloo group; re-raise any rank's error."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world_size, free_port(), out_dir, fn, args, dict(os.environ)),
                           nprocs=world_size, join=True, start_method=START_METHOD)  # fmt: skip
        results = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    for r in results:
        if isinstance(r, RuntimeError) and str(r).startswith("rank "):
            raise r
    return results


def torchrun(
    cli_args: list[str],
    nproc: int = 2,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    extra: list[str] | None = None,
    module: str = "unify_dist",
):
    """Run `torchrun --standalone --nproc_per_node=N -m MODULE CLI_ARGS` as a subprocess; return it completed."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *(extra or [])]
    cmd += ["-m", module, *cli_args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def cli(cli_args: list[str], timeout: float = 120, env: dict[str, str] | None = None, module: str = "unify_dist",
        fresh: bool = False):
    """Run `python -m MODULE CLI_ARGS` in one process (no torchrun); return it completed.

    The process is forked from tests.zygote, which imported torch once for the session, and leaves through
    the interpreter's teardown as a real run does. fresh=True starts a new interpreter instead: for a test
    about what start-up imports or how long it takes.
    """
    import subprocess
    import sys

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", module, *cli_args]
    if fresh or os.environ.get("UNIFY_DIST_TEST_START") == "spawn":
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        request = {"module": module, "argv": list(cli_args), "env": full_env, "cwd": os.getcwd(),
                   "out": str(out), "err": str(err)}  # fmt: skip
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(_zygote())
            conn.sendall(json.dumps(request).encode() + b"\n")
            conn.settimeout(timeout)
            answers = conn.makefile("r")
            pid = json.loads(answers.readline())["pid"]
            try:
                line = answers.readline()
            except TimeoutError:
                line = ""
            if not line:  # timed out (or the reporter died): end the run as subprocess.run would
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                said = out.read_text(errors="replace"), err.read_text(errors="replace")
                raise subprocess.TimeoutExpired(cmd, timeout, *said)
            code = json.loads(line)["returncode"]
        return subprocess.CompletedProcess(cmd, code, out.read_text(errors="replace"), err.read_text(errors="replace"))


def cli_world(cli_args: list[str], nproc: int, timeout: float = 300,
              env: dict[str, str] | list[dict[str, str]] | None = None, module: str = "unify_dist",
              extra: list[list[str]] | None = None) -> list:
    """Run `python -m MODULE CLI_ARGS` as `nproc` ranks of one real gloo group, without torchrun; return each
    rank's completed process, by rank.

    Each rank is a `cli` run (forked from tests.zygote, so no interpreter start-up) given the environment that
    `torchrun --standalone --nproc_per_node=N` gives its workers and that the program reads (RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT, TORCHELASTIC_RUN_ID: it ends as a torchrun worker does).
    For tests about the program on several owners, not about torchrun's agent (restarts, rendezvous,
    its failure report): those keep `torchrun`. `env`: extra environment for every rank, or a list, one per
    rank; `extra`: more arguments, one list per rank.
    """
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()

    def rank_env(rank: int) -> dict[str, str]:
        extra = env[rank] if isinstance(env, list) else env or {}
        return {**extra, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "TORCHELASTIC_RUN_ID": "cli_world"}  # fmt: skip

    with ThreadPoolExecutor(max_workers=nproc) as pool:
        return list(pool.map(lambda r: cli([*cli_args, *(extra[r] if extra else [])], timeout=timeout, env=rank_env(r),
                                           module=module), range(nproc)))  # fmt: skip


def merged(ranks: list) -> Any:
    """cli_world's ranks as one completed process, as torchrun reports them: the first failing rank's code
    (0 when all succeeded), and every rank's output in rank order."""
    import subprocess

    code = next((p.returncode for p in ranks if p.returncode != 0), 0)
    return subprocess.CompletedProcess(ranks[0].args, code, "".join(p.stdout for p in ranks),
                                       "".join(p.stderr for p in ranks))  # fmt: skip


_ZYGOTE: dict[str, Any] = {}
_ZYGOTE_LOCK = threading.Lock()


def _zygote() -> str:
    """The socket of this session's tests.zygote, started on first use (again if it died); ended at exit."""
    with _ZYGOTE_LOCK:  # cli runs may start from several threads at once (test_bad_input)
        proc = _ZYGOTE.get("proc")
        if proc is None or proc.poll() is not None:
            _start_zygote()
        return _ZYGOTE["path"]


def _start_zygote() -> None:
    import atexit
    import subprocess

    folder = tempfile.mkdtemp(prefix="unify-dist-zygote-")
    path = os.path.join(folder, "socket")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # read once, when the OpenMP runtime loads with torch
    proc = subprocess.Popen([sys.executable, "-m", "tests.zygote", path], cwd=root, env=env, stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True)  # fmt: skip: it ends when this pipe closes
    ready = proc.stdout.readline()
    if ready.strip() != "ready":
        raise RuntimeError(f"tests.zygote did not start (exit {proc.wait()})")
    if not _ZYGOTE:
        atexit.register(_stop_zygote)
    _ZYGOTE.update(proc=proc, path=path, folder=folder)


def _stop_zygote() -> None:
    import shutil

    proc = _ZYGOTE.get("proc")
    if proc is not None and proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=30)
    shutil.rmtree(_ZYGOTE.get("folder", ""), ignore_errors=True)
