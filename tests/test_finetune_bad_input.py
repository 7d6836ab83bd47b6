"""Fine-tuning mistakes through the real CLI: one line naming the value and the fix, exit code 2, before training.

The data is finetune_owner's synthetic images (examples/finetune, 5 classes); the models are built here.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch import nn

from tests.conftest import REPO
from tests.test_bad_input import assert_one_clear_line
from tests.world import cli


def wrong_size(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A model factory that forgets the class count: 4 outputs for 5 classes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), 4))


def right_size(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes))


HERE = "tests.test_finetune_bad_input"
CASES = {
    "output size": ([f"model.factory={HERE}:wrong_size"],
                    f"model.factory = '{HERE}:wrong_size' builds a model with output size 4, but the data has 5 classes"),
    "lora rule without adapters": ([f"model.factory={HERE}:right_size", "unify.rule=lora_exact"],
                                   "unify rule 'lora_exact' unifies LoRA adapters, and the model has none"),
    "pattern matching nothing": ([f"model.factory={HERE}:right_size", "unify.local=classifier.*"],
                                 "unify.local pattern 'classifier.*' matches no tensor of the model"),
}  # fmt: skip


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune_bad")
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "examples" / "finetune"), str(REPO)])}

    def run(case: str):
        sets = ["data.factory=finetune_owner.data:owner_data", "train.max_rounds=1", f"output.dir={tmp / case}",
                *CASES[case][0]]  # fmt: skip
        return cli(["train", *[a for s in sets for a in ("--set", s)]], env=env)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(CASES, pool.map(run, CASES)))


@pytest.mark.parametrize("case", CASES)
def test_finetune_mistake_is_one_line_and_exit_2(case, outcomes):
    assert_one_clear_line(outcomes[case], CASES[case][1])
