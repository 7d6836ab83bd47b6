"""experiments.overlap_starts: an overlapped run's unified state and each owner's own weights x (where its next
round starts), read back from the run's checkpoints. Checked against the program itself: after the last round
the run's final model is the avg unify of every owner's x, so the mean of the x read back must be that model.
Bad input: one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experiments import overlap_starts
from tests.world import cli_world, merged
from unify_dist.config import ModelConfig
from unify_dist.flat import FlatState
from unify_dist.models import build_model


@pytest.mark.slow
def test_owners_own_weights_average_to_the_final_model(tmp_path: Path, data_root, capsys) -> None:
    out = tmp_path / "run"
    args = ["train", "--config", "configs/demo_cpu.toml", "--set", "data.train_per_owner=600", "--set",
            "data.test_size=400", "--set", "train.threads=1", "--set", "output.progress=false", "--set",
            "unify.overlap=true", "--set", "train.local_steps=6", "--set", "train.max_rounds=2",
            "--set", f"output.dir={out}"]  # fmt: skip
    proc = merged(cli_world(args, 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the one-round-late update then oscillates" in proc.stdout  # defaults: the advice for label-skewed owners

    found = overlap_starts.starts(out, 2)
    assert not isinstance(found, str), found
    unified, own = found
    assert len(own) == 2 and not torch.equal(own[0], own[1])  # each owner keeps its own unsent progress
    model = build_model(ModelConfig(name="paper_cnn"), (1, 28, 28), 10)
    model.load_state_dict(unified)
    flat = FlatState(model)
    assert not torch.equal(flat.values, own[0])  # x is not the unified state the model holds between rounds
    flat.values.copy_((own[0] + own[1]) / 2)
    final = torch.load(out / "final.pt", weights_only=True)["model"]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, final[name], rtol=0, atol=1e-6)

    assert overlap_starts.main([str(out), "--round", "2"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert [r.split(" all ")[0].strip() for r in rows] == ["unified a_2", "owner 0's own x", "owner 1's own x"]


def test_missing_or_blocking_checkpoints_are_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    assert overlap_starts.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint" in err[0] and "round_00030.pt" in err[0]
    for rank in (0, 1):  # a blocking run's checkpoints: a unifier state without the overlapped one's fields
        (tmp_path / "checkpoints" / f"rank{rank}").mkdir(parents=True)
        torch.save({"model": {}, "unifier": {}}, tmp_path / "checkpoints" / f"rank{rank}" / "round_00003.pt")
    assert overlap_starts.main([str(tmp_path), "--round", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not from a run with unify.overlap = true" in err[0]


@pytest.mark.parametrize("argv", [["--round", "x", "d"], []])
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        overlap_starts.main(argv)
    assert e.value.code == 2
