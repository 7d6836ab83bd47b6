"""The round loop, as in the paper: same start; do { train locally; unify; evaluate } until every owner
reaches the target accuracy or the rounds run out.

Every rank runs this same function. Collectives are marked; none sits under a rank condition.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from unify_dist import faults
from unify_dist.attack import corrupt_
from unify_dist.checkpoint import Checkpointer, MetricsLog, save_atomic
from unify_dist.config import RunConfig
from unify_dist.consistency import check_consistency, fingerprint
from unify_dist.console import Reporter
from unify_dist.data import OwnerData, check_owner_count, load_owner_data, prepare_dataset
from unify_dist.distributed import Context, agree, all_gather_floats, stage
from unify_dist.errors import UserError
from unify_dist.flat import FlatState
from unify_dist.models import build_model
from unify_dist.privacy import dp_epsilon, dp_statement, privacy_statement
from unify_dist.prox import proximal_term
from unify_dist.scaffold import Scaffold
from unify_dist.train import (
    absent_class_scale,
    count_correct,
    epoch_generator,
    make_optimizer,
    per_class_correct,
    round_lr,
    set_lr,
    train_epoch,
)
from unify_dist.unify import Unifier, tail_size, verify_identical

__all__ = ["run", "load_data"]


def run(cfg: RunConfig, ctx: Context) -> list[dict[str, Any]]:
    """Train and unify for up to cfg.train.max_rounds rounds; returns the per-round records."""
    out = Reporter(ctx.rank, cfg.output.progress, cfg.output.all_ranks)
    run_dir = Path(cfg.output.dir)
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // ctx.local_world_size))
    torch.manual_seed(cfg.train.seed)
    out.info(
        f"unify-dist: {ctx.world_size} owners, backend {ctx.backend}, rule {cfg.unify.rule}, "
        f"{cfg.data.dataset}/{cfg.data.partition}, model {cfg.model.name}, run dir {run_dir}"
    )

    candidates = tuple(cfg.unify.compare) or AUTO_DEFAULT
    out.info(privacy_statement(cfg.unify.rule, ctx.world_size, cfg.unify.absmax_impl, candidates))
    releases = _releases_per_round(cfg)
    u = cfg.unify
    if u.dp_noise_multiplier > 0:
        out.info(dp_statement(u.dp_noise_multiplier, u.update_norm_bound, u.dp_delta, releases, cfg.train.max_rounds))
    if cfg.attack.owner >= ctx.world_size:
        raise UserError(
            f"attack.owner = {cfg.attack.owner} but there are only {ctx.world_size} owners "
            f"(ranks 0-{ctx.world_size - 1}); pick one of them, or -1 for no attack"
        )
    if cfg.attack.owner >= 0:
        out.info(f"attack simulation: owner {cfg.attack.owner} sends corrupted weights ({cfg.attack.kind}) from round {cfg.attack.from_round}")
    data = load_data(cfg, ctx)
    model = build_model(cfg.model, data.in_channels, data.num_classes, data.image_size).to(ctx.device)
    flat = FlatState(model, tail=tail_size(ctx.world_size, model))
    with stage("consistency check", ctx):
        check_consistency(fingerprint(cfg, model, data.classes), ctx.world_size)  # collective

    # Same start everywhere: rank 0's initial weights, then proven identical.
    with stage("broadcast initial weights", ctx):
        dist.broadcast(flat.buffer, src=0)  # collective
        dist.broadcast(flat.ints, src=0)
        verify_identical(flat)  # collective
    optimizer = make_optimizer(model, cfg.train)
    unifier = Unifier(flat, cfg.unify)
    scaffold = Scaffold(model) if cfg.train.scaffold else None
    ckpt = Checkpointer(run_dir, ctx.rank, cfg.output.keep_checkpoints, out.warn)
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=ctx.is_main)
    records: list[dict[str, Any]] = []
    start = _resume(cfg, ctx, ckpt, flat, model, optimizer, unifier, scaffold, records, out)
    metrics.keep_until(start)
    out.info(f"owner data: {len(data.train)} train, {len(data.val)} val, {len(data.test)} test images (rank 0)")

    for round_ in range(start + 1, cfg.train.max_rounds + 1):
        # 1. Train locally, on this owner's data only.
        loss = _train_locally(cfg, ctx, model, optimizer, data, round_, out, scaffold)
        if scaffold is not None:
            with stage(f"SCAFFOLD control variates in round {round_}", ctx):
                scaffold.end_round()  # collective
        if cfg.output.local_metrics:
            local_val = count_correct(model, data.val)
            local_pc = per_class_correct(model, data.test, data.num_classes)
        else:  # zero totals: recorded as "not measured"
            local_val, local_pc = (0, 0), ([0] * data.num_classes, [0] * data.num_classes)

        corrupt_(flat, cfg.attack, ctx.rank, round_)  # experiments only: a simulated hostile owner ([attack])

        # 2. Unify: side-by-side candidates first (from the same local models), then the configured rule.
        candidates = _candidates(cfg, ctx, flat, unifier, model, data, round_)
        faults.before_unify(ctx.rank, round_, flat)  # test hook (UNIFY_DIST_FAULT); no-op when unset
        rule = _auto_pick(cfg, ctx, flat, unifier, model, data, round_) if cfg.unify.rule == "auto" else cfg.unify.rule
        t0 = time.perf_counter()
        with stage(f"unify ({rule}) in round {round_}", ctx):
            outcome = unifier.unify_(rule, weight=float(len(data.train)))  # collective
        unify_s = time.perf_counter() - t0
        with stage(f"digest check in round {round_}", ctx):
            digests = verify_identical(flat)  # collective: every rank now holds the same bits
        for r in outcome.skipped:
            out.warn(f"round {round_}: owner {r} had non-finite weights and was left out of this unify")
        if cfg.train.optimizer_state == "reset":
            optimizer = make_optimizer(model, cfg.train)

        # 3. Evaluate the unified model on every owner's validation split and test shard.
        unified_val = count_correct(model, data.val)
        unified_pc = per_class_correct(model, data.test, data.num_classes)
        mine = [len(data.train), loss, *local_val, *unified_val, unify_s, *candidates]
        mine += [*local_pc[0], *local_pc[1], *unified_pc[0], *unified_pc[1]]
        with stage(f"metrics gather in round {round_}", ctx):
            gathered = all_gather_floats(mine, ctx)  # collective: the same figures on every rank
        record = _record(cfg, round_, gathered, digests, outcome.skipped, data.num_classes)
        record["rule_used"] = rule
        if u.dp_noise_multiplier > 0:  # the privacy spent so far, (epsilon, delta)-DP per owner
            record["dp_epsilon"] = dp_epsilon(u.dp_noise_multiplier, releases * round_, u.dp_delta)
            record["dp_delta"] = u.dp_delta
        records.append(record)
        out.round_row(record)
        metrics.append(record)
        extra = {"unifier": unifier.state_dict(), "scaffold": scaffold.state_dict() if scaffold else {}}
        ckpt.save(round_, {**_state(cfg, model, optimizer, records), **extra})

        # 4. Stop when the weakest owner is good enough (the same decision on every rank: same figures).
        if cfg.train.target_accuracy and record["min_unified_val_acc"] >= cfg.train.target_accuracy:
            out.info(f"every owner reached {cfg.train.target_accuracy:.2%} validation accuracy in round {round_}")
            break

    if ctx.is_main:
        save_atomic(_state(cfg, model, None, records), run_dir / "final.pt")
        out.info(f"final unified model: {run_dir / 'final.pt'}; metrics: {run_dir / 'metrics.jsonl'}")
    return records


def load_data(cfg: RunConfig, ctx: Context) -> OwnerData:
    """One process per machine fetches or unpacks the files; then every owner loads its own share.

    Failures are agreed on (a collective) so that one owner's missing files stop everyone at once.
    """
    check_owner_count(cfg.data, ctx.world_size)  # the same verdict on every rank: no agreement needed
    error = None
    if ctx.local_rank == 0:
        try:
            prepare_dataset(cfg.data)
        except UserError as e:
            error = str(e)
    with stage("dataset preparation", ctx):
        agree(error, ctx, "preparing the dataset")
    data, error = None, None
    try:
        data = load_owner_data(cfg.data, cfg.train.seed, ctx.rank, ctx.world_size, ctx.device)
    except UserError as e:
        error = str(e)
    with stage("dataset loading", ctx):
        agree(error, ctx, "loading the owner's data")
    assert data is not None
    return data


def _train_locally(
    cfg: RunConfig, ctx: Context, model: nn.Module, optimizer, data: OwnerData, round_: int, out, scaffold: Scaffold | None
) -> float:
    per_epoch = -(-len(data.train) // cfg.train.batch_size)
    steps_left = cfg.train.local_steps  # 0: whole epochs
    epochs = -(-steps_left // per_epoch) if steps_left else cfg.train.local_epochs
    set_lr(optimizer, round_lr(cfg.train, round_))  # the schedule is a function of the round: nothing to restore
    loss = 0.0
    prox = proximal_term(model, cfg.train.fedprox_mu)  # FedProx: stay near the unified start (None: off)
    if scaffold is not None:
        scaffold.begin_round()
    on_grads = scaffold.correct_grads if scaffold is not None else None
    logit_scale = absent_class_scale(data.train.y, data.num_classes, cfg.train.absent_class_scale)  # FedRS
    with out.progress(f"round {round_}: local training", steps_left or per_epoch * epochs) as advance:
        for epoch in range(epochs):
            g = epoch_generator(cfg.train.seed, round_, ctx.rank, epoch)
            take = min(steps_left, per_epoch)  # 0 when training whole epochs
            loss = train_epoch(
                model, optimizer, data.train, cfg.train.batch_size, g, on_batch=advance, extra_loss=prox,
                on_grads=on_grads, max_steps=take, logit_scale=logit_scale,
            )  # fmt: skip
            steps_left -= take
    return loss


def _candidates(cfg: RunConfig, ctx: Context, flat: FlatState, unifier: Unifier, model, data, round_: int) -> list[float]:
    """Side-by-side mode: each compared rule's unified model, evaluated, then the local model restored.

    Costs one unify and one evaluation per compared rule; returns [val c, val t, test c, test t] per rule.
    """
    if not cfg.unify.compare:
        return []
    local, local_ints = flat.values.clone(), flat.ints.clone()
    figures: list[float] = []
    for rule in cfg.unify.compare:
        with stage(f"side-by-side unify ({rule}) in round {round_}", ctx):
            unifier.unify_(rule, weight=float(len(data.train)), commit=False)  # collective; keeps anchor/momentum
        figures += [*count_correct(model, data.val), *count_correct(model, data.test)]
        flat.values.copy_(local)
        flat.ints.copy_(local_ints)
    return figures


AUTO_DEFAULT = ("avg", "max", "absmax")


def _releases_per_round(cfg: RunConfig) -> int:
    """How many times per round an owner's (noised) update leaves its rank: each is a DP release."""
    auto = len(cfg.unify.compare or AUTO_DEFAULT) if cfg.unify.rule == "auto" else 0
    return 1 + auto + len(cfg.unify.compare)


