"""The baseline unify-dist is measured against: DistributedDataParallel, gradients all_reduced every step.

    torchrun ... -m benchmarks.ddp_baseline --config configs/paper_v.toml --target 0.88 --out DIR

Everything but the synchronisation is unify-dist's own: config and --set, process group, each rank's data
share (the owner's share in unify-dist), model, optimizer, epoch order, accuracy counts. After every epoch
the test accuracy (every rank's correct/total counts summed, as unify-dist's unified_test_acc) is appended
to DIR/metrics.jsonl; training stops at the target or after train.max_rounds epochs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from unify_dist.app.checkpoint import MetricsLog
from unify_dist.app.config import RunConfig, load_config
from unify_dist.app.console import Reporter
from unify_dist.distributed import Context, all_gather_floats, init_context, shutdown, stage
from unify_dist.errors import UserError
from unify_dist.flat import FlatState
from unify_dist.app.loop import load_data
from unify_dist.app.owners import agree_on_owners
from unify_dist.models import build_model
from unify_dist.train import count_correct, epoch_generator, make_optimizer, round_lr, set_lr, train_epoch
from unify_dist.collectives import verify_identical

__all__ = ["train_ddp", "main"]


def train_ddp(cfg: RunConfig, ctx: Context, target: float, out_dir: Path) -> list[dict]:
    """Train with DDP until test accuracy >= target (0: never) or train.max_rounds epochs; return the records."""
    out = Reporter(ctx.rank, progress=False)
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // ctx.local_world_size))  # as loop.py
    torch.manual_seed(cfg.train.seed)
    members = agree_on_owners(cfg.train, ctx, out.info)  # collective: owners by name, as unify-dist has them
    data = load_data(cfg, ctx, members)  # unify-dist's own: the same share per rank
    batches = [int(n) for (n,) in all_gather_floats([-(-len(data.train) // cfg.train.batch_size)], ctx)]  # collective
    if len(set(batches)) > 1:  # DDP all_reduces once per step: a rank with fewer steps leaves the others waiting
        raise UserError(f"DDP needs the same number of batches on every rank, got {batches}; use data.partition = iid")
    model = build_model(cfg.model, data.in_channels, data.num_classes, data.image_size).to(ctx.device)
    flat = FlatState(model)  # the same views unify-dist uses, so the identity check below is the same proof
    ddp = DistributedDataParallel(model)  # broadcasts rank 0's initial weights (collective)
    optimizer = make_optimizer(model, cfg.train)
    metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=ctx.is_main)  # rank 0 writes and fsyncs, as unify-dist
    if ctx.is_main:
        metrics.path.unlink(missing_ok=True)  # a fresh run: no resume
    out.info(f"ddp baseline: {ctx.world_size} ranks, {len(data.train)} train images each, target {target:.2%}")
    records, started = [], time.time()
    for epoch in range(1, cfg.train.max_rounds + 1):
        t0 = time.perf_counter()
        set_lr(optimizer, round_lr(cfg.train, epoch))  # train.lr_schedule, epoch for round (constant: cfg.train.lr)
        g = epoch_generator(cfg.train.seed, epoch, members.index, 0)  # unify-dist's order for round `epoch`
        with stage(f"DDP epoch {epoch}", ctx):
            loss = train_epoch(ddp, optimizer, data.train, cfg.train.batch_size, g)  # all_reduce every step
        train_s = time.perf_counter() - t0
        with stage(f"buffers after epoch {epoch}", ctx):
            # DDP sends rank 0's buffers at the start of each forward, so after the last step every rank holds
            # its own BatchNorm statistics (resnet18 failed the identity check below); send them once more.
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)  # collective
        correct, total = count_correct(model, data.test)
        counts = torch.tensor([correct, total, loss], dtype=torch.float64, device=ctx.device)
        with stage(f"test counts in epoch {epoch}", ctx):
            dist.all_reduce(counts)  # collective: every rank gets the same accuracy, so the same stop decision
            digests = verify_identical(flat)  # collective: DDP must keep every rank's weights identical
        acc = counts[0].item() / max(counts[1].item(), 1)
        record = {
            "epoch": epoch,
            "test_acc": acc,
            "loss": counts[2].item() / ctx.world_size,
            "time": time.time(),
            "train_s": train_s,
            "started": started,
            "digests": digests,
        }
        records.append(record)
        metrics.append(record)
        out.info(f"epoch {epoch:3d}  test {acc:.2%}  train {train_s:.1f} s  digest {digests[0]}")
        if target and acc >= target:
            out.info(f"reached {target:.2%} test accuracy in epoch {epoch}")
            break
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.ddp_baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML config file, e.g. configs/paper_v.toml (defaults if omitted)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")
    parser.add_argument("--target", type=float, default=0.0, help="stop at this test accuracy (0: never)")
    parser.add_argument("--out", default="runs/ddp_baseline", help="where metrics.jsonl goes")
    args = parser.parse_args(argv)
    try:
        if not 0 <= args.target <= 1:
            raise UserError(f"--target is a fraction in [0, 1], got {args.target}; e.g. --target 0.88")
        cfg = load_config(args.config, args.set)  # validated before any process group exists
        ctx = init_context(cfg.dist)
        try:
            train_ddp(cfg, ctx, args.target, Path(args.out))
        finally:
            shutdown()
        return 0
    except UserError as e:  # as the CLI: a user's mistake is one line and exit 2, a failed run one line and exit 1
        _say(f"unify-dist: error: {e}")
        return 2
    except Exception as e:
        if os.environ.get("UNIFY_DIST_DEBUG"):
            traceback.print_exc()
        where = f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""
        _say(f"unify-dist: run failed{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return 1


def _say(line: str) -> None:
    sys.stderr.write(line.replace("\n", " ") + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    raise SystemExit(main())
