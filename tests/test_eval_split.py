"""The unified test accuracy is the whole test set's, though each owner evaluates only its shard of it.

Every owner holds the same unified weights (digests prove it), so the test set is split between owners
(data.py: disjoint shards, together the whole test subset) and their integer correct/total counts are summed
in the metrics gather: the whole set's figure for 1/W of the work per owner. Here through the real program
(forked ranks in one real gloo group, torchrun's worker environment), 2 and 3 owners on 1,001 test images, so
the shards are unequal (501/500, 334/334/333), and with trust on (the gather sealed through the ring). The
reference is the same final model evaluated on the whole subset in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_trust_run import _keys, _trust
from tests.world import cli_world, merged
from unify_dist.app.config import load_config
from unify_dist.data import Owner, load_owner_data
from unify_dist.models import build_model
from unify_dist.train import count_correct, per_class_correct

TEST_IMAGES = 1001  # divides by neither 2 nor 3
SMALL = ["--config", "configs/paper_v.toml", "--set", "data.train_per_owner=400", "--set", f"data.test_size={TEST_IMAGES}",
         "--set", "train.max_rounds=2", "--set", "output.progress=false"]  # fmt: skip


def _whole_test_set(run_dir: Path, owners: int):
    """The run's final unified model, the whole test subset, and every owner's shard size."""
    cfg = load_config("configs/paper_v.toml", [s for s in SMALL[3::2]])
    whole = load_owner_data(cfg.data, Owner(0, 1, cfg.train.seed, "all"), torch.device("cpu"))
    shards = [len(load_owner_data(cfg.data, Owner(r, owners, cfg.train.seed, f"rank{r}"), torch.device("cpu")).test)
              for r in range(owners)]  # fmt: skip
    final = torch.load(run_dir / "final.pt", weights_only=True)
    model = build_model(cfg.model, whole.in_shape, whole.num_classes)
    model.load_state_dict(final["model"])
    return model, whole, shards


@pytest.mark.slow
@pytest.mark.parametrize("owners,trust", [(2, False), (3, False), (3, True)], ids=["2-owners", "3-owners", "3-owners-trust"])
def test_split_test_accuracy_is_the_whole_test_sets_exactly(tmp_path: Path, data_root, owners: int, trust: bool) -> None:
    run_dir = tmp_path / "run"
    sets = _trust(tmp_path, _keys(tmp_path, [f"owner{i}" for i in range(owners)])) if trust else []
    proc = merged(cli_world(["train", *SMALL, *sets, "--set", f"output.dir={run_dir}"], owners))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert len({o["digest"] for o in last["owners"]}) == 1

    model, whole, shards = _whole_test_set(run_dir, owners)
    assert sum(shards) == len(whole.test) == TEST_IMAGES and len(set(shards)) == 2  # unequal shards, the whole set
    assert f"{shards[0]} test images (rank 0)" in proc.stdout  # rank 0 evaluated its shard, not the whole set
    correct, total = count_correct(model, whole.test)
    assert last["unified_test_acc"] == correct / total  # the same number, not a close one
    per_class, per_total = per_class_correct(model, whole.test, whole.num_classes)
    assert last["per_class"]["unified"] == [c / t for c, t in zip(per_class, per_total)]
    assert 0.3 < last["unified_test_acc"] < 1  # it learned something (chance is 0.1): a real comparison
