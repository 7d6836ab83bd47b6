"""Command line: `unify-dist train|report|keygen|verify|launch ...` (also `python -m unify_dist ...`).

A user's mistake (UserError) becomes one line on stderr and exit code 2; a run that fails for other
reasons (a dead owner, a timeout, diverging weights) becomes one line and exit code 1. Set
UNIFY_DIST_DEBUG=1 to see the traceback as well. `launch` wraps torchrun so that a whole group of
owners answers a mistake with one line too (unify_dist.app.launch).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from unify_dist.app.parser import build_parser
from unify_dist.errors import UserError
from unify_dist.watch import PeerGone

__all__ = ["main", "program", "say"]


def _train(args: argparse.Namespace, hooks: Sequence[Any] = ()) -> int:
    from unify_dist.app.config import load_config
    from unify_dist.distributed import init_context, leave
    from unify_dist.app.loop import run

    cfg = load_config(args.config, args.set)  # validated before any process group exists
    ctx = init_context(cfg.dist)
    finished = False
    try:
        run(cfg, ctx, hooks)
        finished = True
    finally:
        leave(ctx, finished)  # peers learn this is an orderly exit, not a death
    return 0


def _report(args: argparse.Namespace) -> int:
    from unify_dist.app.report import main as report_main

    return report_main(args.run_dirs, args.out)


def _keygen(args: argparse.Namespace) -> int:
    from unify_dist.trust.identity import generate_key

    public, text = generate_key(args.out)
    print(f"wrote {args.out} (private identity key, mode 0600: keep it) and {public} (public)")
    print(f"roster line for every owner's [owners] table: {args.name} = \"{text}\"")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from unify_dist.app.audit import main as verify_main

    return verify_main(args.run_dir, args.roster)


_COMMANDS = {"report": _report, "keygen": _keygen, "verify": _verify}  # train takes the hooks too; launch is handled before argparse


def main(argv: list[str] | None = None, hooks: Sequence[Any] = ()) -> int:
    """The program; `hooks` act on the unifier each round (experiments and tests: unify_dist.app.loop).

    A failed `train` under torchrun ends its process here, once its line is out and the group is
    left (unify_dist.distributed.end_process): the exit code torchrun reads is the one chosen here.
    A finished one returns (a caller may have more to save); `program` ends it.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    code = _main(argv, hooks)
    if code != 0 and _torchrun_worker(argv):
        from unify_dist.distributed import end_process

        end_process(code)
    return code


def program() -> int:
    """The command line (`unify-dist ...`, `python -m unify_dist ...`): `main`, then a worker's clean end.

    A torchrun worker of `train` that finished has saved its files and left the group by now: it ends
    here, streams flushed, without the interpreter's teardown, as a failed one does, so no late abort
    in gloo's or torch's C++ teardown (SIGABRT) can turn the exit code 0 torchrun reads into a failure.
    """
    code = main()
    if _torchrun_worker(sys.argv[1:]):
        from unify_dist.distributed import end_process

        end_process(code)
    return code


def _torchrun_worker(argv: list[str]) -> bool:
    return argv[:1] == ["train"] and "TORCHELASTIC_RUN_ID" in os.environ


def _main(argv: list[str], hooks: Sequence[Any]) -> int:
    try:
        if argv[:1] == ["launch"]:  # before argparse, which would take torchrun's options for its own
            from unify_dist.app.launch import main as launch_main

            code, line = launch_main(argv[1:])
            if line:
                say(line)
            return code
        args = build_parser().parse_args(argv)
        return _train(args, hooks) if args.command == "train" else _COMMANDS[args.command](args)
    except UserError as e:
        return _last_words(2, f"unify-dist: error: {e}")
    except KeyboardInterrupt:
        return _last_words(130, "unify-dist: interrupted")
    except Exception as e:  # a failed run, not a user mistake: one line, exit 1
        return _failed(e)
    except PeerGone as e:  # a peer died (it can interrupt the main thread anywhere, so it is no Exception)
        return _failed(e)


def _failed(e: BaseException) -> int:
    if os.environ.get("UNIFY_DIST_DEBUG"):
        traceback.print_exc()
    e = _peer_gone_behind(e)
    rank = os.environ.get("RANK")
    where = f" (rank {rank})" if rank is not None else ""
    return _last_words(1, f"unify-dist: run failed{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _peer_gone_behind(e: BaseException) -> BaseException:
    """The PeerGone that `e` was raised while handling, if any, else `e`.

    A death interrupts the main thread anywhere: inside torch.save, say, whose clean-up then fails with an
    error of its own ('unexpected pos 64 vs 0'). The death is what happened; that error is its echo.
    """
    seen, link = 0, e
    while link is not None and seen < 20:
        if isinstance(link, PeerGone):
            return link
        link, seen = link.__cause__ or link.__context__, seen + 1
    return e


def _last_words(code: int, line: str) -> int:
    """Say the line, or, in a worker of `unify-dist launch`, leave it to the launcher (which says it once).

    A failed run that torchrun may restart (--max-restarts, elastic owners) is said here too: the launcher
    speaks only when the last attempt fails, and 'owner cai is gone' must not vanish in a restart.
    """
    from unify_dist.app.launch import record_last_words

    recorded = record_last_words(code, line.replace("\n", " "))
    if not recorded or (code == 1 and os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0"):
        say(line)
    return code


def say(line: str) -> None:
    sys.stderr.write(line.replace("\n", " ") + "\n")  # one write: lines of ranks printing at once stay whole
    sys.stderr.flush()
