"""The round loop, as in the paper: same start; do { train locally; unify; evaluate } until every owner
reaches the target accuracy or the rounds run out.

Every rank runs this same function. Collectives are marked; none sits under a rank condition. The loop
knows nothing of experiments: a hook (an object with `before_unify(round_, unifier)`, and optionally
`start(rank, world_size, say)`) can act on the unifier each round from the outside; benchmarks.attack
and tests.hooks.faults are two.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from unify_dist.app import budget
from unify_dist.app.checkpoint import Checkpointer, MetricsLog, save_atomic
from unify_dist.app.config import RunConfig
from unify_dist.app.finished import is_finished, say_finished
from unify_dist.app.owners import Membership, agree_on_owners
from unify_dist.app.procs import Procs, owner_layout
from unify_dist.app.consistency import check_consistency, fingerprint, shared_config
from unify_dist.app.console import Reporter
from unify_dist.app.record import chain, fingerprint_hash, sign_round
from unify_dist.app.state import TrainState
from unify_dist.data import Owner, OwnerData, check_owner_count, load_owner_data, prepare_dataset
from unify_dist.distributed import Context, agree, all_gather_floats, stage
from unify_dist.errors import UserError
from unify_dist.flat import FlatState
from unify_dist.hierarchy import HierarchicalUnifier
from unify_dist.models import build_model, check_output_size
from unify_dist.rules import SPECS
from unify_dist.privacy import dp_epsilon, dp_statement, privacy_statement
from unify_dist.staging import HostStaged
from unify_dist.prox import proximal_term
from unify_dist.lora import prepare_lora
from unify_dist.roles import check_same_roles, role_table
from unify_dist.train import absent_class_scale, count_correct, epoch_generator, per_class_correct, round_lr, set_lr, train_epoch
from unify_dist.overlap import OverlappedUnifier
from unify_dist.unifier import Unifier, same_start
from unify_dist.wire import WireError, broadcast_bytes, gather_json
from unify_dist.wrappers import GaussianNoise
from unify_dist.collectives import tail_size, verify_identical

if TYPE_CHECKING:  # the trust package needs `cryptography`, imported only when trust is on
    from unify_dist.trust import SealedRing

__all__ = ["run", "load_data"]


def run(cfg: RunConfig, ctx: Context, hooks: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Train and unify for up to cfg.train.max_rounds rounds; returns the per-round records."""
    out = Reporter(ctx.rank, cfg.output.progress, cfg.output.all_ranks)
    run_dir = Path(cfg.output.dir)
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // ctx.local_world_size))
    torch.manual_seed(cfg.train.seed)
    procs = owner_layout(cfg.dist, ctx, cfg.trust.enabled)  # collective; UserError: processes that do not divide into owners
    _announce(cfg, ctx, out, procs)
    reducer = _admit(cfg, ctx, out)  # collective with trust on: before any data-derived byte leaves
    if ctx.device.type == "cuda" and ctx.backend == "gloo":  # GPU training, gloo between owners
        reducer = HostStaged(reducer)  # every unify collective on pinned host copies (the ring seals host bytes)
    for hook in hooks:
        if hasattr(hook, "start"):
            hook.start(ctx.rank, ctx.world_size, out.info)
    named = cfg.trust.owner.replace("{rank}", str(ctx.rank)) if cfg.trust.enabled else ""  # admitted by it
    # From here on every collective takes `reducer`: None, the group's own (trust off: in the clear);
    # else the sealed ring (trust on) and/or host staging. No metadata crosses as a pickle either way.
    # collective: who is here, by name (an owner of several processes: one name for all of them)
    members = agree_on_owners(cfg.train, ctx, out.info, named, reducer=reducer, procs=procs.per_owner)
    if ctx.watch is not None:
        ctx.watch.names = procs.names_by_rank(members.present)  # a peer's death is then reported by the owner's name
    data = load_data(cfg, ctx, members, reducer, procs)
    model = build_model(cfg.model, data.in_shape, data.num_classes, rank=procs.owner, owner=members.name).to(ctx.device)
    sample, _ = next(iter(data.train.batches(None, 2)))
    check_output_size(model, sample.to(ctx.device), data.num_classes, cfg.model)  # UserError: not one logit per class
    with stage("consistency check", ctx):
        check_consistency(fingerprint(cfg, model, data.classes), ctx.world_size, reducer)  # collective
    with stage("broadcast initial weights", ctx):
        same_start(model, reducer=reducer)  # collective: rank 0's initial weights everywhere, proven identical
    config_hash = fingerprint_hash(fingerprint(cfg, model, data.classes))  # what every owner checked equal
    prepare_lora(model, cfg.unify.rule)  # UserError: a LoRA rule without adapters; lora_ffa freezes every lora_A
    roles = role_table(model, cfg.unify.frozen, cfg.unify.local, source="unify.")  # UserError: a pattern matches nothing
    flat = FlatState(model, tail=tail_size(procs.owners, model), roles=roles)  # only unified tensors travel
    with stage("tensor roles", ctx):
        check_same_roles(roles, reducer=reducer)  # collective: the same tensors unified, frozen and local on every owner
    out.info(roles.describe())
    state = TrainState(cfg, model, _unifier(cfg, ctx, model, flat, reducer, procs))
    if state.scaffold is not None:
        state.scaffold.reducer = reducer  # SCAFFOLD's all_reduce of c_i goes the same way
    ckpt = Checkpointer(run_dir, members.name, cfg.output.keep_checkpoints, out.warn, writer=procs.is_leader)
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=ctx.is_main)
    start = _resume(cfg, ctx, ckpt, state, members, out, procs, reducer)
    _check_budget(cfg, ctx, state.unifier, start, members, reducer)  # collective
    metrics.keep_until(start)
    finished = is_finished(cfg, state.records, start)  # the same records on every rank: the same verdict
    if finished:
        say_finished(cfg, state.records, start, out)  # and train nothing; final.pt is written again below
    else:
        out.info(f"owner data: {len(data.train)} train, {len(data.val)} val, {len(data.test)} test images (rank 0)")
    replay = budget.read_replay(cfg.train.replay_steps) if cfg.train.replay_steps else None

    for round_ in range(start + 1, (start if finished else cfg.train.max_rounds) + 1):
        # 1. Train locally, on this owner's data only, for the round's budget (budget.py).
        clock = budget.Clock(model)
        if cfg.unify.overlap:
            state.unifier.begin_round()  # this owner's own weights back (between rounds: the unified state)
        plan = budget.plan(cfg.train, round_, members.name, replay, state.records, cfg.unify.overlap)
        loss, steps = _train_locally(cfg, members.index, state, data, round_, out, plan, procs)
        clock.trained()
        local = _evaluate_local(cfg, model, data)
        for hook in hooks:
            hook.before_unify(round_, state.unifier)

        # 2. Unify: side-by-side candidates first (from the same local models), then the configured rule.
        weight = float(steps if cfg.unify.weight_by == "steps" else len(data.train))  # what weighted_avg weighs
        candidates = _candidates(cfg, ctx, state.unifier, model, data, round_, weight)
        auto = cfg.unify.rule == "auto"
        rule = _auto_pick(cfg, ctx, state.unifier, model, data, round_, weight, reducer) if auto else cfg.unify.rule
        with stage(f"unify ({rule}) in round {round_}", ctx):
            outcome = state.unifier.unify(weight, rule=rule, steps=steps)  # collective, digests compared
        for r in outcome.skipped:
            out.warn(f"round {round_}: owner {r} had non-finite weights and was left out of this unify")
        if cfg.train.optimizer_state == "reset":
            state.reset_optimizer()

        # 3. Evaluate the unified model on every owner's validation split and test shard; record the round.
        record, budgets = _evaluate_unified(cfg, ctx, model, data, round_, loss, local, candidates, outcome, reducer,
                                            _budget(cfg, state.unifier), procs)  # fmt: skip
        _name_owners(record, members, state.records)
        if roles.names("local"):
            record["local_tensors"] = roles.names("local")  # kept per owner: not unified, not in the digest
        with stage(f"step counts in round {round_}", ctx):  # collective: every owner's steps and times, recorded
            counts = budget.agree_counts(clock.counts(steps), ctx.wire_device, reducer)
            budget.add_to_record(record, procs.leaders(counts))  # one row per owner
        _bind(record, cfg, config_hash, state.records)  # after every field is in: the signature covers them all
        sign_round(record, reducer)  # collective with trust on: every owner signs the same record, sealed
        state.records.append(record)
        out.round_row(record)
        metrics.append(record)
        ckpt.save(round_, state.state_dict())

        # 4. Stop when the weakest owner is good enough, or before a round past any owner's privacy budget
        # (the same decisions on every rank: the same gathered figures).
        stop = _over_budget(round_ + 1, budgets, members.present, cfg.unify.dp_delta)
        if stop and round_ < cfg.train.max_rounds:
            out.info(f"{stop}; stopping after round {round_}, which is saved")
            break
        if cfg.train.target_accuracy and (record["min_unified_val_acc"] or 0.0) >= cfg.train.target_accuracy:
            out.info(f"every owner reached {cfg.train.target_accuracy:.2%} validation accuracy in round {round_}")
            break

    if cfg.unify.overlap:
        state.unifier.finish()  # the last round's unify, applied: every owner ends with the same model
    if ctx.is_main:
        final = {"model": model.state_dict(), "config": cfg.to_dict(), "metrics": state.records, "roles": roles.summary()}
        save_atomic(final, run_dir / "final.pt")
        out.info(f"final unified model: {run_dir / 'final.pt'}; metrics: {run_dir / 'metrics.jsonl'}")
    return state.records


