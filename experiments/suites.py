"""Beyond the paper, measured: suites of real training runs and one table per suite.

    python -m experiments.suites robust   # 4 owners, one hostile: which rules survive (make robust)
    python -m experiments.suites skew     # label-skewed owners: H (2 owners) and dirichlet(0.1), 4 owners
    python -m experiments.suites dp       # accuracy against differential-privacy noise, 2 owners

Each run is a real `unify-dist train` under torchrun (as in experiments.reproduce), one after another;
each resumes from its checkpoints if the suite is run again. The table (final and best unified test
accuracy per run) is printed and written to OUT/summary.md and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from unify_dist.errors import UserError
from experiments.reproduce import Job, _run, _train

__all__ = ["Run", "SUITES", "main"]


@dataclass(frozen=True)
class Run:
    """One run of a suite: a label for the table, a config, its overrides, and how many owners."""

    label: str
    config: str
    sets: tuple[str, ...]
    owners: int
    group: str
    """Runs of one group share a setting (an attack, an environment); the group's first run is its reference."""


def _robust(args: argparse.Namespace) -> list[Run]:
    """4 owners on IID Fashion-MNIST; owner 3 attacks from round 1, by weights x -10 or by noise."""
    base = ("data.partition=iid", f"data.train_per_owner={args.train_per_owner or 3000}", "data.test_size=4000")
    cfg = "configs/paper_v.toml"
    runs = [Run("clean, avg", cfg, (*base, "unify.rule=avg"), 4, "clean")]
    rules = [("avg", ()), ("max", ()), ("absmax", ()), ("median", ()), ("trimmed_mean", ()),
             ("avg + norm bound 2", ("unify.rule=avg", "unify.update_norm_bound=2.0")),
             ("median + norm bound 2", ("unify.rule=median", "unify.update_norm_bound=2.0"))]  # fmt: skip
    for attack, attack_sets in (("x -10", ("attack.kind=scale", "attack.scale=-10.0")),
                                ("noise", ("attack.kind=noise", "attack.noise_std=1.0"))):  # fmt: skip
        for label, sets in rules:
            rule = sets or (f"unify.rule={label}",)
            runs.append(Run(f"{attack}, {label}", cfg, (*base, *rule, "attack.owner=3", *attack_sets), 4, attack))
    return runs


def _skew(args: argparse.Namespace) -> list[Run]:
    """The paper's H-environment (2 owners, classes 0-4 / 5-9) and dirichlet(0.1) with 4 owners.

    configs/paper_h.toml: Adam 1e-3; configs/h_sgd.toml: SGD 0.01, momentum 0.9, cosine learning rate over
    the rounds. Both: batch 64, one local epoch per round, optimizer state reset after unify. Side-by-side
    candidates (unify.compare) are rules applied to the same local models as the run's own rule, so one
    run answers for several rules.
    """
    cap = (f"data.train_per_owner={args.train_per_owner}",)
    adam, sgd = "configs/paper_h.toml", "configs/h_sgd.toml"
    constant = ("train.lr_schedule=constant",)  # h_sgd.toml's cosine schedule off: the swing it settles shows
    methods = [
        ("avg, Adam", adam, ()),
        ("avg, SGD; max, absmax side by side", sgd, (*constant, "unify.compare=max,absmax")),
        ("avg, SGD; delta-space absmax, ties side by side",
         sgd, (*constant, "unify.space=delta", "unify.compare=absmax,ties")),
        ("SCAFFOLD, SGD", sgd, (*constant, "train.scaffold=true")),
        ("avg, SGD, cosine learning rate", sgd, ()),
    ]  # fmt: skip
    runs = [Run(f"H, {label}", cfg, (*cap, *sets), 2, "H, 2 owners") for label, cfg, sets in methods]
    d = ("data.partition=dirichlet", "data.alpha=0.1")
    dirichlet = [("avg, Adam", adam, ()), ("avg, SGD", sgd, constant),
                 ("SCAFFOLD, SGD", sgd, (*constant, "train.scaffold=true"))]  # fmt: skip
    for label, cfg, sets in dirichlet:
        runs.append(Run(f"dirichlet(0.1), {label}", cfg, (*cap, *d, *sets), 4, "dirichlet(0.1), 4 owners"))
    return runs


