"""Overlap's accuracy gap over several seeds: paired runs, blocking against overlapped (issue 19).

    python -m experiments.overlap_gap BLOCKING.jsonl:OVERLAP.jsonl [...] [--last 5 10 15]

Each pair is two runs' metrics.jsonl with the same seed (experiments/overlap_accuracy.sh makes them). For each
pair: the mean unified test accuracy over the last N rounds of each run and their difference; then, over the
pairs, the mean difference, its standard error and a 95% interval (Student's t). One seed's gap says little
on label-skewed owners, whose blocking rounds swing by about 2 points from one round to the next.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# Student's t, two-sided 95%, by degrees of freedom (1-30); beyond 30, 30's (a little wide: 1.96 at infinity)
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
        11: 2.20, 12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 16: 2.12, 17: 2.11, 18: 2.10, 19: 2.09, 20: 2.09,
        21: 2.08, 22: 2.07, 23: 2.07, 24: 2.06, 25: 2.06, 26: 2.06, 27: 2.05, 28: 2.05, 29: 2.05, 30: 2.04}


def accuracies(path: Path) -> list[float]:
    """The run's unified test accuracy per round, in percent."""
    return [100 * json.loads(line)["unified_test_acc"] for line in path.read_text().splitlines() if line.strip()]


def gaps(pairs: list[tuple[Path, Path]], last: int) -> list[tuple[float, float, float]]:
    """(blocking, overlap, overlap - blocking): means over the last `last` rounds, one tuple per pair."""
    out = []
    for blocking, overlap in pairs:
        b, o = statistics.mean(accuracies(blocking)[-last:]), statistics.mean(accuracies(overlap)[-last:])
        out.append((b, o, o - b))
    return out


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean, standard error and the half-width of its 95% interval (nan for fewer than two values)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    se = statistics.stdev(values) / len(values) ** 0.5
    return mean, se, _T95[min(len(values) - 1, 30)] * se


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pairs", nargs="+", metavar="BLOCKING:OVERLAP", help="two metrics.jsonl of one seed")
    p.add_argument("--last", type=int, nargs="+", default=[5, 10, 15], help="rounds averaged at the end")
    args = p.parse_args(argv)
    pairs = []
    for spec in args.pairs:
        blocking, sep, overlap = spec.partition(":")
        missing = [f for f in (blocking, overlap) if not f or not Path(f).is_file()]
        if not sep or missing:
            print(f"overlap_gap: '{spec}' is not two metrics.jsonl files joined by ':' ({missing or 'no :'}); "
                  "give BLOCKING.jsonl:OVERLAP.jsonl", file=sys.stderr)  # fmt: skip
            return 2
        pairs.append((Path(blocking), Path(overlap)))
    print("| pair | " + " | ".join(f"last {n}: blocking / overlap (gap)" for n in args.last) + " |")
    print("| --- |" + " ---: |" * len(args.last))
    by_last = {n: gaps(pairs, n) for n in args.last}
    for i, (blocking, _) in enumerate(pairs):
        cells = [f"{b:.2f} / {o:.2f} ({g:+.2f})" for b, o, g in (by_last[n][i] for n in args.last)]
        print(f"| {i + 1}: {blocking.parent.name}/{blocking.stem} | " + " | ".join(cells) + " |")
    cells = []
    for n in args.last:
        mean, se, half = interval([g for _, _, g in by_last[n]])
        cells.append(f"{mean:+.2f} (se {se:.2f}; 95% {mean - half:+.2f} to {mean + half:+.2f})")
    print(f"| mean gap over {len(pairs)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