def _unifier(cfg: RunConfig, ctx: Context, model: nn.Module, flat: FlatState, reducer,
             procs: Procs) -> Unifier | OverlappedUnifier | HierarchicalUnifier:  # fmt: skip
    """The round's unifier: plain, or with unify.overlap one that unifies in the background on a second group
    (trust on is refused with overlap before this: the sealed ring is the main group's), or with owners of
    several processes one whose leaders unify and hand the result on (trust, overlap and host staging are
    refused with it on config load: the reducer is the group's own)."""
    if procs.groups is not None:
        return HierarchicalUnifier.over(flat, cfg.unify, procs.groups)
    if not cfg.unify.overlap:
        return Unifier.over(flat, cfg.unify, reducer=reducer)
    if ctx.device.type != "cpu":
        raise UserError(f"unify.overlap runs on CPU owners over gloo, and this owner trains on {ctx.device}: set "
                        "dist.device = 'cpu', or unify.overlap = false")  # fmt: skip
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.dist.timeout_s))  # collective
    return OverlappedUnifier(model, flat, cfg.unify, group)


def _announce(cfg: RunConfig, ctx: Context, out: Reporter, procs: Procs) -> None:
    """The start-up lines: who, what, and what each owner will learn about the others."""
    owners = f"{procs.owners} owner{'' if procs.owners == 1 else 's'}"
    if procs.per_owner > 1:
        owners += f" of {procs.per_owner} processes each (data-parallel inside an owner)"
    out.info(
        f"unify-dist: {owners}, backend {ctx.backend}{_staged(ctx)}, rule {cfg.unify.rule}, "
        f"{cfg.data.dataset}/{cfg.data.partition}, model {cfg.model.name}, run dir {cfg.output.dir}"
    )
    candidates = tuple(cfg.unify.compare) or AUTO_DEFAULT
    out.info(privacy_statement(cfg.unify.rule, procs.owners, cfg.unify.absmax_impl, candidates))
    u = cfg.unify
    if u.overlap and u.overlap_start != "unified" and u.outer == "none" and u.server_momentum == 0:
        out.info(f"overlap: rounds start from the owner's {'own weights' if u.overlap_start == 'own' else 'eager start'} "
                 "with no outer step; on label-skewed owners the one-round-late update then oscillates (paper H: "
                 "-11.6 points); there use overlap_start = 'unified', outer = 'sgd', outer_lr = 0.25, outer_momentum = 0")  # fmt: skip
    if u.dp_noise_multiplier > 0:
        releases = _releases_per_round(cfg)
        out.info(dp_statement(u.dp_noise_multiplier, u.update_norm_bound, u.dp_delta, releases, cfg.train.max_rounds))


