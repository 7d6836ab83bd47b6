"""data.factory: the owner's own function builds its datasets; bad factory strings are one line and exit 2.

The factory modules are written by the tests into a scratch folder put on PYTHONPATH, as a user would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.test_bad_input import assert_one_clear_line, assert_workers_said
from tests.world import cli, torchrun
from unify_dist.config import DataConfig
from unify_dist.data import Owner, Split, Stream, dataset_problems, load_factory, load_owner_data
from unify_dist.errors import UserError

FACTORY = '''
import torch
from torch.utils.data import Dataset, TensorDataset
from unify_dist.data import OwnerDatasets

CLASSES = ["top", "middle", "bottom"]


class Bars(Dataset):
    """Items made from the index: a bright band at the class's height, in seeded noise (never held in memory)."""

    def __init__(self, n, offset):
        self.n, self.offset = n, offset

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.offset + i)
        c = int(torch.randint(0, 3, (), generator=g))
        x = torch.randn(1, 8, 8, generator=g)
        x[0, 2 * c : 2 * c + 3] += 1.0
        return x, c


def owner_data(owner):
    base = 100_000 * owner.rank  # owners hold different items
    return OwnerDatasets(Bars(160, base), Bars(40, base + 10_000), Bars(40, base + 20_000), CLASSES)


