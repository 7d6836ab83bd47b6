"""Helpers of launch/netns_time_to_accuracy.sh (standard library only, so they start in milliseconds).

    wait METRICS FIELD TARGET   exit 0 once a record of METRICS (JSON lines) has FIELD >= TARGET
    summary --unify DIR --ddp DIR --target T --out JSON [--note K=V ...]
                                time to target of each run, their ratio; a table on stdout, JSON to --out
    modes --run NAME=DIR ... --target T --out JSON [--note K=V ...]
                                unify-dist runs in several modes (launch/netns_unequal.sh): each one's time
                                to target, its speed-up over the first, each owner's median idle fraction,
                                and how its bytes crossed the link (from DIR/link.tsv, when there is one)
    sample DEV OUT              every 0.1 s, append "time.time() tx_bytes" of network device DEV to OUT
                                until killed (run inside the namespace: ip netns exec NS ...)

A run directory holds `launch` (the script's time.time() when it started the run), `metrics.jsonl`, and
`output.log` (every output line prefixed by the time.time() it arrived). Times to target end at the "time"
of the first record at or above the target; they start at the launch ("launch to target") or where
training starts ("training to target"): for DDP the records' "started", for unify-dist the arrival of
rank 0's "owner data:" line, printed just before its first round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return rows


def wait(metrics: Path, field: str, target: float) -> int:
    parent = os.getppid()
    while not any(r.get(field, 0) >= target for r in records(metrics)):
        if os.getppid() != parent:  # the script is gone (Ctrl-C does not reach background jobs): so are we
            return 1
        time.sleep(0.5)
    return 0


def _stamp_of(log: Path, text: str) -> float | None:
    """Arrival time of the first output line containing `text` (bash's EPOCHREALTIME; some locales use ',')."""
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            stamp, _, rest = line.partition(" ")
            if text in rest:
                return float(stamp.replace(",", "."))
    return None


def measure(run: Path, acc: str, step: str, target: float, started: float | None) -> dict:
    """Time to target of one run: launch to target, training to target, steps (rounds or epochs) needed."""
    rows = records(run / "metrics.jsonl")
    hit = next((r for r in rows if r[acc] >= target), None)
    launch = float((run / "launch").read_text().strip().replace(",", "."))
    result = {
        "reached": hit is not None,
        f"{step}s_run": len(rows),
        "best_test_acc": max((r[acc] for r in rows), default=None),
        "test_accs": [round(r[acc], 4) for r in rows],
        "last5_test_acc": sum(r[acc] for r in rows[-5:]) / len(rows[-5:]) if rows else None,
    }
    if hit is not None:
        result.update({
            f"{step}s_to_target": hit[step],
            "test_acc_at_target": hit[acc],
            "launch_to_target_s": hit["time"] - launch,
            "training_to_target_s": None if started is None else hit["time"] - started,
            "start_up_s": None if started is None else started - launch,
        })  # fmt: skip
    return result


def _ratio(u: dict, d: dict, key: str) -> float | None:
    return u[key] / d[key] if u.get(key) is not None and d.get(key) else None


def summary(args: argparse.Namespace) -> int:
    unify_started = _stamp_of(args.unify / "output.log", "owner data:")
    ddp_rows = records(args.ddp / "metrics.jsonl")
    unify = measure(args.unify, "unified_test_acc", "round", args.target, unify_started)
    ddp = measure(args.ddp, "test_acc", "epoch", args.target, ddp_rows[0]["started"] if ddp_rows else None)
    unify_rows = records(args.unify / "metrics.jsonl")
    if unify_rows:  # a unify ends when its slowest owner does
        unify["median_unify_s"] = statistics.median(max(o["unify_s"] for o in r["owners"]) for r in unify_rows)
    if ddp_rows:
        ddp["median_epoch_train_s"] = statistics.median(r["train_s"] for r in ddp_rows)
    ratio_launch = _ratio(unify, ddp, "launch_to_target_s")
    ratio_training = _ratio(unify, ddp, "training_to_target_s")
    out = {
        "what": "wall-clock time to a test accuracy, unify-dist vs DistributedDataParallel, one rank per "
        "network namespace over a tc-tbf-shaped veth link (issue 4.5)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "target_accuracy": args.target,
        **dict(n.split("=", 1) for n in args.note),
        "unify": unify,
        "ddp": ddp,
        "ratio_launch_to_target": ratio_launch,
        "ratio_training_to_target": ratio_training,
        "goal": "ratio <= 0.3",
        "met": ratio_launch is not None and ratio_launch <= 0.3,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(_table(unify, ddp, ratio_launch, ratio_training, args.target))
    print(f"summary: {args.out}")
    return 0


def _table(unify: dict, ddp: dict, ratio_launch: float | None, ratio_training: float | None, target: float) -> str:
    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} s"

    def r(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f} ({'met' if v <= 0.3 else 'missed'})"

    title = f"time to {target:.2%} test accuracy"
    rows = [f"{title:<36}  {'launch->target':>14}  {'training->target':>16}  {'rounds/epochs':>13}  test acc"]
    for name, m, step in (("unify-dist", unify, "round"), ("DDP", ddp, "epoch")):
        if not m["reached"]:
            rows.append(f"{name:<36}  not reached in {m[f'{step}s_run']} {step}s (best {m['best_test_acc'] or 0:.2%})")
            continue
        rows.append(
            f"{name:<36}  {s(m['launch_to_target_s']):>14}  {s(m['training_to_target_s']):>16}  "
            f"{m[f'{step}s_to_target']:>13}  {m['test_acc_at_target']:.2%}"
        )
    rows.append(f"{'ratio unify-dist / DDP (goal <= 0.3)':<36}  {r(ratio_launch):>14}  {r(ratio_training):>16}")
    return "\n".join(rows)


def idle_fractions(rows: list[dict]) -> list[float | None]:
    """Each owner's median over rounds 2.. of unify_s / round_s: the share of its round spent blocked in the unify."""
    later = rows[1:] or rows
    owners = max((len(r["owners"]) for r in later), default=0)
    out: list[float | None] = []
    for i in range(owners):
        shares = [r["owners"][i]["unify_s"] / r["owners"][i]["round_s"] for r in later
                  if i < len(r["owners"]) and r["owners"][i].get("round_s")]  # fmt: skip
        out.append(statistics.median(shares) if shares else None)
    return out


def sample(dev: str, out: Path) -> int:
    counter = Path("/sys/class/net", dev, "statistics", "tx_bytes")
    with out.open("a") as f:
        while True:
            f.write(f"{time.time():.3f} {counter.read_text().strip()}\n")
            f.flush()
            time.sleep(0.1)


def link_use(samples: Path, begin: float, end: float, active_mbit: float = 1.0) -> dict | None:
    """What node A sent over the link between `begin` and `end` (rounds 2 on), in 1-s windows: the busiest
    window's rate, the mean rate, and the share of windows carrying more than `active_mbit` (the watch's and
    the store's chatter is far below it): one burst per round gives a small share at the link's full rate,
    bytes spread over the round a large share at a lower peak."""
    if not samples.exists():
        return None
    points = [tuple(map(float, line.split())) for line in samples.read_text().splitlines() if len(line.split()) == 2]
    points = [(t, b) for t, b in points if begin <= t <= end]
    if len(points) < 20:
        return None
    windows, i = [], 0
    while points[i][0] + 1.0 <= points[-1][0]:  # consecutive windows of 10 samples (about 1 s)
        j = min(i + 10, len(points) - 1)
        (t0, b0), (t1, b1) = points[i], points[j]
        windows.append(8 * (b1 - b0) / (t1 - t0) / 1e6)
        i = j
    total = 8 * (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0]) / 1e6
    return {"peak_mbit_1s": max(windows), "mean_mbit": total, "windows": len(windows),
            "active_share": sum(w > active_mbit for w in windows) / len(windows)}  # fmt: skip