def _budget(cfg: RunConfig, unifier: Unifier) -> list[float]:
    """[1 if this owner can afford the next round's DP releases within its unify.dp_max_epsilon else 0,
    its epsilon after that round, its budget] (1, nan, nan without a budget): gathered, so that the run
    stops when any owner's budget would be passed, on every owner at once, whatever each one's settings."""
    u = cfg.unify
    steps = getattr(unifier, "owner_steps", ())  # an overlapped unifier has none: DP noise is refused with overlap
    noise = next((s for s in steps if isinstance(s, GaussianNoise)), None)
    if u.dp_max_epsilon <= 0 or noise is None:
        return [1.0, math.nan, math.nan]
    after = dp_epsilon(u.dp_noise_multiplier, noise.releases + _releases_per_round(cfg), u.dp_delta)
    return [float(after <= u.dp_max_epsilon), after, u.dp_max_epsilon]


def _over_budget(next_round: int, budgets: list[list[float]], names: list[str], delta: float) -> str | None:
    """The line that stops the run before `next_round`, naming each owner whose budget it would pass (None: go on)."""
    over = [(names[r], after, cap) for r, (ok, after, cap) in enumerate(budgets) if not ok]
    if not over:
        return None
    if len(over) == len(budgets) > 1 and len({(a, c) for _, a, c in over}) == 1:  # the same settings everywhere
        over = [("every owner", over[0][1], over[0][2])]
    said = ", ".join(f"{who}'s epsilon to {after:.4g} > unify.dp_max_epsilon = {cap:g}" for who, after, cap in over)
    return f"privacy budget: round {next_round} would take {said} (delta {delta:g})"


