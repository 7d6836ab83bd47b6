"""Reproduce the paper's tables: V and H environments, avg/max/absmax, plus a centralised baseline each.

    python -m experiments.reproduce --rounds 30 --out results      # what `make reproduce` runs

Every run is a real `unify-dist train` subprocess (2 owners through torchrun; the baseline is one
process holding all the training data), run one after another, then `unify-dist report` over them.
An interrupted reproduction continues where it stopped: each run resumes from its checkpoints
(--fresh starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from unify_dist.app import report
from unify_dist.errors import UserError

__all__ = ["Job", "plan", "main"]

ENVS = {"v": "configs/paper_v.toml", "h": "configs/paper_h.toml"}
"""Environment letter -> config; the config's `name` (paper_v, paper_h) is what the report groups by."""


@dataclass(frozen=True)
class Job:
    """One training run: what it is (for progress lines) and the command that runs it."""

    label: str
    out_dir: Path
    command: list[str]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30, help="rounds per run (the paper's tables: 30)")
    p.add_argument("--envs", default="v,h", help="environments, comma-separated: v (IID), h (label split)")
    p.add_argument("--rules", default="avg,max,absmax", help="unify rules, comma-separated")
    p.add_argument("--side-by-side", action="store_true", help="one run per environment, all rules evaluated")
    p.add_argument("--train-per-owner", type=int, default=0, help="cap on each owner's training images (0: all)")
    p.add_argument("--nproc", type=int, default=2, help="owners (processes) per run")
    p.add_argument("--backend", default="auto", help="auto, gloo or nccl (GPU machines: nccl, --nproc = GPUs)")
    p.add_argument("--no-baseline", action="store_true", help="skip the centralised one-owner runs")
    p.add_argument("--fresh", action="store_true", help="start every run over instead of resuming its checkpoints")
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    p.add_argument("--out", default="results", help="parent folder of the run directories and of report.md")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config value for every run, e.g. model.channels_last=false")  # fmt: skip
    return p


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _check(args: argparse.Namespace) -> None:
    """Collect every bad option into one UserError before any run starts."""
    from unify_dist.rules import RULES

    envs, rules = _names(args.envs), _names(args.rules)
    problems = [f"--envs: '{e}' is not known; choose from {', '.join(ENVS)}" for e in envs if e not in ENVS]
    problems += [f"--rules: '{r}' is not known; choose from {', '.join(RULES)}" for r in rules if r not in RULES]
    if not envs or not rules:
        problems.append("--envs and --rules each need at least one name")
    if args.rounds < 1 or args.nproc < 2 or args.train_per_owner < 0:
        problems.append("--rounds must be >= 1, --nproc >= 2 (the baseline is the 1-owner run), --train-per-owner >= 0")
    if problems:
        raise UserError("; ".join(problems))


def _train(config: str, sets: list[str], nproc: int) -> list[str]:
    """`unify-dist train` under torchrun for nproc owners, or as one plain process for the baseline."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    # runs with a hostile owner go through the attack hook's entry point (benchmarks.attack), others the program
    module = "benchmarks.attack" if any(s.startswith("attack.") for s in sets) else "unify_dist"
    cmd = [*(launch if nproc > 1 else [sys.executable]), "-m", module, "train", "--config", config]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def plan(args: argparse.Namespace) -> list[Job]:
    """Every run of the reproduction, in order: per environment the rules' runs, then its baseline."""
    out, rules = Path(args.out), _names(args.rules)
    resume = "false" if args.fresh else "true"
    common = [f"train.max_rounds={args.rounds}", f"dist.backend={args.backend}", f"output.resume={resume}"]
    jobs = []
    for env in _names(args.envs):
        config, name = ENVS[env], f"paper_{env}"
        cap = [f"data.train_per_owner={args.train_per_owner}"]
        if args.side_by_side:
            sets = [f"unify.rule={rules[0]}", f"unify.compare={','.join(rules)}"]
            runs = [(f"{name}, side by side: {', '.join(rules)}", out / f"{name}_side_by_side", sets)]
        else:
            runs = [(f"{name}, rule {r}", out / f"{name}_{r}", [f"unify.rule={r}"]) for r in rules]
        for label, run_dir, sets in runs:
            cmd = _train(config, [*common, *cap, *sets, *args.set, f"output.dir={run_dir}"], args.nproc)
            jobs.append(Job(f"{label}, {args.nproc} owners", run_dir, cmd))
        if not args.no_baseline:
            # One owner holding everything the owners hold together: the same total data, pooled.
            run_dir = out / f"{name}_centralised"
            pooled = [f"data.train_per_owner={args.train_per_owner * args.nproc}", "data.partition=iid"]
            cmd = _train(config, [*common, *pooled, "unify.rule=avg", *args.set, f"output.dir={run_dir}"], 1)
            jobs.append(Job(f"{name}, centralised baseline, 1 owner", run_dir, cmd))
    return jobs


def _guard_resume(args: argparse.Namespace) -> None:
    """Refuse to resume runs made with other data: a smoke run's checkpoints must not seed the real one.

    Rounds may differ (resuming to more rounds is the point); what each owner trains on may not.
    """
    stamp = Path(args.out) / "reproduce.json"
    mine = {"train_per_owner": args.train_per_owner, "nproc": args.nproc}
    if args.set:  # stamps written before --set existed have no key: the same as none given
        mine["set"] = list(args.set)
    if stamp.is_file() and not args.fresh:
        theirs = json.loads(stamp.read_text())
        if theirs != mine:
            raise UserError(f"{args.out}/ holds runs made with {theirs}, not {mine}; pass --fresh to start over there, "
                            "or another --out")  # fmt: skip
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(mine) + "\n")


def _run(job: Job, index: int, total: int) -> None:
    """One run, its output passed through; a failed run stops the reproduction with the command to retry."""
    print(f"\n[{index}/{total}] {job.label} -> {job.out_dir} ({total - index} more after this)", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.run(job.command, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"reproduce: run {index}/{total} ({job.label}) failed with exit code {proc.returncode}; "
                         f"command: {' '.join(job.command)}")  # fmt: skip
    print(f"[{index}/{total}] done in {time.perf_counter() - t0:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check(args)
        jobs = plan(args)
        if args.dry_run:
            print("\n".join(" ".join(j.command) for j in jobs))
            return 0
        _guard_resume(args)
        t0 = time.perf_counter()
        for i, job in enumerate(jobs, 1):
            _run(job, i, len(jobs))
        minutes = (time.perf_counter() - t0) / 60
        print(f"\nall {len(jobs)} runs done in {minutes:.1f} min; writing the report", flush=True)
        return report.main([str(j.out_dir) for j in jobs], args.out)
    except UserError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
