"""Config: TOML + --set overrides, typed, validated with messages that say what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from unify_dist.app.config import load_config
from unify_dist.errors import UserError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.train.max_rounds > 0


def test_paper_configs_match_the_paper() -> None:
    for name, partition in (("paper_v", "iid"), ("paper_h", "label_split")):
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml")
        assert (cfg.data.partition, cfg.train.batch_size, cfg.model.name) == (partition, 64, "paper_cnn")


def test_overrides_are_typed() -> None:
    cfg = load_config(None, ["train.lr=0.5", "unify.rule=max", "train.max_rounds=3", "unify.compare=avg,absmax"])
    assert (cfg.train.lr, cfg.unify.rule, cfg.train.max_rounds) == (0.5, "max", 3)
    assert cfg.unify.compare == ["avg", "absmax"]
    assert isinstance(load_config(None, ["train.lr=1"]).train.lr, float)  # ints are fine for floats


@pytest.mark.parametrize(
    "overrides,phrase",
    [
        (["train.lr=0"], "train.lr must be > 0"),
        (["unify.rule=avgg"], "did you mean 'avg'"),
        (["train.batchsize=3"], "unknown config key 'train.batchsize'"),
        (["train.max_rounds=abc"], "must be of type int"),
        (["train.lr"], "has no '='"),
        (["train.lr=-1", "train.batch_size=0"], "train.batch_size must be > 0"),  # every problem at once
    ],
)
def test_bad_values_are_refused(overrides: list[str], phrase: str) -> None:
    with pytest.raises(UserError, match=phrase.replace("(", r"\(")):
        load_config(None, overrides)