def _check_budget(cfg: RunConfig, ctx: Context, unifier: Unifier, start: int, members: Membership,
                  reducer=None) -> None:  # fmt: skip
    """Before the first round this process runs (fresh or resumed): every owner can afford it, or every
    owner stops with one line (an agreement: a collective on every rank, whatever its settings)."""
    error = None
    if start < cfg.train.max_rounds:
        ok, after, cap = _budget(cfg, unifier)
        if not ok and start == 0:
            error = (f"unify.dp_max_epsilon = {cap:g} affords no round: one round ({_releases_per_round(cfg)} "
                     f"release(s)) costs epsilon {after:.4g} at delta {cfg.unify.dp_delta:g}; raise "
                     "unify.dp_max_epsilon or unify.dp_noise_multiplier")  # fmt: skip
        elif not ok:
            said = _over_budget(start + 1, [[ok, after, cap]], [members.name], cfg.unify.dp_delta)
            error = f"{said}: the run's budget is spent after round {start}; raise unify.dp_max_epsilon to go on"
    with stage("privacy budget check", ctx):
        agree(error, ctx, "checking the privacy budget", reducer)  # collective (sealed with trust on)


def _staged(ctx: Context) -> str:
    if ctx.device.type == "cuda" and ctx.backend == "gloo":
        return f" (training on {ctx.device}, unify staged through pinned host memory)"
    return ""


def _admit(cfg: RunConfig, ctx: Context, out: Reporter) -> SealedRing | None:
    """trust on: admission (a collective), and the sealed ring every unify and metrics gather goes through.

    Says which mode is in force; with trust off and owners on several machines, what that means.
    """
    if not cfg.trust.enabled:
        out.info("trust: off: no admission, and everything between owners (weights, digests, metadata) crosses the "
                 "network in the clear: readable and changeable on the way (never unpickled)")  # fmt: skip
        if ctx.local_world_size < ctx.world_size:  # torchrun: fewer owners here than in the group
            out.warn(
                "owners are on several machines with trust off: anyone who reaches the rendezvous port can take an "
                "owner's place, and anyone on the path can read and change every owner's weights; set [trust]"
            )
        return None
    if ctx.backend == "nccl":
        raise UserError("trust.enabled seals host bytes over gloo, not NCCL: set dist.backend = 'gloo' and, to train on "
                        "the GPU, dist.device = 'cuda' (each unify is staged through pinned host memory)")  # fmt: skip
    try:
        from unify_dist.trust.session import describe, join
    except ImportError as e:
        raise UserError(f"trust.enabled needs the cryptography package ({e}); install it: pip install cryptography") from None
    t = cfg.trust
    # The run id binds what owners must share (the config but its local paths and keys: another run
    # directory is no reason to refuse an owner), and admission names a mismatch in it as one.
    reducer = join(t.roster, t.key, t.owner, shared_config(cfg), ctx)  # collective
    out.info(describe(reducer.admission))
    return reducer


def _gather_figures(values: list[float], ctx: Context, reducer: SealedRing | None) -> list[list[float]]:
    """Every owner's figures on every rank: gloo's all_gather, or sealed through the ring (trust on)."""
    if reducer is None:
        return all_gather_floats(values, ctx)
    mine = torch.tensor(values, dtype=torch.float64)
    out = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    reducer.all_gather(out, mine)
    return [t.tolist() for t in out]


def load_data(cfg: RunConfig, ctx: Context, members: Membership, reducer: SealedRing | None = None,
              procs: Procs | None = None) -> OwnerData:  # fmt: skip
    """One process per machine fetches or unpacks the files; then every owner loads its own share.

    Failures are agreed on (a collective) so that one owner's missing files stop everyone at once. Every
    collective here goes through `reducer` when given (trust on: sealed). Every process of an owner loads the
    owner's whole share (procs: the owner, not the rank, picks the share and the test shard).
    """
    owners, owner = (procs.owners, procs.owner) if procs is not None else (ctx.world_size, ctx.rank)
    check_owner_count(cfg.data, owners)  # the same verdict on every rank: no agreement needed
    error = None
    if ctx.local_rank == 0:
        try:
            prepare_dataset(cfg.data)
        except UserError as e:
            error = str(e)
    with stage("dataset preparation", ctx):
        agree(error, ctx, "preparing the dataset", reducer)
    data, error = None, None
    try:
        who = Owner(owner, owners, cfg.train.seed, members.name, members.index, len(members.roster))
        data = load_owner_data(cfg.data, who, ctx.device, reducer=reducer)  # folder: a collective agrees on the class list
    except UserError as e:
        error = str(e)
    with stage("dataset loading", ctx):
        agree(error, ctx, "loading the owner's data", reducer)
    assert data is not None
    with stage("training image counts", ctx):
        counts = _gather_figures([float(len(data.train))], ctx, reducer)  # collective: every rank names the same owners
    counts = procs.leaders(counts) if procs is not None else counts
    empty = [r for r, (n,) in enumerate(counts) if n == 0]
    if empty:  # an owner with nothing to learn from would unify its random start and sink everyone to chance
        raise UserError(
            f"owner(s) {empty} have no training images (after data.val_fraction = {cfg.data.val_fraction} is held "
            "back for validation); give each owner more images, raise data.train_per_owner, or use fewer owners"
        )
    return data