def modes(args: argparse.Namespace) -> int:
    runs = dict(r.split("=", 1) for r in args.run)
    results = {}
    for name, folder in runs.items():
        run = Path(folder)
        m = measure(run, "unified_test_acc", "round", args.target, _stamp_of(run / "output.log", "owner data:"))
        rows = records(run / "metrics.jsonl")
        m["idle_by_owner"] = idle_fractions(rows)
        later = rows[1:] or rows  # round 1 pays the warm-up
        # the time this mode's round is held up by the unify, as the slowest owner sees it
        m["median_unify_s"] = statistics.median(max(o["unify_s"] for o in r["owners"]) for r in later) if later else None
        m["link"] = link_use(run / "link.tsv", rows[0]["time"], rows[-1]["time"]) if len(rows) > 1 else None
        results[name] = m
    first = next(iter(results.values()))
    for m in results.values():
        m["speed_up_launch"] = _ratio(first, m, "launch_to_target_s")
        m["speed_up_training"] = _ratio(first, m, "training_to_target_s")
    out = {
        "what": "time to a test accuracy of unify-dist in several round modes, one rank per network namespace over a "
        "tc-tbf-shaped veth link, node B slowed by a cgroup CPU quota (issue 19)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "target_accuracy": args.target,
        **dict(n.split("=", 1) for n in args.note),
        "runs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    base = next(iter(results))
    print(f"| mode | launch->target | training->target | rounds | speed-up vs {base} | idle, owner 0 / 1 | unify_s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, m in results.items():
        idle = " / ".join("-" if v is None else f"{v:.1%}" for v in m["idle_by_owner"])
        unify_s = "-" if m["median_unify_s"] is None else f"{m['median_unify_s']:.2f} s"
        if not m["reached"]:
            best = f"not reached in {m['rounds_run']} rounds (best {m['best_test_acc'] or 0:.2%})"
            print(f"| {name} | {best} | | | | {idle} | {unify_s} |")
            continue
        print(f"| {name} | {m['launch_to_target_s']:.1f} s | {m['training_to_target_s'] or 0:.1f} s | "
              f"{m['rounds_to_target']} | {m['speed_up_launch'] or 0:.2f}x | {idle} | {unify_s} |")  # fmt: skip
    linked = {name: m["link"] for name, m in results.items() if m["link"]}
    if linked:
        print("\nnode A's bytes on the link, rounds 2 on, in 1-s windows:")
        print("| mode | busiest window | mean | windows over 1 Mbit/s |")
        print("| --- | ---: | ---: | ---: |")
        for name, link in linked.items():
            print(f"| {name} | {link['peak_mbit_1s']:.1f} Mbit/s | {link['mean_mbit']:.1f} Mbit/s | "
                  f"{link['active_share']:.0%} of {link['windows']} |")  # fmt: skip
    print(f"summary: {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wait")
    w.add_argument("metrics", type=Path)
    w.add_argument("field")
    w.add_argument("target", type=float)
    s = sub.add_parser("summary")
    s.add_argument("--unify", type=Path, required=True)
    s.add_argument("--ddp", type=Path, required=True)
    s.add_argument("--target", type=float, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--note", action="append", default=[], metavar="KEY=VALUE", help="copied into the JSON")
    m = sub.add_parser("modes")
    m.add_argument("--run", action="append", required=True, metavar="NAME=DIR", help="the first is the baseline")
    m.add_argument("--target", type=float, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--note", action="append", default=[], metavar="KEY=VALUE", help="copied into the JSON")
    a = sub.add_parser("sample")
    a.add_argument("dev")
    a.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "sample":
        return sample(args.dev, args.out)
    if args.command == "wait":
        return wait(args.metrics, args.field, args.target)
    return modes(args) if args.command == "modes" else summary(args)


if __name__ == "__main__":
    sys.exit(main())
