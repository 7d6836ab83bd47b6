"""paper_cnn with the pool before its ReLU against the paper's order (conv, ReLU, pool): speed in one run.

    python -m benchmarks.pool_relu [--repeats 5] [--steps 100] [--threads 1]

The two orders compute the same bits (tests/test_models.py), so only time differs. Both models start from the
same weights on the same Fashion-MNIST images (synthetic ones if the data set is not there); each repeat times
`--steps` Adam steps of batch 64 (`train_epoch`, as an owner trains) and `count_correct` over 5,000 images
(batches of 128, as the unified model is evaluated) for each order, alternating, and the medians' ratios are
printed (> 1: pool-then-ReLU is faster).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from unify_dist.config import ModelConfig
from unify_dist.data import Split
from unify_dist.models import build_model
from unify_dist.train import count_correct, make_optimizer, train_epoch
from unify_dist.app.config import RunConfig

__all__ = ["main"]


def _images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's first n training images, normalised as the owners hold them, or zero-background noise."""
    try:
        from unify_dist.app.config import load_config
        from unify_dist.data import Owner, load_owner_data

        cfg = load_config("configs/paper_v.toml", [f"data.train_per_owner={n}"])
        data = load_owner_data(cfg.data, Owner(0, 1, 0, "bench"), torch.device("cpu"))
        return data.train.x[:n], data.train.y[:n]
    except Exception:  # no data set here: the timing does not depend on the values
        return torch.relu(torch.randn(n, 1, 28, 28)) * (torch.rand(n, 1, 28, 28) < 0.5), torch.randint(0, 10, (n,))


def _papers_order(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    f = ref.features
    ref.features = nn.Sequential(f[0], f[2], f[1], f[3], f[5], f[4])
    return ref


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.pool_relu", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="Adam steps of batch 64 per timed training sample")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = _images(max(5000, 64 * args.steps))
    train, test = Split(x[: 64 * args.steps], y[: 64 * args.steps]), Split(x[:5000], y[:5000])
    ours = build_model(ModelConfig(name="paper_cnn"), (1, 28, 28), 10)
    models = {"pool, ReLU": ours, "ReLU, pool (paper)": _papers_order(ours)}
    train_cfg = RunConfig().train
    optims = {k: make_optimizer(m, train_cfg) for k, m in models.items()}
    rates: dict[str, dict[str, list[float]]] = {k: {"train": [], "eval": []} for k in models}
    for repeat in range(args.repeats + 1):  # the first is a warm-up
        for name, model in models.items():
            t = time.perf_counter()
            train_epoch(model, optims[name], train, 64, torch.Generator().manual_seed(repeat))
            train_rate = len(train) / (time.perf_counter() - t)
            t = time.perf_counter()
            count_correct(model, test)
            eval_rate = len(test) / (time.perf_counter() - t)
            if repeat:
                rates[name]["train"].append(train_rate)
                rates[name]["eval"].append(eval_rate)
    same = all(torch.equal(a, b) for a, b in zip(*(m.state_dict().values() for m in models.values())))
    print(f"paper_cnn, {args.threads} thread(s), {args.repeats} repeats, medians (images/s); weights still equal: {same}")
    for part in ("train", "eval"):
        new, old = (statistics.median(rates[k][part]) for k in models)
        print(f"  {part:5s}  pool, ReLU {new:7.0f}   ReLU, pool (paper) {old:7.0f}   ratio {new / old:.3f}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