def _train_locally(cfg: RunConfig, owner: int, state: TrainState, data: OwnerData, round_: int, out: Reporter,
                   plan: budget.Budget, procs: Procs) -> tuple[float, int]:  # fmt: skip
    """This owner's local training of the round, to `plan`; returns the last epoch's loss and the steps taken.

    The data order depends on the owner's place in the owner list, not its rank: a rank can change. Every
    budget takes the seeded order's first steps, epoch after epoch, so the step count replays the round.
    An owner of several processes: each takes its share of every batch of the same order, and their
    gradients are averaged (weighted by share) before every step, so they step in lockstep with equal weights.
    """
    model, optimizer, scaffold = state.model, state.optimizer, state.scaffold
    per_epoch = -(-len(data.train) // cfg.train.batch_size)
    steps_left = plan.steps  # 0: whole epochs
    epochs = -(-steps_left // per_epoch) if steps_left else plan.epochs  # a time budget: as many as fit
    stop = budget.Deadline(plan.seconds) if plan.kind == "seconds" else None
    taken = 0
    set_lr(optimizer, round_lr(cfg.train, round_))  # the schedule is a function of the round: nothing to restore
    loss = 0.0
    prox = proximal_term(model, cfg.train.fedprox_mu)  # FedProx: stay near the unified start (None: off)
    if scaffold is not None:
        scaffold.begin_round()
    on_grads = scaffold.correct_grads if scaffold is not None else None
    if procs.per_owner > 1:
        on_grads = _within_owner(procs, model, on_grads)
    scale = cfg.train.absent_class_scale  # FedRS; a stream's labels are read once, and only when it is on
    logit_scale = absent_class_scale(data.train.labels(), data.num_classes, scale) if scale != 1 else None
    with out.progress(f"round {round_}: local training", steps_left or per_epoch * max(epochs, 1)) as advance:

        def step() -> None:
            nonlocal taken
            taken += 1
            advance()

        epoch = 0
        while epoch < epochs or (stop is not None and not stop.done):
            g = epoch_generator(cfg.train.seed, round_, owner, epoch)
            take = min(steps_left, per_epoch)  # 0 when training whole epochs
            loss = train_epoch(
                model, optimizer, data.train, cfg.train.batch_size, g, on_batch=step, extra_loss=prox,
                on_grads=on_grads, max_steps=take, logit_scale=logit_scale, stop=stop,
                part=(procs.part, procs.per_owner),
            )  # fmt: skip
            steps_left -= take
            epoch += 1
    if scaffold is not None:
        scaffold.end_round()  # collective: SCAFFOLD's control variates
    return loss, taken


def _within_owner(procs: Procs, model: nn.Module, then):
    """After backward: the owner's processes' gradients averaged (a collective inside the owner), then `then`
    (SCAFFOLD's correction, the same on every process of the owner: it reads their equal weights)."""

    def on_grads() -> None:
        procs.average_gradients(model)  # collective over the owner's processes, every step
        if then is not None:
            then()

    return on_grads


def _evaluate_local(cfg: RunConfig, model: nn.Module, data: OwnerData) -> list[Any]:
    """The local model's validation counts and per-class test counts (zeros: not measured)."""
    if not cfg.output.local_metrics:
        return [(0, 0), ([0] * data.num_classes, [0] * data.num_classes)]
    return [count_correct(model, data.val), per_class_correct(model, data.test, data.num_classes)]


def _candidates(cfg: RunConfig, ctx: Context, unifier: Unifier, model, data, round_: int, weight: float) -> list[float]:
    """Side-by-side mode: each compared rule's unified model, evaluated, then the local model restored.

    Costs one unify and one evaluation per compared rule; returns [val c, val t, test c, test t] per rule.
    """
    figures: list[float] = []
    for rule in cfg.unify.compare:
        with _trial(unifier):
            with stage(f"side-by-side unify ({rule}) in round {round_}", ctx):
                unifier.unify(weight, rule=rule, commit=False, verify=False)  # collective
            figures += [*count_correct(model, data.val), *count_correct(model, data.test)]
    return figures


AUTO_DEFAULT = ("avg", "max", "absmax")


def _releases_per_round(cfg: RunConfig) -> int:
    """How many times per round an owner's (noised) update leaves its rank: each is a DP release."""
    auto = len(cfg.unify.compare or AUTO_DEFAULT) if cfg.unify.rule == "auto" else 0
    return 1 + auto + len(cfg.unify.compare)


def _auto_pick(cfg: RunConfig, ctx: Context, unifier: Unifier, model, data, round_: int, weight: float,
               reducer=None) -> str:
    """rule = auto: every candidate's unified model scored on every owner's private validation split.

    Per-class correct/total counts are summed over owners (one all_reduce), so every rank computes the
    same balanced accuracies and picks the same winner (ties: the earlier candidate). A serverless
    greedy soup; no validation image leaves its owner.
    """
    rules = list(cfg.unify.compare) or list(AUTO_DEFAULT)
    counts: list[int] = []
    for rule in rules:
        with _trial(unifier):
            with stage(f"auto candidate ({rule}) in round {round_}", ctx):
                unifier.unify(weight, rule=rule, commit=False, verify=False)  # collective
            correct, total = per_class_correct(model, data.val, data.num_classes)
            counts += correct + total
    summed = torch.tensor(counts, dtype=torch.float64, device=ctx.wire_device)
    with stage(f"auto vote in round {round_}", ctx):  # collective: the same counts, so the same choice, everywhere
        if reducer is None:  # trust on: the sealed ring (the counts describe the owners' data)
            dist.all_reduce(summed)  # owners of G processes count G times each: the same ratios, the same pick
        else:
            reducer.all_reduce(summed)  # whole numbers in float64: exact in any order, the vote is trust off's
    per_rule = summed.view(len(rules), 2, data.num_classes)
    seen = per_rule[0, 1] > 0
    scores = (per_rule[:, 0, seen] / per_rule[:, 1, seen]).mean(1).tolist()  # balanced validation accuracy
    return rules[max(range(len(rules)), key=lambda i: (scores[i], -i))]


class _trial:
    """Within the block, unify freely: on leaving it, this owner's local weights are back."""

    def __init__(self, unifier: Unifier):
        self.flat = unifier.flat

    def __enter__(self) -> None:
        self.flat.pull_ints()
        self.values, self.ints = self.flat.values.clone(), self.flat.ints.clone()
        self.narrow = [b.clone() for b in self.flat.narrow.values()]

    def __exit__(self, *exc: object) -> None:
        self.flat.values.copy_(self.values)
        self.flat.ints.copy_(self.ints)
        self.flat.push_ints()
        for buffer, kept in zip(self.flat.narrow.values(), self.narrow):
            buffer.copy_(kept)


def _bind(record: dict[str, Any], cfg: RunConfig, config_hash: str, records: list[dict[str, Any]]) -> None:
    """What the round ran under (the rule used and its options, the config fingerprint's hash), and the
    hash of the round before: the same on every owner, so every owner can sign it."""
    rule = record["rule_used"]
    options = {k: getattr(cfg.unify, k) for k in SPECS[rule].options} if rule in SPECS else {}
    record["unify"] = {"rule": rule, **options}
    record["config"] = config_hash
    chain(record, records[-1] if records else None)


def _name_owners(record: dict[str, Any], members: Membership, records: list[dict[str, Any]]) -> None:
    """Name each owner's column, and who took part in this round, joined or left since the round before."""
    for entry, name in zip(record["owners"], members.present):
        entry["name"] = name
    before = records[-1].get("participants", members.present) if records else members.present
    record["participants"] = members.present
    record["joined"] = [n for n in members.present if n not in before]
    record["left"] = [n for n in before if n not in members.present]


def _evaluate_unified(cfg: RunConfig, ctx: Context, model: nn.Module, data: OwnerData, round_: int, loss: float,
                      local: list[Any], candidates: list[float], outcome, reducer: SealedRing | None,
                      budget: list[float], procs: Procs) -> tuple[dict[str, Any], list[list[float]]]:  # fmt: skip
    """Evaluate the unified model on this owner's data, gather every owner's figures, build the record.

    `budget` (_budget: whether this owner can afford the next round) rides in the same gather and comes
    back for every owner, beside the record (it is not part of it)."""
    unified_val = count_correct(model, data.val)
    unified_pc = per_class_correct(model, data.test, data.num_classes)
    (local_val, local_pc) = local
    mine = [len(data.train), loss, *local_val, *unified_val, outcome.seconds, *candidates]
    mine += [*local_pc[0], *local_pc[1], *unified_pc[0], *unified_pc[1]]
    dp = [outcome.dp_epsilon, cfg.unify.dp_delta] if outcome.dp_epsilon is not None else [math.nan, math.nan]
    extra = [*budget, outcome.bytes_sent, time.time(), *dp]  # per owner: next round's budget, wire bytes, clock, spent
    with stage(f"metrics gather in round {round_}", ctx):
        gathered = _gather_figures([*mine, *extra], ctx, reducer)  # collective: the same figures everywhere
    losses = [row[1] for row in gathered]  # every process's own loss: an owner's is its processes' mean
    gathered = procs.leaders(gathered)  # one row per owner: its processes hold the same weights and data
    for o, row in enumerate(gathered):
        row[1] = sum(losses[o * procs.per_owner : (o + 1) * procs.per_owner]) / procs.per_owner
    digests = procs.leaders(outcome.digests)  # every rank's own, gathered (and compared) by unify
    n, b = len(extra), len(budget)
    record = _record(cfg, round_, [row[:-n] for row in gathered], digests, outcome.skipped, data.num_classes)
    for owner, row in zip(record["owners"], gathered):
        owner["unify_bytes"] = int(row[-n + b])  # this owner's wire bytes for the unify (UnifyOutcome.bytes_sent)
    record["time"] = gathered[0][-n + b + 1]  # rank 0's clock, shared: every owner holds (and signs) the same record
    record["rule_used"] = outcome.rule
    if procs.per_owner > 1:  # every process's digest: the record proves all of them equal, not the leaders' only
        for o, owner in enumerate(record["owners"]):
            owner["process_digests"] = outcome.digests[o * procs.per_owner : (o + 1) * procs.per_owner]
    spent = [row[-2:] for row in gathered if not math.isnan(row[-2])]
    if spent:  # the privacy spent so far, (epsilon, delta)-DP per owner: the weakest owner's guarantee
        record["dp_epsilon"] = max(e for e, _ in spent)
        record["dp_delta"] = max(d for _, d in spent)
    return record, [row[-n : -n + b] for row in gathered]


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
            "unified_val_acc": _fraction(base["unified_val_c"], base["unified_val_t"]),
            "unify_s": base["unify_s"],
            "digest": digests[rank],
        })  # fmt: skip
    k = 4 * len(cfg.unify.compare)
    candidates = {}
    for i, rule in enumerate(cfg.unify.compare):
        c = [sum(r[4 * i + j] for r in rest) for j in range(4)]
        vals = [_fraction(r[4 * i], r[4 * i + 1]) for r in rest]
        candidates[rule] = {"test_acc": c[2] / max(c[3], 1), "min_val_acc": _lowest(vals)}
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
        "min_unified_val_acc": _lowest([o["unified_val_acc"] for o in owners]),
        # Global test accuracy: every owner's correct/total counts summed; no test image moved.
        "unified_test_acc": sum(unified_c) / max(sum(unified_t), 1),
        "candidates": candidates,
        "per_class": {
            "local": [[p[c] / max(p[C + c], 1) for c in range(C)] for p in pcs],
            "unified": [unified_c[c] / max(unified_t[c], 1) for c in range(C)],
        },
        "digest": digests[0],
    }


