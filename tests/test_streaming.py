"""Streamed datasets: a Stream trains exactly as the in-memory Split of the same items, and a streamed run
resumed after round 2 ends with the digest of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from tests.test_data_factory import FACTORY
from tests.world import cli_world, merged
from unify_dist.data import Split, Stream
from unify_dist.train import count_correct, epoch_generator, per_class_correct, train_epoch

X = torch.randn(203, 3, 6, 6, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (203,), generator=torch.Generator().manual_seed(1))


class Items(Dataset):
    """The same items as X, Y, one at a time (a plain Dataset: no tensors to slice, no targets to read)."""

    def __len__(self) -> int:
        return len(Y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return X[i], int(Y[i])


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(108, 16), nn.ReLU(), nn.Linear(16, 4))


def _train(data: Split | Stream, epochs: int = 2, max_steps: int = 0) -> tuple[nn.Module, list[float]]:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gens = [epoch_generator(7, 1, 0, e) for e in range(epochs)]
    losses = [train_epoch(model, opt, data, 16, g, max_steps=max_steps) for g in gens]
    return model, losses


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("max_steps", [0, 5])
def test_stream_trains_exactly_as_split(workers: int, max_steps: int) -> None:
    ref, ref_losses = _train(Split(X, Y), max_steps=max_steps)
    got, losses = _train(Stream(Items(), workers=workers), max_steps=max_steps)
    assert losses == ref_losses
    for a, b in zip(ref.parameters(), got.parameters(), strict=True):
        assert torch.equal(a, b)
    untrained = _model()
    assert not torch.equal(next(untrained.parameters()), next(got.parameters()))  # it really trained


def test_stream_counts_equal_split_counts() -> None:
    model, _ = _train(Split(X, Y), epochs=1)
    split, stream = Split(X, Y), Stream(Items(), eval_batch_size=50)  # batches of 50: a ragged last one
    assert count_correct(model, stream) == count_correct(model, split)
    assert per_class_correct(model, stream, 4) == per_class_correct(model, split, 4)
    assert count_correct(model, Stream(Subset(Items(), []))) == (0, 0)


def test_labels_read_once_or_from_targets() -> None:
    assert torch.equal(Stream(Items()).labels(), Y)  # one pass over the items
    held = TensorDataset(X, Y)
    assert torch.equal(Stream(Subset(held, [5, 2, 9])).labels(), Y[[5, 2, 9]])  # no item read
    assert Stream(Items()).in_shape == (3, 6, 6)


def test_streamed_epoch_leaves_global_rng_alone() -> None:
    torch.manual_seed(11)
    before = torch.get_rng_state()
    list(Stream(Items(), workers=1).batches(torch.randperm(len(Y), generator=torch.Generator()), 32, torch.Generator()))
    assert torch.equal(before, torch.get_rng_state())  # resume never has to restore it


def _run(tmp: Path, name: str, rounds: int, factory_dir: Path):
    proc = merged(cli_world([
        "train", "--set", "data.factory=ufac:owner_data", "--set", "data.workers=1", "--set", "model.name=mlp",
        "--set", f"train.max_rounds={rounds}", "--set", "train.batch_size=16", "--set", f"output.dir={tmp / name}",
    ], 2, env={"PYTHONPATH": str(factory_dir)}))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_streamed_resume_is_bit_identical(tmp_path: Path) -> None:
    """2 rounds, then the same run resumed to 3, against 3 rounds straight: the same round-3 digest."""
    (tmp_path / "ufac.py").write_text(FACTORY)
    _, straight = _run(tmp_path, "straight", 3, tmp_path)
    _run(tmp_path, "resumed", 2, tmp_path)
    proc, resumed = _run(tmp_path, "resumed", 3, tmp_path)
    assert "resumed from round 2" in proc.stdout + proc.stderr
    assert [r["round"] for r in resumed] == [1, 2, 3]
    assert [r["digest"] for r in resumed] == [r["digest"] for r in straight]
    assert len({r["digest"] for r in straight}) == 3  # every round changed the weights
    assert straight[-1]["unified_test_acc"] > 0.5  # chance is 1/3: the streamed items were learned
