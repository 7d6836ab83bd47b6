"""`unify-dist launch [torchrun options] -- train ...`: torch's own launcher, with the program's manners.

Plain torchrun answers a user's mistake with one line per worker, then its own ChildFailedError report
(a traceback of the launcher, some 45 lines) and exit code 1. This wrapper calls the same launcher
(torch.distributed.run, in this process) and adds three things:
  1. the config is loaded and validated before any worker starts: a bad config is one line, exit 2;
  2. the workers hand their last words to the launcher (a file each, in a scratch folder named by
     UNIFY_DIST_ERROR_DIR) instead of printing them, so a mistake every owner agreed on is printed once;
  3. when the workers fail, one line: their shared user error with exit 2, anything else with exit 1.
torchrun's own log lines are kept quiet; UNIFY_DIST_DEBUG=1 shows them and its report.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import tempfile
from pathlib import Path

from unify_dist.errors import UserError

__all__ = ["ERROR_DIR_ENV", "main", "split_argv", "record_last_words"]

ERROR_DIR_ENV = "UNIFY_DIST_ERROR_DIR"
"""Set by the launcher for its workers: where each worker leaves its exit code and its one error line."""

RDZV_DEFAULTS = {"last_call_timeout": "1", "keep_alive_interval": "1", "keep_alive_max_attempt": "3"}
"""torchrun's rendezvous settings that make a dead owner's absence known in seconds (the user's --rdzv-conf wins).

When an owner dies, the survivors' agents leave the old rendezvous round, but a new round opens only once
the dead node is dropped for missing keep_alive_max_attempt heartbeats keep_alive_interval seconds apart
(torchrun: 3 x 5 s); then, with min_nodes present, the round waits last_call_timeout for latecomers
(torchrun: 30 s). Here: 3 x 1 s and 1 s (each agent polls the rendezvous once a second besides). A latecomer
that misses the last call is not lost: it waits, and the running agents restart the group to let it in.
Not 2 x 1 s: a waiting agent heartbeats only between those polls, so on a loaded machine it was dropped from
the wait list again and again and never let in.
"""

USAGE = "write: unify-dist launch --nproc_per_node=2 -- train --config configs/demo_cpu.toml [--set KEY=VALUE]"


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """torchrun's options before '--', the program (`train ...`) after it."""
    if "--" not in argv:
        raise UserError(f"launch needs '--' between torchrun's options and the program; {USAGE}")
    cut = argv.index("--")
    options, program = argv[:cut], argv[cut + 1 :]
    if not program or program[0] != "train":
        raise UserError(f"launch runs 'train' (got {' '.join(program) or 'nothing'} after '--'); {USAGE}")
    return options, program


def record_last_words(code: int, line: str) -> bool:
    """In a launched worker: leave the exit code and the error line for the launcher; False elsewhere."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        return False
    rank = os.environ.get("RANK", "0")
    try:
        Path(folder, f"rank{rank}.txt").write_text(f"{code}\n{line}\n")
    except OSError:
        return False  # the launcher's folder is gone: say it ourselves
    return True


def _torchrun_args(options: list[str], program: list[str]) -> argparse.Namespace:
    """torchrun's own parser, told to run `python -m unify_dist PROGRAM`; bad options are a UserError."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        args, unknown = parser.parse_known_args([*options, "-m", "unify_dist", *program])
    except argparse.ArgumentError as e:
        raise UserError(f"torchrun option problem: {e}; see torchrun --help") from None
    if unknown:
        raise UserError(f"torchrun does not know the option(s) {' '.join(unknown)}; see torchrun --help")
    if args.training_script != "unify_dist" or not args.module:
        raise UserError(f"give only torchrun options before '--' (found '{args.training_script}'); {USAGE}")
    given = dict(kv.split("=", 1) for kv in args.rdzv_conf.split(",") if "=" in kv)
    args.rdzv_conf = ",".join(f"{k}={v}" for k, v in {**RDZV_DEFAULTS, **given}.items())
    return args


def _elastic(nnodes: str) -> bool:
    """--nnodes=MIN:MAX with MIN < MAX: owners may leave and join."""
    low, _, high = nnodes.partition(":")
    return bool(high) and low != high


def _check_program(program: list[str]) -> None:
    """The program's arguments and config, validated here, before any worker starts."""
    from unify_dist.app.config import load_config
    from unify_dist.app.parser import build_parser

    parser = build_parser()
    parser.exit_on_error = False
    try:
        args = parser.parse_args(program)
    except argparse.ArgumentError as e:
        raise UserError(f"{e}; {USAGE}") from None
    load_config(args.config, args.set)


def _quiet_torchrun() -> None:
    """torchrun's log lines (rendezvous, 'closing signal', 'failed (exitcode...)') stay out of the way."""
    if os.environ.get("UNIFY_DIST_DEBUG"):
        return
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logger = logging.getLogger(name)
        logger.propagate = False
        logger.addHandler(logging.NullHandler())


def _last_words(folder: Path) -> dict[int, tuple[int, str]]:
    """Each worker's (exit code, error line), by global rank, as they left them."""
    out = {}
    for f in folder.glob("rank*.txt"):
        code, _, line = f.read_text().partition("\n")
        out[int(f.stem.removeprefix("rank"))] = (int(code), line.strip())
    return out


def _how_it_ended(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def verdict(failures: dict[int, int], first: int, words: dict[int, tuple[int, str]]) -> tuple[int, str]:
    """The launcher's exit code and its one line, from the workers' exit codes and last words.

    The first worker to fail decides: torchrun stops the others (SIGTERM) once one has exited, so
    theirs are consequences. A user error (exit 2) is the same line on every owner: print it once.
    """
    code = failures[first]
    if code == 2 and words.get(first, (0, ""))[0] == 2:
        return 2, words[first][1]
    if first in words:
        return 1, words[first][1]
    said = next((line for c, line in words.values() if c == 2), None)
    if said is not None:  # the first to go said nothing, another owner named a mistake
        return 2, said
    return 1, f"unify-dist: run failed: worker rank {first} {_how_it_ended(code)}; UNIFY_DIST_DEBUG=1 shows torchrun's report"


def launch(options: list[str], program: list[str]) -> tuple[int, str | None]:
    """Validate, run the workers through torch.distributed.run, and judge how they ended."""
    _check_program(program)
    args = _torchrun_args(options, program)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    _quiet_torchrun()
    if _elastic(args.nnodes):  # a fresh store every rendezvous round, or a re-formed group cannot meet (docs/failures.md)
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    with tempfile.TemporaryDirectory(prefix="unify_dist_launch_") as folder:
        os.environ[ERROR_DIR_ENV] = folder  # the workers inherit it
        try:
            run(args)
        except ChildFailedError as e:
            if os.environ.get("UNIFY_DIST_DEBUG"):
                logging.getLogger(__name__).error("%s", e)
            first, _ = e.get_first_failure()
            failures = {rank: f.exitcode for rank, f in e.failures.items()}
            return verdict(failures, first, _last_words(Path(folder)))
        finally:
            os.environ.pop(ERROR_DIR_ENV, None)
    return 0, None


def main(argv: list[str]) -> tuple[int, str | None]:
    """`unify-dist launch ...`: returns the exit code and the one line to print (None: nothing to say)."""
    options, program = split_argv(argv)
    return launch(options, program)