def _fraction(correct: float, total: float) -> float | None:
    """correct / total, or None for an empty split: it has no accuracy (not 0%, and never 100%)."""
    return correct / total if total else None


def _lowest(accs: list[float | None]) -> float | None:
    """The weakest owner's accuracy among those that measured one (None: no owner did)."""
    return min((a for a in accs if a is not None), default=None)


def _resume(cfg: RunConfig, ctx: Context, ckpt: Checkpointer, state: TrainState, members: Membership, out: Reporter,
            procs: Procs, reducer=None) -> int:  # fmt: skip
    """Continue from the newest completed round this group can continue exactly (0: start fresh).

    Each owner reports the rounds it has readable checkpoints of (and who took part in each). The group
    resumes from the newest round R whose every participant that is here now still has R: nothing completed
    is lost, and nobody who trained in R restarts from older state. An owner here without R (it was away,
    or is new) takes the unified model, the unifier's state and the records from an owner that has R, and
    keeps its own optimizer state from its newest older checkpoint (a fresh one if it has none).
    A collective: every rank calls it. An owner of several processes: its leader wrote the checkpoints, and
    every process of the owner reads them (the same files: the same list); the owners' rows decide.
    """
    if not cfg.output.resume:
        ckpt.clear()  # its leader's; the others write none
        return 0
    with stage("resume agreement", ctx):  # trust on: sealed (reducer), as everything after admission
        listed = [[r, names] for r, names in ckpt.readable().items()]  # JSON: {round: owners} as pairs
        held = [_held(e, rank) for rank, e in enumerate(gather_json(listed, reducer=reducer, what="a checkpoint list"))]  # collective
    round_, source = _resume_point(procs.leaders(held), members.present)
    source *= procs.per_owner  # the source owner's leader
    if round_ == 0:
        return 0
    mine = held[ctx.rank]
    if round_ in mine:
        saved = ckpt.load(round_)
        assert saved is not None  # readable a moment ago
        state.load_state_dict(saved)
    else:
        older = max((r for r in mine if r < round_), default=0)
        state.load_own_state(ckpt.load(older) if older else None)
    everyone_had_it = all(round_ in h for h in held)  # the same verdict on every rank
    if cfg.unify.overlap and not everyone_had_it:  # the same verdict on every rank
        raise UserError(f"unify.overlap cannot hand round {round_} to an owner that lacks it (its own and sent weights "
                        "are its own); resume with the owners of that round, or set output.resume = false")  # fmt: skip
    with stage("resume from a peer", ctx):
        if not everyone_had_it:
            _take_from(source, state, needed=round_ not in mine, reducer=reducer)  # collective
        verify_identical(state.unifier.flat, None, reducer)  # collective
    if everyone_had_it:
        out.info(f"resumed from round {round_} (every owner had it)")
    else:
        late = [n for n, h in zip(members.present, procs.leaders(held)) if round_ not in h]
        out.info(f"resumed from round {round_} ({members.present[source]}'s checkpoint); taken from it: {', '.join(late)}")
    return round_


