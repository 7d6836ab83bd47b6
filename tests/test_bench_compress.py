"""benchmarks/compress_links.py (`make bench-compress`): its wire clock on a real gloo group (loopback,
paper_cnn, one round: the calls each mode makes) and its summary on known records. The link itself
is the benchmark's, run as root over network namespaces."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from benchmarks.compress_links import MODES, WireClock, measure, rate_bits, summarise
from tests.world import run_world
from unify_dist import exchange


def test_rate_bits_reads_tcs_notation() -> None:
    assert rate_bits("20mbit") == 20e6 and rate_bits("512kbit") == 512e3 and rate_bits("1Gbit") == 1e9
    with pytest.raises(ValueError, match="20mbit"):
        rate_bits("20 MB/s")


def _measure(rank: int, world: int) -> tuple[dict, bool]:
    records = measure("paper_cnn", 1, "no_such_dev")
    restored = dist.all_reduce.__name__ == "all_reduce" and exchange.all_gather.__name__ == "all_gather"
    return records, restored


def test_wire_clock_counts_each_modes_calls_on_a_real_group() -> None:
    for records, restored in run_world(_measure, 2):
        assert restored  # the clock puts the originals back
        calls = {mode: rows[0][2] for mode, rows in records.items()}
        assert calls == {"none": 1, "bf16": 1, "int8": 2}  # int8: the scales' MAX, then the int8 sum
        for rows in records.values():
            unify_s, wire_s, _, tx, estimated = rows[0]
            assert 0 < wire_s <= unify_s and tx == -1 and estimated > 0


def test_summary_takes_the_slowest_owner_and_judges_the_ratios() -> None:
    def owner(times: dict[str, list[float]]) -> dict:
        return {m: [[t, t - 0.5, 1, 2.5e6, 1e6] for t in times[m]] for m in MODES}

    a = owner({"none": [20.0, 21.0, 22.0], "bf16": [10.0, 12.0, 11.0], "int8": [6.0, 7.0, 6.5]})
    b = owner({"none": [20.5, 20.0, 20.0], "bf16": [10.5, 10.0, 10.0], "int8": [6.5, 6.0, 6.0]})
    s = summarise([a, b], rate_bits("20mbit"))
    assert s["modes"]["none"]["unify_s_rounds"] == [20.5, 21.0, 22.0] and s["modes"]["none"]["unify_s"] == 21.0
    assert s["modes"]["bf16"]["unify_s"] == 11.0 and s["modes"]["none"]["link_floor_s"] == pytest.approx(1.0)
    assert s["ratios"]["bf16/none"] == {"ratio": pytest.approx(11 / 21), "target": 0.55, "met": True}
    assert s["ratios"]["int8/none"]["ratio"] == pytest.approx(6.5 / 21) and not s["ratios"]["int8/none"]["met"]
