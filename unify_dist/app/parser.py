"""The program's command line, as argparse sees it: `unify-dist train|report|keygen|verify|launch ...`.

A layer beneath both the CLI (which runs what the parser names) and the launcher (which checks a worker's
arguments before starting it), so neither has to import the other for it.
"""

from __future__ import annotations

import argparse

__all__ = ["build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The parser; `args.command` names the subcommand (the CLI maps it to what runs)."""
    parser = argparse.ArgumentParser(prog="unify-dist", description="Command line: `unify-dist train|report|launch ...`")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train and unify; launch with torchrun, one process per owner")
    train.add_argument("--config", help="TOML config file, e.g. configs/demo_cpu.toml (defaults if omitted)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    report = sub.add_parser("report", help="tables and plots from the metrics.jsonl of one or more runs")
    report.add_argument("run_dirs", nargs="+", help="run directories (or metrics.jsonl files)")
    report.add_argument("--out", default=None, help="where to write report.md and plots (default: the first run's parent)")
    keygen = sub.add_parser("keygen", help="make this owner's Ed25519 identity key for [trust] (private file 0600, .pub beside)")
    keygen.add_argument("--out", required=True, help="private key file to write, e.g. owner.key (never overwritten)")
    keygen.add_argument("--name", default="OWNER", help="this owner's roster name, for the printed roster line")
    verify = sub.add_parser("verify", help="check a run's signed round records and final.pt offline against the roster")
    verify.add_argument("run_dir", help="the run directory (output.dir: metrics.jsonl and final.pt)")
    verify.add_argument("--roster", required=True, help="the roster.toml the owners ran with ([owners] name = public key)")
    launch = sub.add_parser(
        "launch", help="torchrun with one line per failure: unify-dist launch [torchrun options] -- train ...",
    )  # fmt: skip
    launch.add_argument("torchrun_then_program", nargs=argparse.REMAINDER, help="torchrun options, '--', then train ...")
    return parser