def _held(entry: object, rank: int) -> dict[int, list[str]]:
    """One rank's [[round, [owner, ...]], ...] as {round: owners}, every part checked for its type."""
    ok = isinstance(entry, list) and all(
        isinstance(e, list) and len(e) == 2 and type(e[0]) is int and isinstance(e[1], list) and all(isinstance(n, str) for n in e[1])
        for e in entry
    )  # fmt: skip
    if not ok:
        raise WireError(f"rank {rank}'s checkpoint list does not parse; a peer is broken or the bytes were changed on the way")
    return {r: names for r, names in entry}  # type: ignore[union-attr]


def _resume_point(held: list[dict[int, list[str]]], present: list[str]) -> tuple[int, int]:
    """(round, rank to take it from): the newest round every present participant of it still holds."""
    for round_ in sorted({r for h in held for r in h}, reverse=True):
        holders = [rank for rank, h in enumerate(held) if round_ in h]
        took_part = held[holders[0]][round_] or present  # checkpoints before names were recorded: everyone
        if all(round_ in held[rank] for rank, name in enumerate(present) if name in took_part):
            return round_, holders[0]
    return 0, 0


_HANDOVER_SLACK = 64 << 20
"""Bytes a resume hand-over may hold beyond 8 flat states: the records of every round so far."""


