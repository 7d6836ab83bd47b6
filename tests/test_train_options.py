"""Local training knobs for skewed owners: the learning-rate schedule over rounds and a cap on local steps."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from unify_dist.config import TrainConfig
from unify_dist.data import Split
from unify_dist.train import absent_class_scale, epoch_generator, round_lr, train_epoch


def test_cosine_schedule_is_a_function_of_the_round() -> None:
    cfg = TrainConfig(lr=0.1, max_rounds=10, lr_schedule="cosine")
    lrs = [round_lr(cfg, r) for r in range(1, 11)]
    assert lrs[0] == 0.1 and lrs == sorted(lrs, reverse=True) and 0 < lrs[-1] < 0.01
    assert math.isclose(round_lr(cfg, 6), 0.05)  # halfway
    assert round_lr(dataclasses.replace(cfg, lr_schedule="constant"), 7) == 0.1


@pytest.mark.parametrize("max_steps,expected", [(0, 4), (2, 2), (9, 4)])
def test_train_epoch_stops_after_max_steps(max_steps: int, expected: int) -> None:
    torch.manual_seed(0)
    data = Split(torch.randn(100, 5), torch.randint(0, 3, (100,)))
    model = nn.Linear(5, 3)
    steps = []
    train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), data, 32, epoch_generator(0, 1, 0, 0),
                on_batch=lambda: steps.append(1), max_steps=max_steps)  # fmt: skip
    assert len(steps) == expected  # 100 images in batches of 32: 4 batches in a whole epoch


@pytest.mark.parametrize("key,value", [("lr_schedule", "step"), ("local_steps", -1), ("absent_class_scale", 1.5)])
def test_config_refuses_bad_training_knobs(key: str, value) -> None:
    problems = dataclasses.replace(TrainConfig(), **{key: value}).problems()
    assert len(problems) == 1 and key in problems[0]


def test_absent_class_scale_touches_only_missing_classes() -> None:
    labels = torch.tensor([0, 2, 2, 4])
    assert absent_class_scale(labels, 5, 1.0) is None  # off: the loss sees the plain logits
    assert torch.equal(absent_class_scale(labels, 5, 0.5), torch.tensor([1.0, 0.5, 1.0, 0.5, 1.0]))


def test_local_metrics_off_records_none_not_zero() -> None:
    from unify_dist.app.config import RunConfig
    from unify_dist.app.loop import _record

    # n_train, loss, local val c/t (0/0: not measured), unified val c/t, unify_s, then 4 x 2 per-class counts
    row = [100.0, 0.5, 0.0, 0.0, 8.0, 10.0, 0.01, 0, 0, 0, 0, 4, 3, 5, 5]
    record = _record(RunConfig(), 1, [row], ["ab"], [], n_classes=2)
    assert record["owners"][0]["local_val_acc"] is None and record["owners"][0]["unified_val_acc"] == 0.8
    assert record["unified_test_acc"] == 0.7