def _auto_pick(cfg: RunConfig, ctx: Context, flat: FlatState, unifier: Unifier, model, data, round_: int) -> str:
    """rule = auto: every candidate's unified model scored on every owner's private validation split.

    Per-class correct/total counts are summed over owners (one all_reduce), so every rank computes the
    same balanced accuracies and picks the same winner (ties: the earlier candidate). A serverless
    greedy soup; no validation image leaves its owner.
    """
    rules = list(cfg.unify.compare) or list(AUTO_DEFAULT)
    local, local_ints = flat.values.clone(), flat.ints.clone()
    counts: list[int] = []
    for rule in rules:
        with stage(f"auto candidate ({rule}) in round {round_}", ctx):
            unifier.unify_(rule, weight=float(len(data.train)), commit=False)  # collective
        correct, total = per_class_correct(model, data.val, data.num_classes)
        counts += correct + total
        flat.values.copy_(local)
        flat.ints.copy_(local_ints)
    summed = torch.tensor(counts, dtype=torch.float64, device=ctx.device)
    with stage(f"auto vote in round {round_}", ctx):
        dist.all_reduce(summed)  # collective: the same counts, so the same choice, on every rank
    per_rule = summed.view(len(rules), 2, data.num_classes)
    seen = per_rule[0, 1] > 0
    scores = (per_rule[:, 0, seen] / per_rule[:, 1, seen]).mean(1).tolist()  # balanced validation accuracy
    return rules[max(range(len(rules)), key=lambda i: (scores[i], -i))]


