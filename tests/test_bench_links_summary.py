"""benchmarks/links_summary.py on hand-made run directories (no network, no processes): overhead, bytes, ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.links_summary import summarise, system_rounds


def _run(path: Path, kind: str, launch: float, files: dict[str, list[dict]], tx: dict[int, list[tuple[float, int]]]) -> None:
    path.mkdir(parents=True)
    (path / "kind").write_text(kind + "\n")
    (path / "launch").write_text(f"{launch}\n")
    for name, rows in files.items():
        (path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    for host, samples in tx.items():
        (path / f"tx_h{host}.tsv").write_text("".join(f"{t} {b}\n" for t, b in samples))


def _unify(path: Path) -> None:
    """Rounds start at 100, 110, 120 (the last is only an end); training 6 s on owner 0, 7 s on owner 1."""
    clocks = [[{"round": r + 1, "train_start": 100 + 10 * r + o * 0.5, "train_end": 106 + 10 * r + o} for r in range(3)] for o in (0, 1)]
    metrics = [{"round": r + 1, "unified_test_acc": 0.5 + 0.2 * r, "time": 108 + 10 * r,
                "owners": [{"unify_s": 1.0, "unify_bytes": 900, "train_s": 6.0, "eval_s": 0.5, "round_s": 10.0},
                           {"unify_s": 1.5, "unify_bytes": 900, "train_s": 6.5, "eval_s": 0.6, "round_s": 10.0}]}
               for r in range(3)]  # fmt: skip
    tx = {0: [(100, 0), (110, 2000), (120, 4000)], 1: [(100, 0), (120, 1000)]}
    _run(path, "unify", 90.0, {"clock_rank0.jsonl": clocks[0], "clock_rank1.jsonl": clocks[1], "metrics.jsonl": metrics}, tx)


def _flower(path: Path) -> None:
    """Rounds of 20 s with the slowest client training 7 s; the server (host 2) sends 3000 bytes a round."""
    rounds = [{"round": r + 1, "start": 100 + 20 * r, "end": 120 + 20 * r, "time": 120 + 20 * r, "unified_test_acc": 0.6 + 0.3 * r,
               "clients": [{"train_s": 6.0, "setup_s": 2.0}, {"train_s": 7.0, "setup_s": 3.0}], "eval": [{"setup_s": 2.5}]}
              for r in range(2)]  # fmt: skip
    _run(path, "flower", 95.0, {"rounds.jsonl": rounds}, {2: [(100, 0), (140, 6000)]})


def _ddp(path: Path) -> None:
    epochs = [{"epoch": e + 1, "test_acc": 0.7 + 0.1 * e, "time": 130 + 30 * e, "train_s": 25.0, "started": 100.0} for e in range(3)]
    _run(path, "ddp", 92.0, {"metrics.jsonl": epochs}, {0: [(100, 0), (190, 9000)]})


def test_unify_round_overhead_is_the_round_minus_the_slowest_owners_training(tmp_path: Path) -> None:
    _unify(tmp_path / "u")
    s = system_rounds(tmp_path / "u")
    assert len(s["rounds"]) == 2  # the last round has no next start
    assert s["rounds"][0]["wall_s"] == pytest.approx(10.0)
    assert s["rounds"][0]["train_s"] == pytest.approx(6.5)  # owner 1: 106 + 1 - 100.5
    assert s["median_overhead_s"] == pytest.approx(3.5)
    assert s["rounds"][0]["tx_bytes"] == {"h0": 2000, "h1": 500}  # linear between samples
    assert s["median_unify_s"] == 1.5


def test_flower_and_ddp_figures_and_the_ratios(tmp_path: Path) -> None:
    _unify(tmp_path / "runs" / "resnet18_100mbit" / "unify")
    _flower(tmp_path / "runs" / "resnet18_100mbit" / "flower")
    _ddp(tmp_path / "runs" / "resnet18_100mbit" / "ddp")
    _unify(tmp_path / "runs" / "tta" / "unify")
    _flower(tmp_path / "runs" / "tta" / "flower")
    _ddp(tmp_path / "runs" / "tta" / "ddp")
    result = summarise(tmp_path / "runs", 0.88, ["tta_rate=100mbit"])
    case = result["overhead"]["resnet18_100mbit"]
    assert case["flower"]["median_overhead_s"] == pytest.approx(13.0)
    assert case["flower"]["median_tx_bytes_h2"] == 3000
    assert case["ddp"]["rounds"][0]["overhead_s"] == pytest.approx(30.0 - 6.5)  # epoch minus unify-dist's training
    ratio = result["overhead_ratios"]["resnet18_100mbit"]["overhead_unify_over_flower"]
    assert ratio == pytest.approx(3.5 / 13.0)
    assert result["targets"]["overhead_unify_over_flower"]["met"] is False  # 0.27 > 0.25
    tta = result["time_to_accuracy"]
    assert tta["unify"]["rounds_to_target"] == 3 and tta["unify"]["launch_to_target_s"] == pytest.approx(128 - 90)
    assert tta["flower"]["launch_to_target_s"] == pytest.approx(140 - 95)
    assert tta["ddp"]["training_to_target_s"] == pytest.approx(190 - 100)
    assert result["time_to_accuracy_ratios"]["tta_unify_over_ddp"] == pytest.approx(38 / 98)
    assert tta["unify"]["parts"][2] == {"train_s": [6.0, 6.5], "eval_s": [0.5, 0.6], "unify_s": [1.0, 1.5], "round_s": [10.0, 10.0]}
    assert tta["ddp"]["parts"][0] == {"train_s": 25.0, "rest_s": 5.0}  # started 100, record at 130


def test_modes_summary_times_each_mode_against_the_first_and_reads_idle_fractions(tmp_path: Path) -> None:
    """benchmarks/time_to_accuracy.py modes (launch/netns_unequal.sh's summary) on hand-made run directories."""
    from benchmarks.time_to_accuracy import main

    def mode(name: str, accs: list[float], unify_s: float, round_s: float) -> Path:
        run = tmp_path / name
        rows = [{"round": r + 1, "unified_test_acc": a, "time": 100 + 10 * (r + 1),
                 "owners": [{"unify_s": unify_s, "round_s": round_s}, {"unify_s": 0.0, "round_s": round_s}]}
                for r, a in enumerate(accs)]  # fmt: skip
        _run(run, "unify", 90.0, {"metrics.jsonl": rows}, {})
        (run / "output.log").write_text("95.0 owner data: 2 owners\n")
        return run

    epochs, seconds = mode("epochs", [0.5, 0.8, 0.9], 5.0, 10.0), mode("seconds", [0.85, 0.9], 0.1, 10.0)
    # node A's counter every 0.1 s from round 1's end (110) to round 2's (120): 12.5 MB in the first second
    samples = [(110 + k / 10, min(k, 10) * 1_250_000) for k in range(101)]
    (seconds / "link.tsv").write_text("".join(f"{t:.1f} {b}\n" for t, b in [(105.0, 0), *samples, (125.0, 9e9)]))
    out = tmp_path / "modes.json"
    assert main(["modes", "--run", f"epochs={epochs}", "--run", f"seconds={seconds}", "--target", "0.88", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert runs["epochs"]["launch_to_target_s"] == pytest.approx(40.0)  # round 3 at 130, launched at 90
    assert runs["seconds"]["launch_to_target_s"] == pytest.approx(30.0)
    assert runs["seconds"]["speed_up_launch"] == pytest.approx(40 / 30)
    assert runs["seconds"]["training_to_target_s"] == pytest.approx(25.0)  # from 'owner data:' at 95
    assert runs["epochs"]["idle_by_owner"] == pytest.approx([0.5, 0.0])  # rounds 2.. only
    assert runs["epochs"]["median_unify_s"] == pytest.approx(5.0)
    assert runs["epochs"]["link"] is None  # no samples
    link = runs["seconds"]["link"]  # samples outside rounds 2.. left out
    assert link["peak_mbit_1s"] == pytest.approx(100.0) and link["mean_mbit"] == pytest.approx(10.0)
    assert link["windows"] == 10 and link["active_share"] == pytest.approx(0.1)
    assert runs["seconds"]["last5_test_acc"] == pytest.approx(0.875)


def _lora_unify(path: Path, dtype: str, unify_s: float) -> None:
    """4 owners, rounds every 10 s from 200: local steps of 0.2-0.5 s, then a unify of `unify_s` s."""
    meta = {"dtype": dtype, "rule": "lora_separate", "owners": 4, "elements": 8388608,
            "payload_bytes": 8388608 * (4 if dtype == "fp32" else 2), "rate_bits": 100e6}  # fmt: skip
    rows = {f"rounds_rank{o}.jsonl": [{"round": r + 1, "train_start": 200 + 10 * r + 0.1 * o, "train_end": 200.2 + 10 * r + 0.1 * o,
                                       "unify_start": 201 + 10 * r, "unify_end": 201 + 10 * r + unify_s, "unify_s": unify_s - 0.01 * o,
                                       "unify_bytes": 3 * meta["payload_bytes"] // 2, "wire_bytes": 53_000_000} for r in range(3)]
            for o in range(4)}  # fmt: skip
    _run(path, "lora_unify", 195.0, rows, {h: [(200, 0), (230, 3 * 54_000_000)] for h in range(4)})
    (path / "meta.json").write_text(json.dumps(meta))


def test_the_lora_case_sets_each_unify_against_the_links_floor_and_flower(tmp_path: Path) -> None:
    case = tmp_path / "runs" / "lora7b_100mbit"
    _lora_unify(case / "unify", "fp32", 4.4)
    _lora_unify(case / "unify_bf16", "bf16", 3.3)
    _flower(case / "flower")
    (case / "flower" / "tx_h4.tsv").write_text("100 0\n140 280000000\n")  # the server, behind host 4's link
    result = summarise(tmp_path / "runs", 0.88, [])
    fp32 = result["overhead"]["lora7b_100mbit"]["unify"]
    assert fp32["floor_bytes"] == pytest.approx(1.5 * 4 * 8388608)  # 2 (W-1)/W x the adapter
    assert fp32["floor_s"] == pytest.approx(1.5 * 4 * 8388608 * 8 / 100e6)  # 4.03 s
    assert fp32["median_unify_s"] == pytest.approx(4.4)  # the slowest owner's
    assert fp32["rounds"][0]["wall_s"] == pytest.approx(5.4)  # first owner's step to the last unify end
    assert fp32["rounds"][0]["train_s"] == pytest.approx(0.2)
    assert fp32["median_overhead_s"] == pytest.approx(5.2)
    assert fp32["median_tx_bytes_h3"] == pytest.approx(54_000_000 * 5.4 / 10)
    assert result["targets"]["lora_unify_over_floor_fp32"]["met"] is True  # 4.4 / 4.03 = 1.09
    assert result["targets"]["lora_unify_over_floor_bf16"]["met"] is False  # 3.3 / 2.01 = 1.64
    bf16_floor_s = 1.5 * 2 * 8388608 * 8 / 100e6
    assert result["targets"]["lora_unify_over_floor_bf16"]["value"] == pytest.approx(3.3 / bf16_floor_s)
    flower = result["overhead"]["lora7b_100mbit"]["flower"]
    assert flower["median_tx_bytes_h4"] == 140_000_000  # 20 s of a 40 s window
    ratios = result["overhead_ratios"]["lora7b_100mbit"]
    assert ratios["overhead_unify_over_flower"] == pytest.approx(5.2 / 13.0)
    assert "overhead_unify_ffa_over_flower" not in ratios  # no lora_ffa run here


def test_ddp_summary_sets_unify_dist_against_ddp(tmp_path: Path, capsys) -> None:
    """benchmarks/time_to_accuracy.py summary (launch/netns_time_to_accuracy.sh's): each one's time to target."""
    from benchmarks.time_to_accuracy import main

    _unify(tmp_path / "unify")  # rounds end at 108, 118, 128 with 0.5, 0.7, 0.9; launched at 90
    (tmp_path / "unify" / "output.log").write_text("95.0 owner data: 2 owners\n")
    epochs = [{"epoch": e + 1, "test_acc": 0.8 + 0.05 * e, "time": 150 + 30 * e, "started": 100.0, "train_s": 28.0}
              for e in range(3)]  # fmt: skip
    _run(tmp_path / "ddp", "ddp", 90.0, {"metrics.jsonl": epochs}, {})
    out = tmp_path / "summary.json"
    assert main(["summary", "--unify", str(tmp_path / "unify"), "--ddp", str(tmp_path / "ddp"), "--target", "0.88",
                 "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["unify"]["launch_to_target_s"] == pytest.approx(38.0)  # round 3 at 128
    assert result["ddp"]["launch_to_target_s"] == pytest.approx(120.0)  # epoch 3 (0.90) at 210
    assert result["ratio_launch_to_target"] == pytest.approx(38 / 120)
    assert "summary:" in capsys.readouterr().out
