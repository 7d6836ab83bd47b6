"""The figures of `make bench-links` from its run directories: JSON with the issue's ratios, and a plot.

    python benchmarks/links_summary.py --runs runs/bench_links --out results/bench_links.json --plot P.png

RUNS holds MODEL_RATE/SYSTEM/ directories (overhead runs) and tta/SYSTEM/ (time to accuracy), each written
by launch/netns_bench_links.sh: `kind` (unify, ddp or flower), `launch` (time.time() at launch), `load`
(uptime afterwards), tx_h0..2.tsv ("time tx_bytes" of each host's veth, every 0.2 s) and the system's records:

    unify       clock_rank*.jsonl (benchmarks/links_clock.py: local training's start and end) and metrics.jsonl
    ddp         metrics.jsonl (benchmarks/ddp_baseline.py: per epoch "train_s", "time", and "started")
    flower      rounds.jsonl (benchmarks/flower_app/ud_flower/task.py's RoundLog, either Flower API)
    lora_unify  rounds_rank*.jsonl and meta.json (benchmarks/lora_links.py: the LLaMA-7B-shaped adapter, one
                unify a round; launch/netns_bench_lora_links.sh writes them under lora7b_RATE/)

Round overhead = round wall time - the slowest owner's local training. A unify-dist round runs from the
first owner's training start to the next round's; a Flower round from the server sending the model for
training to the last evaluation reply. DDP all_reduces inside its epoch, so it has no training without
communication: its overhead is the epoch (training and test evaluation) minus unify-dist's local
training of the same model and share at the same rate (the same computation). A LoRA round runs from the
first owner's local step to the last owner's unify end; its unify time is set against the link's floor:
the bytes a ring all_reduce must send per owner, 2 (W-1)/W x the adapter, at the link's rate. Bytes per
round: what each host's veth sent within the round's window. Standard library only; matplotlib for the
plot if present.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["system_rounds", "summarise", "main"]

# The targets: (numerator, denominator, model, rate) -> at most this.
TARGETS = {
    "overhead_unify_over_flower": 0.25,
    "overhead_unify_bf16_over_flower": 0.12,
    "overhead_unify_over_flower_legacy": 0.5,
    "overhead_unify_bf16_over_flower_legacy": 0.25,
    "tta_unify_over_flower": 0.6,
    "tta_unify_over_ddp": 0.25,  # issue 19 (issue 14 asked 0.30)
}
HEADLINE = ("resnet18", "100mbit")
# Issue 18: the LLaMA-7B-shaped adapter unified by 4 owners over 100 Mbit, within this much of the floor.
LORA_TARGETS = {"lora_unify_over_floor_fp32": ("unify", 1.2), "lora_unify_over_floor_bf16": ("unify_bf16", 1.2)}
LORA_HEADLINE = "lora7b_100mbit"
SYSTEMS = ("unify", "unify_bf16", "unify_ffa", "ddp", "flower", "flower_legacy")


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a stopped run
            break
    return rows


def _counter(path: Path) -> tuple[list[float], list[int]]:
    times, counts = [], []
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.replace(",", ".").split()
            if len(parts) == 2:
                times.append(float(parts[0]))
                counts.append(int(parts[1]))
    return times, counts


def _at(times: list[float], counts: list[int], t: float) -> float:
    """The byte counter at time t, linear between samples."""
    i = bisect.bisect_left(times, t)
    if i == 0:
        return float(counts[0])
    if i >= len(times):
        return float(counts[-1])
    t0, t1, c0, c1 = times[i - 1], times[i], counts[i - 1], counts[i]
    return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else float(c1)


def _windows(run: Path, kind: str, compute_s: float | None) -> list[dict]:
    """Per round: its window [start, end], wall time, the slowest owner's training, overhead."""
    rounds = []
    if kind == "unify":
        clocks = [_lines(p) for p in sorted(run.glob("clock_rank*.jsonl"))]
        metrics = {r["round"]: r for r in _lines(run / "metrics.jsonl")}
        n = min((len(c) for c in clocks), default=0)
        for i in range(n - 1):  # the last round has no next start
            start = min(c[i]["train_start"] for c in clocks)
            end = min(c[i + 1]["train_start"] for c in clocks)
            train = max(c[i]["train_end"] - c[i]["train_start"] for c in clocks)
            m = metrics.get(clocks[0][i]["round"], {})
            owners = m.get("owners", [])
            rounds.append({"start": start, "end": end, "train_s": train,
                           "unify_s": max((o["unify_s"] for o in owners), default=None),
                           "unify_bytes": max((o.get("unify_bytes", 0) for o in owners), default=None)})  # fmt: skip
    elif kind == "ddp":
        rows = _lines(run / "metrics.jsonl")
        for i, r in enumerate(rows):
            start = rows[i - 1]["time"] if i else r["started"]
            rounds.append({"start": start, "end": r["time"], "train_s": compute_s, "ddp_train_s": r["train_s"]})
    elif kind == "lora_unify":
        owners = [_lines(p) for p in sorted(run.glob("rounds_rank*.jsonl"))]
        for i in range(min((len(o) for o in owners), default=0)):
            rows = [o[i] for o in owners]
            rounds.append({"start": min(r["train_start"] for r in rows), "end": max(r["unify_end"] for r in rows),
                           "train_s": max(r["train_end"] - r["train_start"] for r in rows),
                           "unify_s": max(r["unify_s"] for r in rows), "unify_bytes": max(r["unify_bytes"] for r in rows),
                           "wire_bytes": max(r["wire_bytes"] for r in rows)})  # fmt: skip
    elif kind == "flower":
        for r in _lines(run / "rounds.jsonl"):
            if not r.get("clients"):
                continue
            rounds.append({"start": r["start"], "end": r["end"], "train_s": max(c["train_s"] for c in r["clients"]),
                           "client_setup_s": max(c.get("setup_s", 0.0) for c in r["clients"] + r["eval"])})  # fmt: skip
    for r in rounds:
        r["wall_s"] = r["end"] - r["start"]
        r["overhead_s"] = None if r["train_s"] is None else r["wall_s"] - r["train_s"]
    return rounds