_BASE = ["n_train", "loss", "local_val_c", "local_val_t", "unified_val_c", "unified_val_t", "unify_s"]


def _record(cfg: RunConfig, round_: int, gathered: list[list[float]], digests: list[str], skipped: list[int], n_classes: int) -> dict[str, Any]:
    """Turn every owner's gathered figures into the round's JSON record."""
    owners, rest = [], []
    for rank, row in enumerate(gathered):
        base = dict(zip(_BASE, row[: len(_BASE)]))
        rest.append(row[len(_BASE) :])
        owners.append({
            "rank": rank,
            "n_train": int(base["n_train"]),
            "loss": base["loss"],
            "local_val_acc": base["local_val_c"] / base["local_val_t"] if base["local_val_t"] else None,
            "unified_val_acc": base["unified_val_c"] / max(base["unified_val_t"], 1),
            "unify_s": base["unify_s"],
            "digest": digests[rank],
        })  # fmt: skip
    k = 4 * len(cfg.unify.compare)
    candidates = {}
    for i, rule in enumerate(cfg.unify.compare):
        c = [sum(r[4 * i + j] for r in rest) for j in range(4)]
        vals = [r[4 * i] / max(r[4 * i + 1], 1) for r in rest]
        candidates[rule] = {"test_acc": c[2] / max(c[3], 1), "min_val_acc": min(vals)}
    pcs = [r[k:] for r in rest]  # local correct, local total, unified correct, unified total (C each)
    C = n_classes
    unified_c = [sum(p[2 * C + c] for p in pcs) for c in range(C)]
    unified_t = [sum(p[3 * C + c] for p in pcs) for c in range(C)]
    return {
        "round": round_,
        "rule": cfg.unify.rule,
        "name": cfg.name,
        "owners": owners,
        "skipped": skipped,
        "min_unified_val_acc": min(o["unified_val_acc"] for o in owners),
        # Global test accuracy: every owner's correct/total counts summed; no test image moved.
        "unified_test_acc": sum(unified_c) / max(sum(unified_t), 1),
        "candidates": candidates,
        "per_class": {
            "local": [[p[c] / max(p[C + c], 1) for c in range(C)] for p in pcs],
            "unified": [unified_c[c] / max(unified_t[c], 1) for c in range(C)],
        },
        "digest": digests[0],
        "time": time.time(),
    }