def _dp(args: argparse.Namespace) -> list[Run]:
    """What differential privacy costs in accuracy: 2 owners, IID, clip C = 1, growing noise."""
    base = ("data.partition=iid", f"data.train_per_owner={args.train_per_owner or 3000}", "data.test_size=4000")
    cfg, runs = "configs/paper_v.toml", [Run("no DP", "configs/paper_v.toml", base, 2, "dp")]
    for z in ("0.0001", "0.01", "1.0"):
        sets = (*base, "unify.update_norm_bound=1.0", f"unify.dp_noise_multiplier={z}")
        runs.append(Run(f"C = 1, z = {z}", cfg, sets, 2, "dp"))
    return runs


SUITES = {"robust": _robust, "skew": _skew, "dp": _dp}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.suites", description=__doc__.splitlines()[0])
    p.add_argument("suite", choices=sorted(SUITES), help="which suite of runs")
    p.add_argument("--rounds", type=int, default=0, help="rounds per run (default: robust 8, skew 30)")
    p.add_argument("--train-per-owner", type=int, default=0, help="cap on each owner's training images (robust: 3000)")
    p.add_argument("--only", default="", help="run only this run (its exact label), or those whose label contains this text")
    p.add_argument("--out", default="", help="parent folder of the run directories (default results/SUITE)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    return p


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_").replace("__", "_")


def _jobs(runs: list[Run], args: argparse.Namespace, out: Path) -> list[Job]:
    rounds = args.rounds or {"robust": 8, "dp": 5}.get(args.suite, 30)
    jobs = []
    for run in runs:
        run_dir = out / _slug(run.label)
        sets = [*run.sets, f"train.max_rounds={rounds}", f"output.dir={run_dir}", f"name={args.suite}", "output.progress=false"]
        jobs.append(Job(run.label, run_dir, _train(run.config, sets, run.owners)))
    return jobs


def summarise(runs: list[Run], jobs: list[Job]) -> list[dict]:
    """Final and best unified test accuracy of every run and of its side-by-side candidates, from metrics.jsonl."""
    rows = []
    for run, job in zip(runs, jobs):
        path = job.out_dir / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        if not records:
            rows.append({"label": run.label, "group": run.group, "rounds": 0})
            continue
        series = {run.label: [r["unified_test_acc"] for r in records]}
        for rule in records[-1].get("candidates", {}):
            series[f"{run.label}: {rule} side by side"] = [r["candidates"][rule]["test_acc"] for r in records]
        for label, accs in series.items():
            best = max(accs)
            rows.append({"label": label, "group": run.group, "owners": run.owners, "rounds": len(records),
                         "final": accs[-1], "best": best, "best_round": 1 + accs.index(best),
                         "mean_last5": sum(accs[-5:]) / len(accs[-5:]), "dp_epsilon": records[-1].get("dp_epsilon"),
                         "first_round_85": next((i for i, a in enumerate(accs, 1) if a >= 0.85), None)})  # fmt: skip
    return rows


def _markdown(rows: list[dict], title: str) -> str:
    header = "| run | owners | rounds | final | best (round) | mean of last 5 | first round >= 85% |"
    lines = [f"## {title}", "", header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if not r["rounds"]:
            lines.append(f"| {r['label']} | | not run | | | | |")
            continue
        label = r["label"] + (f" (epsilon {r['dp_epsilon']:.3g})" if r.get("dp_epsilon") is not None else "")
        lines.append(f"| {label} | {r['owners']} | {r['rounds']} | {r['final']:.2%} | "
                     f"{r['best']:.2%} ({r['best_round']}) | {r['mean_last5']:.2%} | "
                     f"{r['first_round_85'] or '-'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.rounds < 0 or args.train_per_owner < 0:
            raise UserError("--rounds and --train-per-owner must be >= 0 (0: the suite's default)")
        out = Path(args.out or f"results/{args.suite}")
        runs = SUITES[args.suite](args)
        jobs = _jobs(runs, args, out)
        exact = [j for j in jobs if j.label == args.only]
        todo = exact or [j for j in jobs if args.only in j.label]  # an exact label picks just that run
        if not todo:
            raise UserError(f"--only '{args.only}' matches no run of suite {args.suite}; run with --dry-run to list them")
        if args.dry_run:
            print("\n".join(f"{j.label}: {' '.join(j.command)}" for j in todo))
            return 0
        t0 = time.perf_counter()
        for i, job in enumerate(todo, 1):
            _run(job, i, len(todo))
        rows = summarise(runs, jobs)  # every run of the suite that has metrics, also from earlier calls
        text = _markdown(rows, f"{args.suite}: unified test accuracy ({(time.perf_counter() - t0) / 60:.1f} min)")
        print("\n" + text)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text(text)
        (out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    except UserError as e:
        print(f"experiments: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