def _take_from(source: int, state: TrainState, needed: bool, reducer: SealedRing | None = None) -> None:
    """`source`'s unified weights, unifier state and records, for the owners that lack them (`needed`).

    A collective (every rank joins); an owner that had the round keeps its own unifier state, which may
    hold per-owner parts (residuals) beside the shared ones. With trust on the weights are data-derived,
    so they travel sealed: a sum over the ring of the source's bytes and everyone else's zeros.
    """
    flat = state.unifier.flat
    payload = io.BytesIO()
    torch.save({"unifier": state.unifier.state_dict(), "records": state.records}, payload)
    mine = torch.frombuffer(bytearray(payload.getvalue()), dtype=torch.uint8)
    flat.pull_ints()
    parts = [flat.buffer, *flat.narrow.values(), flat.ints]  # unified tensors: frozen ones are equal, local ones stay
    cap = _HANDOVER_SLACK + 8 * flat.buffer.numel() * flat.buffer.element_size()  # anchor, momentum, residual, records
    if reducer is None:
        for t in parts:
            dist.broadcast(t, src=source)  # collective; equal bits on the owners that had the round
        received = broadcast_bytes(mine.numpy().tobytes(), source, limit=cap, what="a resume hand-over")  # collective
        blob = torch.frombuffer(bytearray(received), dtype=torch.uint8) if received else torch.zeros(0, dtype=torch.uint8)
    else:
        is_source = dist.get_rank() == source
        size = torch.tensor([mine.numel() if is_source else 0], dtype=torch.int64)
        reducer.all_reduce(size)  # collective, sealed
        if not 0 < int(size) <= cap:
            raise WireError(f"the resume hand-over from rank {source} claims {int(size)} bytes, outside 1..{cap}")
        blob = mine if is_source else torch.zeros(int(size), dtype=torch.uint8)
        for t in [*parts, blob]:
            raw = t.view(torch.uint8)
            if not is_source:
                raw.zero_()
            reducer.all_reduce(raw)  # integer sum of one owner's bytes and zeros: exactly the source's bytes
    flat.push_ints()
    if needed:  # weights_only: tensors, numbers, strings, lists, dicts; never code from the wire
        shared_state = torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=True)
        state.unifier.load_state_dict(shared_state["unifier"])
        state.records[:] = shared_state["records"]