def _state(cfg: RunConfig, model: nn.Module, optimizer, records: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[str, Any] = {"model": model.state_dict(), "config": cfg.to_dict(), "metrics": records}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
        state["rng"] = {"torch": torch.get_rng_state()}
    return state


def _resume(
    cfg: RunConfig,
    ctx: Context,
    ckpt: Checkpointer,
    flat: FlatState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    unifier: Unifier,
    scaffold: Scaffold | None,
    records: list,
    out: Reporter,
) -> int:
    """Continue from the newest round that every owner has a readable checkpoint of (0: start fresh).

    A collective (all_gather_object of each owner's readable rounds): every rank calls it.
    """
    if not cfg.output.resume:
        ckpt.clear()
        return 0
    mine = ckpt.readable_rounds()
    everyone: list[list[int] | None] = [None] * ctx.world_size
    with stage("resume agreement", ctx):
        dist.all_gather_object(everyone, mine)
    common = set(everyone[0] or [])
    for rounds in everyone[1:]:
        common &= set(rounds or [])
    if not common:
        return 0
    round_ = max(common)
    state = ckpt.load(round_)
    assert state is not None  # readable a moment ago
    model.load_state_dict(state["model"])  # copies in place: the flat views stay intact
    optimizer.load_state_dict(state["optimizer"])
    unifier.load_state_dict(state.get("unifier", {}))  # anchor and momentum of delta-space options
    if scaffold is not None and state.get("scaffold"):
        scaffold.load_state_dict(state["scaffold"])
    torch.set_rng_state(state["rng"]["torch"])
    records.extend(state["metrics"])
    with stage("resume digest check", ctx):
        verify_identical(flat)  # collective
    out.info(f"resumed from round {round_} (every owner had it)")
    return round_
