"""`unify-dist report RUN_DIR...`: the paper's tables, a per-class forgetting matrix, and accuracy plots.

Reads only metrics.jsonl, so runs copied from different machines can be reported together. Runs are
grouped into environments by the records' "name" (paper_v, paper_h, ...) and owner count; within one,
each record's "rule" and side-by-side "candidates" give the columns, and a one-owner run of the same
name is the centralised baseline. matplotlib is optional: without it the tables are still written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unify_dist.errors import UserError

__all__ = ["Run", "Series", "Environment", "PAPER", "load_run", "group_runs", "render_markdown", "plot", "main"]

PAPER: dict[str, dict[str, Any]] = {
    "paper_v": {
        "title": "V-environment: owners split IID",
        "local": (0.9326, 0.9243),
        1: {"avg": 0.7613, "max": 0.1828, "absmax": 0.7110},
        "final": {"avg": 0.9373, "max": 0.8960, "absmax": 0.9322},
    },
    "paper_h": {
        "title": "H-environment: owner 0 holds classes 0-4, owner 1 classes 5-9",
        "local": (0.9502, 0.9841),
        1: {"avg": 0.4733, "max": 0.1149, "absmax": 0.4708},
        "final": {"avg": 0.7868, "max": 0.7149, "absmax": 0.7073},
    },
}
"""Figures of J.-L. Lee (2021): unified test accuracy in round 1 and the final row, local models' accuracy."""

FASHION_MNIST = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
LOST = 0.10
"""A class counts as lost when the unified model is this far below the owner that knew it best."""
PLOTS_HINT = "plots skipped: matplotlib is not installed; pip install 'unify-dist[plots]' for plots"


@dataclass(frozen=True)
class Run:
    """One run directory's records, with what the report needs to place it."""

    path: Path
    records: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.records[-1]["name"]

    @property
    def rule(self) -> str:
        return self.records[-1]["rule"]

    @property
    def owners(self) -> int:
        return len(self.records[-1]["owners"])

    @property
    def compared(self) -> list[str]:
        return list(self.records[-1].get("candidates") or {})


@dataclass(frozen=True)
class Series:
    """Unified test accuracy per round for one rule, and where it came from."""

    rule: str
    acc: dict[int, float]
    run: Run
    side_by_side: bool  # True: computed from another rule's local models (a candidate), not its own trajectory

    @property
    def priority(self) -> int:
        """A plain run of the rule (2) beats a side-by-side run's own rule (1) beats a candidate (0)."""
        return 0 if self.side_by_side else 1 if self.run.compared else 2


@dataclass
class Environment:
    """Every run of one name and owner count: the rules' series, a reference run, the baseline."""

    name: str
    owners: int
    series: dict[str, Series] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    baseline: Run | None = None

    @property
    def reference(self) -> Run:
        """The run whose local models fill the local columns: the avg run when there is one."""
        return next((r for r in self.runs if r.rule == "avg"), self.runs[0])

    @property
    def last_round(self) -> int:
        return max(max(s.acc) for s in self.series.values())

    @property
    def key(self) -> str:
        return f"{self.name}_{self.owners}owners"

    @property
    def title(self) -> str:
        paper = PAPER.get(self.name)
        return f"{self.name} ({self.owners} owners)" + (f": {paper['title']}" if paper else "")


def load_run(path: str | Path) -> Run:
    """Read a run directory (or its metrics.jsonl); a missing or unreadable one is the user's mistake."""
    p = Path(path)
    file = p if p.is_file() else p / "metrics.jsonl"
    if not p.exists():
        raise UserError(f"run directory '{p}' does not exist; pass a directory written by 'unify-dist train'")
    if not file.is_file():
        raise UserError(f"'{p}' has no metrics.jsonl; pass a run directory (output.dir) of a run that finished a round")
    records = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            why = f"{file}, line {n}, is not JSON ({e.msg}); the run may have been cut off mid-write"
            raise UserError(why) from None
    if not records:
        raise UserError(f"{file} is empty: the run finished no round yet")
    missing = {"round", "rule", "name", "owners", "unified_test_acc"} - set(records[-1])
    if missing:
        raise UserError(f"{file} lacks {', '.join(sorted(missing))}: it was not written by 'unify-dist train'")
    return Run(p if p.is_dir() else p.parent, records)


