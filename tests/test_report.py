"""`unify-dist report` on a real run: a 2-round, 2-owner side-by-side run of the paper's H-environment as one
real group of two (forked ranks), then the real CLI writing report.md and plots; and bad input giving one
line, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.world import cli, cli_world, merged

RULES = ["avg", "max", "absmax"]


@pytest.fixture(scope="module")
def h_run(tmp_path_factory, data_root) -> Path:
    """A tiny real H-environment run evaluating every rule each round (about 40 s on 2 shared cores)."""
    run_dir = tmp_path_factory.mktemp("paper_h_side_by_side")
    sets = ["train.max_rounds=2", "data.train_per_owner=400", "data.test_size=1000", f"unify.compare={','.join(RULES)}"]
    sets.append(f"output.dir={run_dir}")
    args = ["train", "--config", "configs/paper_h.toml", *[a for s in sets for a in ("--set", s)]]
    proc = merged(cli_world(args, 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def h_report(h_run: Path, tmp_path_factory) -> tuple[str, Path, str]:
    """The real CLI's report of h_run, built once: (its stdout, the output folder, report.md)."""
    out = tmp_path_factory.mktemp("report")
    proc, md = _report([h_run], out)
    return proc.stdout, out, md


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def _report(run_dirs: list[Path], out: Path, env: dict[str, str] | None = None):
    proc = cli(["report", *map(str, run_dirs), "--out", str(out)], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, (out / "report.md").read_text()


@pytest.mark.slow
def test_table_has_every_round_and_rule_with_our_figures(h_run: Path, h_report) -> None:
    md = h_report[2]
    header = next(line for line in md.splitlines() if line.startswith("| round |"))
    assert _cells(header) == ["round", "local o0", "local o1", "avg", "max †", "absmax †"]
    rows = {_cells(line)[0]: line for line in md.splitlines() if line.startswith(("| 1 ", "| 2 (last)"))}
    assert set(rows) == {"1", "2 (last)"}
    for record in _records(h_run):
        row = rows["2 (last)" if record["round"] == 2 else "1"]
        for rule in RULES:
            assert f"{record['candidates'][rule]['test_acc']:.2%}" in row
        assert f"{record['owners'][1]['local_val_acc']:.2%}" in row
    assert "78.68%" in rows["2 (last)"] and "47.33%" in rows["1"]  # the paper's H avg figures beside ours


@pytest.mark.slow
def test_class_matrix_shows_which_owner_knew_each_class(h_run: Path, h_report) -> None:
    md = h_report[2]
    last = _records(h_run)[-1]["per_class"]
    lines = md.splitlines()
    for o in (0, 1):
        row = next(line for line in lines if line.startswith(f"| local o{o} (avg run) |"))
        assert _cells(row)[1:] == [f"{a:.0%}" for a in last["local"][o]]
    # H-environment: owner 0 never saw classes 5-9, owner 1 never saw 0-4.
    assert all(a == 0 for a in last["local"][0][5:]) and all(a == 0 for a in last["local"][1][:5])
    unified = next(line for line in lines if line.startswith("| **unified avg** |"))
    assert _cells(unified)[1:] == [f"**{a:.0%}**" for a in last["unified"]]
    assert "- unified avg" in md


@pytest.mark.slow
def test_plots_are_written_when_matplotlib_is_there(h_report) -> None:
    pytest.importorskip("matplotlib")
    stdout, out, md = h_report
    png = out / "accuracy_paper_h_2owners.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({png.name})" in md and str(png) in stdout


@pytest.mark.slow
def test_without_matplotlib_tables_still_come_with_one_hint(h_run: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "no_matplotlib" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    proc, md = _report([h_run], tmp_path / "out", env={"PYTHONPATH": str(blocker.parent)})
    assert "pip install 'unify-dist[plots]'" in proc.stdout
    assert "| 2 (last) |" in md and not list((tmp_path / "out").glob("*.png"))


@pytest.mark.slow
def test_two_runs_claiming_one_rule_are_refused(h_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(h_run, copy, ignore=shutil.ignore_patterns("*.pt", "checkpoints"))
    proc = cli(["report", str(h_run), str(copy), "--out", str(tmp_path)])
    assert proc.returncode == 2 and "give rule avg" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("make", ["missing", "empty_dir", "not_json"])
def test_bad_run_dir_is_one_line_and_exit_2(tmp_path: Path, make: str) -> None:
    run_dir = tmp_path / "run"
    if make != "missing":
        run_dir.mkdir()
    if make == "not_json":
        (run_dir / "metrics.jsonl").write_text('{"round": 1,\n')
    proc = cli(["report", str(run_dir)])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unify-dist: error:") and str(run_dir) in lines[0]
