"""The experiment suites' driver (make robust/skew/dp): its summary of metrics.jsonl files, its run
selection, and bad options as one line with exit 2. The runs themselves are `unify-dist train`,
tested end to end elsewhere; here they are written by hand, in the format the loop writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import suites as experiments


def _write_run(run_dir: Path, unified: list[float], candidates: dict[str, list[float]]) -> None:
    run_dir.mkdir(parents=True)
    lines = []
    for i, acc in enumerate(unified):
        cands = {rule: {"test_acc": accs[i], "min_val_acc": accs[i]} for rule, accs in candidates.items()}
        lines.append(json.dumps({"round": i + 1, "unified_test_acc": acc, "candidates": cands}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_summary_has_a_row_per_run_and_per_side_by_side_candidate(tmp_path: Path) -> None:
    args = experiments._parser().parse_args(["skew", "--out", str(tmp_path)])
    runs = experiments.SUITES["skew"](args)
    jobs = experiments._jobs(runs, args, tmp_path)
    side = next(i for i, r in enumerate(runs) if "max, absmax side by side" in r.label)
    candidates = {"max": [0.5, 0.6, 0.7, 0.8], "absmax": [0.8, 0.85, 0.9, 0.84]}
    _write_run(jobs[side].out_dir, [0.80, 0.86, 0.84, 0.87], candidates)

    rows = experiments.summarise(runs, jobs)
    by_label = {r["label"]: r for r in rows}
    assert len(rows) == len(runs) + 2  # every run (measured or not) and the two candidates
    run = by_label[runs[side].label]
    assert (run["final"], run["best"], run["best_round"], run["first_round_85"]) == (0.87, 0.87, 4, 2)
    assert run["mean_last5"] == pytest.approx((0.80 + 0.86 + 0.84 + 0.87) / 4)
    absmax = by_label[f"{runs[side].label}: absmax side by side"]
    assert (absmax["final"], absmax["best"], absmax["best_round"], absmax["first_round_85"]) == (0.84, 0.9, 3, 2)
    assert by_label[f"{runs[side].label}: max side by side"]["first_round_85"] is None  # never got there
    text = experiments._markdown(rows, "skew")
    assert "| 87.00% | 87.00% (4) |" in text and text.count("not run") == len(runs) - 1


def test_exact_label_picks_one_run_and_dry_run_prints_its_command(capsys: pytest.CaptureFixture) -> None:
    assert experiments.main(["skew", "--only", "H, avg, SGD; max, absmax side by side", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert "configs/h_sgd.toml" in lines[0] and "unify.compare=max,absmax" in lines[0]
    assert "--nproc_per_node=2" in lines[0]


def test_dirichlet_runs_have_four_owners(capsys: pytest.CaptureFixture) -> None:
    assert experiments.main(["skew", "--only", "dirichlet", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("--nproc_per_node=4" in line and "data.alpha=0.1" in line for line in lines)


@pytest.mark.parametrize("argv", [["skew", "--only", "no such run"], ["robust", "--rounds", "-1"]])
def test_bad_option_is_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    assert experiments.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("experiments: error:") and "\n" not in err


def test_reproduce_passes_set_values_to_every_run(tmp_path: Path) -> None:
    from experiments import reproduce

    args = reproduce._parser().parse_args(["--envs", "v", "--set", "model.channels_last=false", "--out", str(tmp_path)])
    jobs = reproduce.plan(args)
    assert len(jobs) == 4  # avg, max, absmax and the centralised baseline
    for job in jobs:
        i = job.command.index("model.channels_last=false")
        assert job.command[i - 1] == "--set" and job.command.index(f"output.dir={job.out_dir}") > i


def test_overlap_accuracy_script_pairs_the_runs_of_each_seed(tmp_path: Path) -> None:
    """experiments/overlap_accuracy.sh with SEEDS: each seed's blocking and overlapped run, paired by overlap_gap
    (SUMMARY_ONLY: the runs are hand-made here; the script's training commands are the program's own)."""
    for seed, (b, o) in enumerate([(0.80, 0.81), (0.70, 0.67)]):
        _write_run(tmp_path / f"h_seed{seed}_blocking", [0.1, b], {})
        _write_run(tmp_path / f"h_seed{seed}_overlap", [0.1, o], {})
    script = Path(__file__).parents[1] / "experiments" / "overlap_accuracy.sh"
    env = {**os.environ, "OUT": str(tmp_path), "SUMMARY_ONLY": "1", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script), "h"], env={**env, "SEEDS": "0 1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "h_seed0_blocking" in done.stdout and "h_seed1_blocking" in done.stdout
    assert "| mean gap over 2 | -0.50 (se 1.00;" in done.stdout  # both rounds: gaps +0.50 and -1.50
    wrong = subprocess.run(["bash", str(script), "h"], env={**env, "SEEDS": "0 x"}, capture_output=True, text=True)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "SEEDS" in wrong.stderr
    missing = subprocess.run(["bash", str(script), "h"], env={**env, "SEEDS": "0 2"}, capture_output=True, text=True)
    assert missing.returncode == 2 and "h_seed2_blocking" in missing.stderr


def test_overlap_gap_pairs_seeds_and_gives_the_mean_gap_with_its_interval(tmp_path: Path, capsys) -> None:
    from experiments import overlap_gap

    def run(name: str, accs: list[float]) -> Path:
        _write_run(tmp_path / name, accs, {})
        return tmp_path / name / "metrics.jsonl"

    # last 2 rounds: seed 0 blocking 0.80, overlap 0.81 (+1); seed 1 blocking 0.70, overlap 0.67 (-3)
    pairs = [f"{run('b0', [0.1, 0.8, 0.8])}:{run('o0', [0.9, 0.82, 0.80])}",
             f"{run('b1', [0.5, 0.7, 0.7])}:{run('o1', [0.5, 0.66, 0.68])}"]  # fmt: skip
    assert overlap_gap.main([*pairs, "--last", "2"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert "80.00 / 81.00 (+1.00)" in rows[2] and "70.00 / 67.00 (-3.00)" in rows[3]
    assert "-1.00 (se 2.00; 95% -26.42 to +24.42)" in rows[4]  # t with 1 degree of freedom: 12.71
    mean, se, half = overlap_gap.interval([float(i) for i in range(11)])  # stdev sqrt(11): se 1
    assert (mean, round(se, 6), half) == (5.0, 1.0, 2.23)  # 10 degrees of freedom: t 2.23, not the normal 1.96
    assert overlap_gap.interval([0.0, 2.0] * 20)[2] == pytest.approx(2.04 * (40 / 39) ** 0.5 / 40 ** 0.5)  # 30 and more: 2.04
    assert overlap_gap.main([pairs[0].replace(":", " ")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "BLOCKING.jsonl:OVERLAP.jsonl" in err[0]