def system_rounds(run: Path, compute_s: float | None = None) -> dict:
    """One run's rounds, their medians, and the bytes each host sent per round."""
    kind = (run / "kind").read_text().strip()
    rounds = _windows(run, kind, compute_s)
    hosts = sorted(int(p.name[4:-4]) for p in run.glob("tx_h*.tsv") if p.name[4:-4].isdigit())
    counters = {h: _counter(run / f"tx_h{h}.tsv") for h in hosts}
    for r in rounds:
        r["tx_bytes"] = {f"h{h}": round(_at(*c, r["end"]) - _at(*c, r["start"])) for h, c in counters.items() if c[0]}
    out: dict = {"kind": kind, "rounds": rounds, "load": _read(run / "load")}
    keys = ("wall_s", "train_s", "overhead_s", "unify_s", "client_setup_s", "ddp_train_s", "unify_bytes", "wire_bytes")
    for key in keys:
        values = [r[key] for r in rounds if r.get(key) is not None]
        if values:
            out[f"median_{key}"] = statistics.median(values)
    for h in hosts:
        sent = [r["tx_bytes"][f"h{h}"] for r in rounds if f"h{h}" in r["tx_bytes"]]
        if sent:
            out[f"median_tx_bytes_h{h}"] = statistics.median(sent)
    if kind == "lora_unify" and (run / "meta.json").exists():
        out.update(_floor(json.loads((run / "meta.json").read_text()), out.get("median_unify_s")))
    return out


def _floor(meta: dict, unify_s: float | None) -> dict:
    """The link's floor for one owner's share of a ring all_reduce of the adapter, and the unify against it."""
    owners = meta["owners"]
    floor_bytes = 2 * (owners - 1) / owners * meta["payload_bytes"]
    floor_s = floor_bytes * 8 / meta["rate_bits"]
    return {"meta": meta, "floor_bytes": floor_bytes, "floor_s": floor_s,
            "unify_over_floor": None if unify_s is None else unify_s / floor_s}  # fmt: skip