def tabular(owner):
    g = torch.Generator().manual_seed(owner.rank)
    x = torch.randn(90, 12, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return OwnerDatasets(TensorDataset(x[:60], y[:60]), TensorDataset(x[60:75], y[60:75]),
                         TensorDataset(x[75:], y[75:]), ["low", "mid", "high"])


def wrong(owner):
    return {"train": []}


def unlabelled(owner):
    ds = TensorDataset(torch.zeros(4, 3))
    return OwnerDatasets(ds, ds, ds, ["a"])


def broken(owner):
    raise FileNotFoundError(f"/nowhere/{owner.name}.csv")


raise_on_import = None
'''


@pytest.fixture(scope="module")
def factory_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the factory module `ufac` (and `ufac_0`, a copy only owner 0 has)."""
    folder = tmp_path_factory.mktemp("factories")
    (folder / "ufac.py").write_text(FACTORY)
    (folder / "ufac_0.py").write_text(FACTORY)
    (folder / "ufac_bad_import.py").write_text("import no_such_module_anywhere\n")
    return folder


@pytest.fixture
def on_path(factory_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(factory_dir))
    for name in ("ufac", "ufac_0"):
        sys.modules.pop(name, None)
    return factory_dir


OWNER0 = Owner(0, 2, 0, "owner0")
CPU = torch.device("cpu")


def test_streamed_and_in_memory_factories(on_path: Path) -> None:
    streamed = load_owner_data(DataConfig(factory="ufac:owner_data", workers=1), OWNER0, CPU)
    assert isinstance(streamed.train, Stream) and streamed.train.workers == 1
    assert streamed.in_shape == (1, 8, 8) and (streamed.in_channels, streamed.image_size) == (1, 8)
    assert streamed.classes == ["top", "middle", "bottom"] and len(streamed.train) == 160
    assert set(streamed.train.labels().tolist()) == {0, 1, 2}
    tab = load_owner_data(DataConfig(factory="ufac:tabular"), OWNER0, CPU)
    assert isinstance(tab.train, Split) and tab.in_shape == (12,)
    assert (tab.in_channels, tab.image_size) == (12, 1)  # the mlp's flat input: 12 * 1 * 1


def test_rank_and_owner_are_replaced(on_path: Path) -> None:
    assert load_factory("ufac_{rank}:owner_data", OWNER0).__module__ == "ufac_0"
    with pytest.raises(UserError, match=r"'ufac_\{rank\}:owner_data' \('ufac_1:owner_data' on owner 1\)"):
        load_factory("ufac_{rank}:owner_data", Owner(1, 2, 0, "owner1"))
    assert load_factory("ufac_{owner}:owner_data", Owner(0, 2, 0, "0")).__module__ == "ufac_0"


@pytest.mark.parametrize(
    "spec,phrase",
    [
        ("no_such_pkg_xyz.data:fn", "cannot import module 'no_such_pkg_xyz.data' (ModuleNotFoundError"),
        ("ufac_bad_import:fn", "cannot import module 'ufac_bad_import' (ModuleNotFoundError"),
        ("ufac:missing", "module 'ufac' has no function 'missing'"),
        ("ufac:CLASSES", "module 'ufac' has no function 'CLASSES'"),
        ("ufac:wrong", "returned dict; return unify_dist.data.OwnerDatasets(train, val, test, classes)"),
        ("ufac:unlabelled", "a train item is (Tensor); each item must be (input tensor, class index int)"),
        ("ufac:broken", "failed on owner 0 (FileNotFoundError: /nowhere/owner0.csv); fix the factory"),
    ],
)
def test_bad_factory_is_a_user_error(on_path: Path, spec: str, phrase: str) -> None:
    with pytest.raises(UserError) as err:
        load_owner_data(DataConfig(factory=spec), OWNER0, CPU)
    assert phrase in str(err.value) and "\n" not in str(err.value) and f"'{spec}'" in str(err.value)


def test_factory_string_must_name_module_and_function() -> None:
    for bad in ("ufac", "ufac:", ":owner_data"):
        assert any("is not 'module.path:function'" in p for p in DataConfig(factory=bad).problems())
    ignored = DataConfig(factory="ufac:x", dataset="ignored", partition="ignored")
    assert ignored.problems() == [] and dataset_problems(ignored) == []  # both ignored


# Through the real CLI (one owner, no torchrun): each case is one line on stderr and exit code 2.
CLI_CASES = {
    "not module:function": ("ufac", "is not 'module.path:function'"),
    "module missing": ("no_such_pkg_xyz:fn", "cannot import module 'no_such_pkg_xyz'"),
    "function missing": ("ufac:missing", "has no function 'missing'"),
    "wrong return type": ("ufac:wrong", "returned dict"),
}


@pytest.fixture(scope="module")
def cli_outcomes(factory_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("runs")

    def one(case: str) -> subprocess.CompletedProcess:
        spec = CLI_CASES[case][0]
        args = ["train", "--set", f"data.factory={spec}", "--set", f"output.dir={run_dir / case.replace(' ', '_')}"]
        return cli(args, env={"PYTHONPATH": str(factory_dir)})

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CLI_CASES, pool.map(one, CLI_CASES)))


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_factory_through_cli(case: str, cli_outcomes: dict) -> None:
    assert_one_clear_line(cli_outcomes[case], CLI_CASES[case][1])


@pytest.mark.slow
def test_factory_missing_on_one_owner_stops_both(factory_dir: Path, tmp_path: Path) -> None:
    """Only owner 0 has ufac_0: owner 1's import fails, and both owners stop with one line each."""
    proc = torchrun(["train", "--set", "data.factory=ufac_{rank}:owner_data", "--set", f"output.dir={tmp_path}"],
                    env={"PYTHONPATH": str(factory_dir)})  # fmt: skip
    assert_workers_said(proc, "")  # one whole line per worker that spoke, no traceback of ours
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("unify-dist: error:")]
    assert any("cannot import module 'ufac_1'" in ln for ln in ours) or any("rank(s) [1]" in ln for ln in ours), ours
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_factory_dataset_trains_through_torchrun(factory_dir: Path, tmp_path: Path) -> None:
    """Two owners, each with its own in-memory tabular data from the factory: trains, unifies, learns."""
    proc = torchrun([
        "train", "--set", "data.factory=ufac:tabular", "--set", "model.name=mlp", "--set", "train.max_rounds=3",
        "--set", "train.batch_size=16", "--set", "train.lr=0.01", "--set", f"output.dir={tmp_path}",
    ], env={"PYTHONPATH": str(factory_dir)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and len({o["digest"] for o in records[-1]["owners"]}) == 1
    assert [o["n_train"] for o in records[-1]["owners"]] == [60, 60]
    assert records[-1]["unified_test_acc"] > 0.6  # chance is about 1/3 (labels 0/1/2 at 1/4, 1/2, 1/4)
