"""A process that imported torch once and forks a `python -m MODULE ARGS` run per request (tests.world.cli).

Starting a Python that imports torch, torch._dynamo and torchvision costs 3-5 s of CPU; the suite runs
dozens of single-process CLI runs. This server pays it once per session. Each request gets a child that
takes the caller's environment, working folder, sys.path and argv, writes to the caller's files, runs the
module as `python -m` would (runpy, as __main__) and then leaves the way a fresh interpreter does: its
SystemExit or exception travels up to the top of this file, so the interpreter's teardown (atexit, module
cleanup, C++ destructors: where gloo once aborted) runs in the child as in a real run. Its exit status goes
back to the caller the way subprocess reports it (a negative number for a signal).

It ends when its standard input closes (the session's end). Protocol, one Unix-socket connection per
run: the caller sends one JSON line (module, argv, env, cwd, out, err); it reads back a JSON line with the
child's pid, then one with its returncode.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import runpy
import select
import signal
import socket
import sys

PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "torchvision", "unify_dist", "unify_dist.app.cli",
           "unify_dist.app.loop"]  # fmt: skip


def _read_request(conn: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the caller went away before its request was whole")
        data += chunk
    return json.loads(data)


def _become(request: dict) -> tuple[str, list[str]]:
    """In the child: the caller's environment, folder, paths and output files, as `python -m` would start."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [request["cwd"], *extra, *BASE_PATH]  # python -m: the current folder first, then PYTHONPATH
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["out"]), (2, request["err"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    os.close(null)
    return request["module"], request["argv"]


def _child(conn: socket.socket, listener: socket.socket, request: dict) -> tuple[str, list[str]] | None:
    """Fork the run; in this (reporting) process wait for it and send its status. The run itself returns."""
    pid = os.fork()
    if pid == 0:
        conn.close()
        return _become(request)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    try:
        conn.sendall(json.dumps({"returncode": code}).encode() + b"\n")
    except OSError:  # the caller gave up (its timeout) and killed the run
        pass
    os._exit(0)


def serve(path: str) -> tuple[str, list[str]]:
    """Accept runs until the caller closes the server; return (module, argv) only inside a forked run."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):  # the session ended (or died): so do we
            os._exit(0)
        if listener not in ready:
            continue
        conn, _ = listener.accept()
        request = _read_request(conn)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the reporter: forks the run, waits for it, answers, and ends
            listener.close()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            run = _child(conn, listener, request)
            if run is not None:
                return run
        conn.close()
        while True:  # reap reporters that have answered
            try:
                done, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if done == 0:
                break


if __name__ == "__main__":
    for name in PRELOAD:
        importlib.import_module(name)
    BASE_PATH = [p for p in sys.path[1:]]  # the interpreter's own paths, without this server's folder
    # What is imported now is never garbage: keep the collector (and a run's teardown) from walking it in each
    # fork, which would copy every page of it (1.3 s of CPU per run; 0.4 s frozen).
    gc.freeze()
    module, argv = serve(sys.argv[1])
    # Only a forked run gets here: the rest of this file is its `python -m module argv`.
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