def group_runs(runs: list[Run]) -> list[Environment]:
    """Environments in first-seen order; a rule's own run wins over a side-by-side candidate of it."""
    envs: dict[tuple[str, int], Environment] = {}
    for run in (r for r in runs if r.owners > 1):
        env = envs.setdefault((run.name, run.owners), Environment(run.name, run.owners))
        env.runs.append(run)
        own = {run.rule: [r["unified_test_acc"] for r in run.records]}
        cands = {k: [r.get("candidates", {}).get(k, {}).get("test_acc") for r in run.records] for k in run.compared}
        cands.pop(run.rule, None)  # the run's own rule: its real trajectory is already there
        for rule, accs in [*own.items(), *cands.items()]:
            _add(env, Series(rule, _by_round(run, accs), run, side_by_side=rule in cands))
    for run in (r for r in runs if r.owners == 1):
        matching = [e for e in envs.values() if e.name == run.name]
        for env in matching:
            if env.baseline is not None:
                raise UserError(f"two centralised runs of '{run.name}': {env.baseline.path} and {run.path}; pass one")
            env.baseline = run
        if not matching:
            raise UserError(f"{run.path} is a one-owner run of '{run.name}' but no multi-owner run has that name")
    for env in envs.values():
        env.series = dict(sorted(env.series.items(), key=lambda kv: _rule_order(kv[0])))
    return list(envs.values())


def _rule_order(rule: str) -> tuple[int, str]:
    """Columns in the registry's order (avg, ..., max, absmax, as in the paper), whatever order runs came in."""
    from unify_dist.rules import RULES  # late: pulls in torch

    known = list(RULES)
    return (known.index(rule) if rule in known else len(known), rule)


def _by_round(run: Run, values: list[float]) -> dict[int, float]:
    return {r["round"]: v for r, v in zip(run.records, values) if v is not None}


def _add(env: Environment, s: Series) -> None:
    """Keep the better source of a rule's series; two sources of equal standing are ambiguous."""
    old = env.series.get(s.rule)
    if old is None or s.priority > old.priority:
        env.series[s.rule] = s
    elif s.priority == old.priority:
        raise UserError(f"two runs of '{env.name}' give rule {s.rule}: {old.run.path} and {s.run.path}; pass one")


# ---------------------------------------------------------------- markdown


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.2%}"


def _nan_if_none(x: float | None) -> float:
    return math.nan if x is None else x


def _with_paper(ours: float | None, paper: float | None) -> str:
    return _pct(ours) if paper is None else f"{_pct(ours)} ({_pct(paper)})"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def accuracy_table(env: Environment) -> list[str]:
    """The paper's layout: rounds 1, 2, 3 and the last; local owners, each rule, the centralised baseline."""
    paper = PAPER.get(env.name, {})
    ref, last = env.reference, env.last_round
    rules = list(env.series)
    head = ["round", *[f"local o{o}" for o in range(env.owners)]]
    head += [f"{r}{' †' if env.series[r].side_by_side else ''}" for r in rules]
    head += ["centralised"] if env.baseline else []
    lines = [_row(head), _row(["---:"] * len(head))]
    local = {r["round"]: [o["local_val_acc"] for o in r["owners"]] for r in ref.records}
    central = _by_round(env.baseline, [r["unified_test_acc"] for r in env.baseline.records]) if env.baseline else {}
    for round_ in sorted({r for r in (1, 2, 3) if r <= last} | {last}):
        final = round_ == last
        known = paper.get("final" if final else round_, {})
        paper_local = paper.get("local") if final and env.owners == 2 else None
        cells = [f"{round_}{' (last)' if final else ''}"]
        for o in range(env.owners):
            ours = local[round_][o] if round_ in local else None
            cells.append(_with_paper(ours, paper_local[o] if paper_local else None))
        cells += [_with_paper(env.series[r].acc.get(round_), known.get(r)) for r in rules]
        cells += [_pct(central.get(round_))] if env.baseline else []
        lines.append(_row(cells))
    return lines


def class_matrix(env: Environment) -> list[str]:
    """Per-owner x per-class accuracy, last round: each rule run's local models, then its unified model.

    Each unified row follows its own run's local rows: runs of different rules train different locals.
    """
    runs = [r for r in _rule_runs(env) if "per_class" in r.records[-1]]
    if not runs:
        return ["(no per-class figures: the records predate them)"]
    n = len(runs[0].records[-1]["per_class"]["unified"])
    names = FASHION_MNIST if env.name in PAPER and n == len(FASHION_MNIST) else None
    head = ["model", *[f"{c} {names[c]}" if names else str(c) for c in range(n)]]
    lines, lost = [_row(head), _row(["---"] + ["---:"] * n)], []
    for run in runs:
        pc = run.records[-1]["per_class"]
        for o, accs in enumerate(pc["local"]):
            lines.append(_row([f"local o{o} ({run.rule} run)", *[f"{a:.0%}" for a in accs]]))
        lines.append(_row([f"**unified {run.rule}**", *[f"**{a:.0%}**" for a in pc["unified"]]]))
        lost.append(_lost(run.rule, pc["local"], pc["unified"], head[1:]))
    return [*lines, "", *lost]