def _read(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or a.get(key) is None or not b.get(key):
        return None
    return a[key] / b[key]


def _tta(run: Path, target: float) -> dict | None:
    """Time to target of one run: from its launch, and from its first round's start; its accuracy curve."""
    if not (run / "kind").exists():
        return None
    kind = (run / "kind").read_text().strip()
    launch = float((run / "launch").read_text().strip().replace(",", "."))
    if kind == "flower":
        rows = [r for r in _lines(run / "rounds.jsonl") if r.get("clients")]
        acc, first = "unified_test_acc", (rows[0]["start"] if rows else None)
    elif kind == "ddp":
        rows = _lines(run / "metrics.jsonl")
        acc, first = "test_acc", (rows[0]["started"] if rows else None)
    else:
        rows = _lines(run / "metrics.jsonl")
        clock = _lines(run / "clock_rank0.jsonl")
        acc, first = "unified_test_acc", (clock[0]["train_start"] if clock else None)
    hit = next((r for r in rows if r[acc] >= target), None)
    return {
        "kind": kind,
        "parts": _parts(kind, rows),
        "reached": hit is not None,
        "rounds_run": len(rows),
        "rounds_to_target": rows.index(hit) + 1 if hit else None,
        "test_acc_at_target": hit[acc] if hit else None,
        "launch_to_target_s": hit["time"] - launch if hit else None,
        "training_to_target_s": hit["time"] - first if hit and first else None,
        "curve": [[round(r["time"] - launch, 2), round(r[acc], 4)] for r in rows],
        "load": _read(run / "load"),
    }


def _parts(kind: str, rows: list[dict]) -> list[dict]:
    """Where each round's (epoch's) wall time went, from the records: unify-dist's owners' train_s, eval_s
    (the unified model's forward passes), unify_s and round_s, one figure per owner; DDP's train_s (the
    epoch, its all_reduce inside) and the rest of its epoch (test evaluation, identity check, record)."""
    if kind == "ddp":
        times = [rows[0]["started"]] + [r["time"] for r in rows] if rows else []
        return [{"train_s": r["train_s"], "rest_s": round(times[i + 1] - times[i] - r["train_s"], 3)}
                for i, r in enumerate(rows)]  # fmt: skip
    if kind != "unify":
        return []
    keys = ("train_s", "eval_s", "unify_s", "round_s")
    return [{k: [round(o[k], 3) for o in r["owners"]] for k in keys} for r in rows if all(k in r["owners"][0] for k in keys)]


def summarise(runs: Path, target: float, notes: list[str]) -> dict:
    overhead: dict[str, dict] = {}
    for case in sorted(p for p in runs.iterdir() if p.is_dir() and p.name != "tta"):
        unify = system_rounds(case / "unify") if (case / "unify" / "kind").exists() else None
        compute = unify.get("median_train_s") if unify and unify["kind"] == "unify" else None
        systems = {"unify": unify}
        for name in SYSTEMS[1:]:
            if (case / name / "kind").exists():
                systems[name] = system_rounds(case / name, compute)
        overhead[case.name] = {k: v for k, v in systems.items() if v is not None}
    ratios: dict[str, dict] = {}
    for case, s in overhead.items():
        r = {}
        for num in ("unify", "unify_bf16", "unify_ffa"):
            if num == "unify_ffa" and num not in s:
                continue
            for den in ("flower", "flower_legacy", "ddp"):
                r[f"overhead_{num}_over_{den}"] = _ratio(s.get(num), s.get(den), "median_overhead_s")
            if s.get(num, {}).get("unify_over_floor") is not None:
                r[f"unify_over_floor_{num}"] = s[num]["unify_over_floor"]
        ratios[case] = r
    tta = {name: _tta(runs / "tta" / name, target) for name in ("unify", "flower", "ddp")}
    tta = {k: v for k, v in tta.items() if v is not None}
    tta_ratios = {
        "tta_unify_over_flower": _ratio(tta.get("unify"), tta.get("flower"), "launch_to_target_s"),
        "tta_unify_over_ddp": _ratio(tta.get("unify"), tta.get("ddp"), "launch_to_target_s"),
        "training_to_target_unify_over_flower": _ratio(tta.get("unify"), tta.get("flower"), "training_to_target_s"),
        "training_to_target_unify_over_ddp": _ratio(tta.get("unify"), tta.get("ddp"), "training_to_target_s"),
    }
    headline = ratios.get("_".join(HEADLINE), {})
    targets = {}
    for key, limit in TARGETS.items():
        value = tta_ratios.get(key) if key.startswith("tta") else headline.get(key)
        targets[key] = {"value": value, "target": f"<= {limit}", "met": None if value is None else value <= limit}
    lora = overhead.get(LORA_HEADLINE, {})
    for key, (name, limit) in LORA_TARGETS.items():
        value = lora.get(name, {}).get("unify_over_floor")
        targets[key] = {"value": value, "target": f"<= {limit}", "met": None if value is None else value <= limit}
    return {
        "what": "unify-dist vs DDP vs Flower FedAvg (deployment engine and legacy API) over tc-tbf-shaped links "
        "between network namespaces (issue 14 part 2): round overhead, bytes per host, time to accuracy; "
        "a LLaMA-7B-shaped LoRA adapter unified by 4 owners against the link's floor and Flower's adapter-only "
        "FedAvg (issue 18)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **dict(n.split("=", 1) for n in notes),
        "targets": targets,
        "headline_case": "_".join(HEADLINE),
        "lora_headline_case": LORA_HEADLINE,
        "overhead_ratios": ratios,
        "overhead": overhead,
        "target_accuracy": target,
        "time_to_accuracy": tta,
        "time_to_accuracy_ratios": tta_ratios,
    }


def table(result: dict) -> str:
    def f(v, unit=" s"):
        return "-" if v is None else f"{v:.2f}{unit}"

    rows = [f"{'case':<18} {'system':<14} {'wall':>9} {'train':>9} {'overhead':>9} {'MB sent per host per round':>32}"]
    for case, systems in result["overhead"].items():
        hosts = 5 if case.startswith("lora") else 3
        for name, s in systems.items():
            mb = "/".join("-" if s.get(f"median_tx_bytes_h{h}") is None else f"{s[f'median_tx_bytes_h{h}'] / 1e6:.2f}"
                          for h in range(hosts))  # fmt: skip
            floor = "" if s.get("unify_over_floor") is None else (
                f"  unify {s['median_unify_s']:.2f} s = {s['unify_over_floor']:.2f}x the floor {s['floor_s']:.2f} s")
            rows.append(f"{case:<18} {name:<14} {f(s.get('median_wall_s')):>9} {f(s.get('median_train_s')):>9} "
                        f"{f(s.get('median_overhead_s')):>9} {mb:>32}{floor}")  # fmt: skip
    for name, t in result["time_to_accuracy"].items():
        rows.append(f"time to {result['target_accuracy']:.0%}: {name:<8} launch->target {f(t['launch_to_target_s'])}, "
                    f"training->target {f(t['training_to_target_s'])}, rounds {t['rounds_to_target']}")  # fmt: skip
    for key, t in result["targets"].items():
        met = "-" if t["met"] is None else ("met" if t["met"] else "MISSED")
        rows.append(f"{key:<42} {f(t['value'], ''):>8} (target {t['target']}): {met}")
    return "\n".join(rows)


def _save(fig, path: Path) -> bool:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot(result: dict, path: Path) -> bool:
    """Test accuracy against wall time since launch, one line per system; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = {"unify": "unify-dist avg", "flower": "Flower FedAvg (deployment engine)", "ddp": "DDP"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, t in result["time_to_accuracy"].items():
        if t["curve"]:
            xs, ys = zip(*t["curve"])
            ax.plot(xs, [100 * y for y in ys], marker="o", label=labels.get(name, name))
    ax.axhline(100 * result["target_accuracy"], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("wall time since launch (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Fashion-MNIST V split, 2 owners, {result.get('tta_rate', '')} links")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_lora(result: dict, path: Path) -> bool:
    """The LoRA case: each system's round wall time (unify time hatched) beside the link's floor; False
    without matplotlib or without the case."""
    case = result["overhead"].get(LORA_HEADLINE)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not case:
        return False
    labels = {"unify": "unify-dist\nfp32", "unify_bf16": "unify-dist\nbf16", "unify_ffa": "unify-dist\nFFA (B only)",
              "flower": "Flower FedAvg\n(adapter only)"}  # fmt: skip
    names = [n for n in labels if n in case]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    walls = [case[n].get("median_wall_s", 0.0) for n in names]
    ax.bar(range(len(names)), walls, color=["C0", "C0", "C0", "C1"][: len(names)], alpha=0.5, label="round wall time")
    for i, n in enumerate(names):
        if case[n].get("floor_s"):
            ax.bar(i, case[n]["median_unify_s"], color="C0", hatch="//", label="unify" if i == 0 else None)
            floor_label = "link's floor" if i == 0 else None
            ax.hlines(case[n]["floor_s"], i - 0.4, i + 0.4, color="k", linestyle="--", label=floor_label)
            ax.annotate(f"{case[n]['unify_over_floor']:.2f}x", (i, case[n]["median_unify_s"]), ha="center", va="bottom")
        else:
            ax.annotate(f"{walls[i]:.1f} s", (i, walls[i]), ha="center", va="bottom")
    ax.set_xticks(range(len(names)), [labels[n] for n in names])
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median round, log scale)")
    ax.set_title(f"LLaMA-7B-shaped LoRA adapter (8.4M), 4 owners, {result.get('lora_rate', '100mbit')} links")
    ax.legend()
    return _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--target", type=float, default=0.88)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--lora-plot", type=Path, default=None, help="the LoRA case's bar chart")
    parser.add_argument("--note", action="append", default=[], metavar="KEY=VALUE", help="copied into the JSON")
    args = parser.parse_args(argv)
    result = summarise(args.runs, args.target, args.note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"summary: {args.out}")
    if args.plot is not None and result["time_to_accuracy"]:
        print(f"plot: {args.plot}" if plot(result, args.plot) else "plot: skipped (matplotlib is not installed)")
    if args.lora_plot is not None and LORA_HEADLINE in result["overhead"]:
        drawn = plot_lora(result, args.lora_plot)
        print(f"plot: {args.lora_plot}" if drawn else "plot: skipped (matplotlib is not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
