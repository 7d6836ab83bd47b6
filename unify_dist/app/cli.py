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

from unify_dist.errors import UserError

__all__ = ["main", "say"]


def _train(args: argparse.Namespace, hooks: Sequence[Any] = ()) -> int:
    from unify_dist.app.config import load_config
    from unify_dist.distributed import init_context, shutdown
    from unify_dist.app.loop import run

    cfg = load_config(args.config, args.set)  # validated before any process group exists
    ctx = init_context(cfg.dist)
    try:
        run(cfg, ctx, hooks)
    finally:
        shutdown()
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unify-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train and unify; launch with torchrun, one process per owner")
    train.add_argument("--config", help="TOML config file, e.g. configs/demo_cpu.toml (defaults if omitted)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    train.set_defaults(func=_train)
    report = sub.add_parser("report", help="tables and plots from the metrics.jsonl of one or more runs")
    report.add_argument("run_dirs", nargs="+", help="run directories (or metrics.jsonl files)")
    report.add_argument("--out", default=None, help="where to write report.md and plots (default: the first run's parent)")
    report.set_defaults(func=_report)
    keygen = sub.add_parser("keygen", help="make this owner's Ed25519 identity key for [trust] (private file 0600, .pub beside)")
    keygen.add_argument("--out", required=True, help="private key file to write, e.g. owner.key (never overwritten)")
    keygen.add_argument("--name", default="OWNER", help="this owner's roster name, for the printed roster line")
    keygen.set_defaults(func=_keygen)
    verify = sub.add_parser("verify", help="check a run's signed round records and final.pt offline against the roster")
    verify.add_argument("run_dir", help="the run directory (output.dir: metrics.jsonl and final.pt)")
    verify.add_argument("--roster", required=True, help="the roster.toml the owners ran with ([owners] name = public key)")
    verify.set_defaults(func=_verify)
    launch = sub.add_parser(
        "launch", help="torchrun with one line per failure: unify-dist launch [torchrun options] -- train ...",
    )  # fmt: skip
    launch.add_argument("torchrun_then_program", nargs=argparse.REMAINDER, help="torchrun options, '--', then train ...")
    launch.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None, hooks: Sequence[Any] = ()) -> int:
    """The program; `hooks` act on the unifier each round (experiments and tests: unify_dist.app.loop).

    A failed `train` under torchrun ends its process here, once its line is out and the group is
    left (unify_dist.distributed.end_process): the exit code torchrun reads is the one chosen here.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    code = _main(argv, hooks)
    if code != 0 and argv[:1] == ["train"] and "TORCHELASTIC_RUN_ID" in os.environ:
        from unify_dist.distributed import end_process

        end_process(code)
    return code


def _main(argv: list[str], hooks: Sequence[Any]) -> int:
    try:
        if argv[:1] == ["launch"]:  # before argparse, which would take torchrun's options for its own
            from unify_dist.app.launch import main as launch_main

            code, line = launch_main(argv[1:])
            if line:
                say(line)
            return code
        args = build_parser().parse_args(argv)
        return args.func(args, hooks) if args.func is _train else args.func(args)
    except UserError as e:
        return _last_words(2, f"unify-dist: error: {e}")
    except KeyboardInterrupt:
        return _last_words(130, "unify-dist: interrupted")
    except Exception as e:  # a failed run, not a user mistake: one line, exit 1
        if os.environ.get("UNIFY_DIST_DEBUG"):
            traceback.print_exc()
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank is not None else ""
        return _last_words(1, f"unify-dist: run failed{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _last_words(code: int, line: str) -> int:
    """Say the line, or, in a worker of `unify-dist launch`, leave it to the launcher (which says it once)."""
    from unify_dist.app.launch import record_last_words

    if not record_last_words(code, line.replace("\n", " ")):
        say(line)
    return code


def say(line: str) -> None:
    sys.stderr.write(line.replace("\n", " ") + "\n")  # one write: lines of ranks printing at once stay whole
    sys.stderr.flush()