def _rule_runs(env: Environment) -> list[Run]:
    """Runs whose own unified model was evaluated per class (candidates have none), the reference first."""
    runs = [s.run for s in env.series.values() if not s.side_by_side]
    return sorted(runs, key=lambda r: r is not env.reference)


def _lost(rule: str, local: list[list[float]], unified: list[float], labels: list[str]) -> str:
    """One line naming the classes the unified model lost, and the owner whose local model knew them."""
    parts = []
    for c, u in enumerate(unified):
        best = max(range(len(local)), key=lambda o: local[o][c])
        if local[best][c] - u >= LOST:
            parts.append(f"{labels[c]} (owner {best}: {local[best][c]:.0%} → {u:.0%})")
    if not parts:
        return f"- unified {rule}: no class is {LOST:.0%} or more below the owner that knew it best."
    return f"- unified {rule} lost: " + ", ".join(parts)


def render_markdown(envs: list[Environment], plots: dict[str, Path]) -> str:
    """The whole report.md: one section per environment, then the runs it was built from."""
    out = [
        "# Unification of deep learning models: reproduction",
        "",
        "Unified-model test accuracy on the whole test set after each round, as in J.-L. Lee (2021). "
        "In brackets: the paper's figure (round 1 and the final row). Local columns: each owner's own model "
        "before unify, on its private validation split (its own classes in the H-environment). "
        "Centralised: one owner holding all the training data. "
        "† a side-by-side candidate: that rule applied to the local models of the run's own rule, "
        "not a trajectory of its own.",
    ]
    for env in envs:
        out += ["", f"## {env.title}", "", *accuracy_table(env), ""]
        if env.key in plots:
            out += [f"![unified test accuracy per round, {env.name}]({plots[env.key].name})", ""]
        out += [
            f"### Per-class test accuracy, round {env.reference.records[-1]['round']}",
            "",
            "Local models on their own test shard, unified models on the whole test set; bold: unified.",
            "",
            *class_matrix(env),
        ]
    out += ["", "## Runs", "", _row(["run", "name", "owners", "rule", "compared", "rounds"]), _row(["---"] * 6)]
    for env in envs:
        for run in env.runs + ([env.baseline] if env.baseline else []):
            cells = [f"`{run.path}`", run.name, str(run.owners), run.rule, ", ".join(run.compared) or "–"]
            out.append(_row([*cells, str(run.records[-1]["round"])]))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- plots


def plot(env: Environment, path: Path) -> None:
    """Unified test accuracy per round, one line per rule; local models and the baseline for reference."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for s in env.series.values():
        rounds = sorted(s.acc)
        label = f"unified {s.rule}" + (" (side-by-side)" if s.side_by_side else "")
        style = dict(marker="o", ms=3, lw=2, ls="--" if s.side_by_side else "-")
        ax.plot(rounds, [100 * s.acc[r] for r in rounds], label=label, **style)
    ref = env.reference
    for o in range(env.owners):
        accs = [_nan_if_none(r["owners"][o]["local_val_acc"]) * 100 for r in ref.records]  # None: not measured
        style = dict(color="grey", lw=1.2, ls=(0, (1, 1 + o)), marker="^v<>"[o % 4], ms=4)
        ax.plot([r["round"] for r in ref.records], accs, label=f"local o{o} ({ref.rule} run, own val)", **style)
    if env.baseline:
        b = env.baseline.records
        style = dict(color="black", lw=1.5, ls="-.", label="centralised (1 owner, all data)")
        ax.plot([r["round"] for r in b], [100 * r["unified_test_acc"] for r in b], **style)
    paper = PAPER.get(env.name)
    title = f"{env.name}, {env.owners} owners" + (f"\n{paper['title']}" if paper else "")
    ax.set(xlabel="round", ylabel="test accuracy (%)", ylim=(0, 100))
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    # Below the axes: inside, it would hide the lines it explains.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_all(envs: list[Environment], out: Path) -> dict[str, Path]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(PLOTS_HINT)
        return {}
    paths = {}
    for env in envs:
        paths[env.key] = out / f"accuracy_{env.key}.png"
        plot(env, paths[env.key])
    return paths


def main(run_dirs: list[str], out: str | None) -> int:
    """Write OUT/report.md (and PNG plots when matplotlib is installed) from the runs' metrics.jsonl."""
    runs = [load_run(d) for d in run_dirs]
    envs = group_runs(runs)
    if not envs:
        raise UserError("only one-owner runs were given; the report compares unified models of 2+ owners")
    out_dir = Path(out) if out else runs[0].path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plot_all(envs, out_dir)
    report = out_dir / "report.md"
    report.write_text(render_markdown(envs, plots))
    print(f"report: {report}" + "".join(f"\nplot:   {p}" for p in plots.values()))
    return 0
