"""Command line: `unify-dist train|report ...` (also `python -m unify_dist ...`).

A user's mistake (UserError) becomes one line on stderr and exit code 2; a run that fails for other
reasons (a dead owner, a timeout, diverging weights) becomes one line and exit code 1. Set
UNIFY_DIST_DEBUG=1 to see the traceback as well.
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
    return parser


def main(argv: list[str] | None = None, hooks: Sequence[Any] = ()) -> int:
    """The program; `hooks` act on the unifier each round (experiments and tests: unify_dist.app.loop)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, hooks) if args.func is _train else args.func(args)
    except UserError as e:
        say(f"unify-dist: error: {e}")
        return 2
    except KeyboardInterrupt:
        say("unify-dist: interrupted")
        return 130
    except Exception as e:  # a failed run, not a user mistake: one line, exit 1
        if os.environ.get("UNIFY_DIST_DEBUG"):
            traceback.print_exc()
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank is not None else ""
        say(f"unify-dist: run failed{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return 1


def say(line: str) -> None:
    sys.stderr.write(line.replace("\n", " ") + "\n")  # one write: lines of ranks printing at once stay whole
    sys.stderr.flush()
