"""The examples run as a user would run them: own_loop.py under torchrun, the tabular owner package through
the CLI with its data and model factories, and paper_rules.py's rule against the signed absmax."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

import unify_dist as ud
from examples.paper_rules import absmax_literal
from tests.conftest import REPO
from tests.world import cli, run_world, torchrun
from unify_dist.app.config import load_config
from unify_dist.errors import UserError
from unify_dist.rules import absmax

EXAMPLES = REPO / "examples"
TABULAR = EXAMPLES / "tabular"
LINE = re.compile(r"owner (\d+) round (\d+) digest (\w+) local_acc ([\d.]+) unified_acc ([\d.]+)")


# ------------------------------------------------------------------ (a) a plain loop, three lines of unify_dist


def test_own_loop_uses_only_public_names():
    """The example is the public API's showcase: every `ud.X` it touches is in ud.__all__."""
    tree = ast.parse((EXAMPLES / "own_loop.py").read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "ud"}
    assert {"same_start", "Unifier"} <= used <= set(ud.__all__)
    private = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("unify_dist")]
    assert not private, "own_loop.py should import only `unify_dist as ud`"


@pytest.mark.slow
def test_own_loop_under_torchrun_agrees_every_round_and_learns(tmp_path):
    rounds = 5
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(EXAMPLES / "own_loop.py"), "--rounds", str(rounds), "--save", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = {(int(o), int(r)): (d, float(acc)) for o, r, d, _, acc in LINE.findall(proc.stdout)}
    assert set(seen) == {(o, r) for o in (0, 1) for r in range(1, rounds + 1)}, proc.stdout
    digests = [seen[0, r][0] for r in range(1, rounds + 1)]
    assert digests == [seen[1, r][0] for r in range(1, rounds + 1)]  # one model on both owners, every round
    assert len(set(digests)) == rounds  # and it moved every round
    assert min(seen[o, rounds][1] for o in (0, 1)) >= 0.9  # digits: a sensible model after 5 epochs
    # Independently of the digests: the saved weights are equal bit for bit, BatchNorm statistics included.
    mine, theirs = (torch.load(tmp_path / f"owner{r}.pt") for r in (0, 1))
    assert list(mine) == list(theirs) and any("running_mean" in k for k in mine)
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    assert mine["1.num_batches_tracked"].item() > 0 and mine["1.running_var"].ne(1).any()


# ------------------------------------------------------------------ (b) an owner package through the CLI


@pytest.mark.slow
def test_tabular_owner_package_through_the_cli(tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(TABULAR), os.environ.get("PYTHONPATH", "")]),
           "TABULAR_OWNER_DATA": str(tmp_path / "owners")}  # fmt: skip
    split = subprocess.run([sys.executable, "-m", "tabular_owner.split", "--owners", "2"], capture_output=True,
                           text=True, timeout=120, env={**os.environ, **env})  # fmt: skip
    assert split.returncode == 0, split.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "owners").iterdir()) == ["owner0.npz", "owner1.npz"]
    rounds = 6
    proc = torchrun(["train", "--config", str(TABULAR / "owners.toml"), "--set", f"train.max_rounds={rounds}",
                     "--set", f"output.dir={tmp_path / 'run'}"], env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    for r in records:  # both owners hold the same unified model after every round
        assert [o["digest"] for o in r["owners"]] == [r["digest"]] * 2
    assert records[-1]["unified_test_acc"] >= 0.85  # breast cancer rows: far above the 63% majority class
    model = torch.load(tmp_path / "run" / "final.pt", weights_only=False)["model"]
    assert model["0.weight"].shape == (32, 30)  # tabular_owner.model:build, on 30 features, not paper_cnn


# ------------------------------------------------------------------ (c) the paper's equation (6), literally


def test_absmax_literal_is_the_signed_absmax_without_its_sign():
    stacked = torch.tensor([[1.0, -3.0, 2.0, -0.5, 0.0], [-2.0, 1.0, -2.0, 0.25, -0.0]])
    weights = torch.ones(2)
    signed = absmax(stacked, weights)
    assert signed.tolist() == [-2.0, -3.0, 2.0, -0.5, 0.0]
    assert absmax_literal(stacked, weights).tolist() == [2.0, 3.0, 2.0, 0.5, 0.0]
    torch.testing.assert_close(absmax_literal(stacked, weights), signed.abs(), rtol=0, atol=0)
    assert ud.RULES["absmax_literal"] is absmax_literal


def _unify_literal(rank: int, world_size: int) -> list[float]:
    model = nn.Linear(3, 1, bias=False)
    ud.same_start(model)
    unifier = ud.Unifier(model, rule="absmax_literal")
    with torch.no_grad():  # after the start, each owner's own weights: signs and magnitudes differ by rank
        model.weight.copy_(torch.tensor([[1.0, -3.0, 0.5]]) * (1 if rank == 0 else -2))
    unifier.unify(weight=1.0)  # collective: the gather path runs the registered reference
    return model.weight.flatten().tolist()


def test_absmax_literal_runs_distributed_through_the_gather_path():
    assert run_world(_unify_literal, 2) == [[2.0, 6.0, 1.0]] * 2  # max |w| over owners: 1 vs 2, 3 vs 6, 0.5 vs 1


def test_imports_key_makes_the_rule_validate(tmp_path):
    config = tmp_path / "literal.toml"
    config.write_text('imports = ["examples.paper_rules"]\n\n[unify]\nrule = "absmax_literal"\ncompare = ["absmax"]\n')
    cfg = load_config(config)
    assert cfg.imports == ["examples.paper_rules"] and cfg.unify.rule == "absmax_literal"
    with pytest.raises(UserError, match=r"^imports: cannot import module 'examples\.nope' \(.*\); install"):
        load_config(config, ["imports=examples.nope"])


def test_without_imports_the_rule_is_unknown_and_with_them_it_is_not(tmp_path):
    """In fresh processes (here the rule is already registered): the CLI needs `imports` to know it."""
    common = ["train", "--set", "unify.rule=absmax_literal", "--set", "train.max_rounds=0"]  # 0: stop at validation
    env = {"PYTHONPATH": str(REPO)}  # `examples` importable wherever pytest was started
    runs = [common, [*common, "--set", "imports=examples.paper_rules"]]
    with ThreadPoolExecutor(2) as pool:  # each spends its time importing torch: side by side is quicker
        without, with_ = pool.map(lambda args: cli(args, env=env), runs)
    assert without.returncode == 2 and "unify.rule = 'absmax_literal' is not known" in without.stderr
    assert with_.returncode == 2 and "absmax_literal" not in with_.stderr  # only max_rounds is wrong now
    assert "train.max_rounds must be > 0" in with_.stderr
