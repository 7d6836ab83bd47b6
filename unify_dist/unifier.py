"""The public face of unification: `same_start` once, then `Unifier.unify` after every local epoch.

Example, on every owner's process (launched with torchrun, or any process group)::

    import torch.distributed as dist
    import unify_dist as ud

    dist.init_process_group("gloo")
    model = MyModel()
    ud.same_start(model)                              # rank 0's weights everywhere, proven identical
    unifier = ud.Unifier(model, rule="avg")           # any registered rule, any option of UnifyConfig
    optimizer = torch.optim.Adam(model.parameters())  # before or after the Unifier: both work
    for epoch in range(10):
        train_one_epoch(model, optimizer, my_loader)  # the owner's own loop, untouched
        outcome = unifier.unify(weight=len(my_dataset))
        print(outcome.digest, outcome.skipped, outcome.seconds)

`Unifier(model)` gives every tensor a role (unify_dist.roles: unified, frozen, local; by default trainable
parameters and float buffers are unified and the rest frozen, `frozen=[...]` / `local=[...]` name patterns
override it) and re-points the unified float tensors into flat buffers (the same Parameter objects, so
optimizers, hooks and AMP keep working), so a unify is one collective with no copies, and moves only
what trains. Frozen tensors are proven identical once, here, and never touched again; local ones stay
each owner's. Unified integer buffers keep their dtype and exact value and take the largest value over
owners (int_rule = "max", the furthest counter; or "min"). bf16 / fp16 tensors are unified with fp32
arithmetic (unify_dist.narrow).

Order of one unify (unify_dist.wrappers composes the concerns around the core):
  1. this owner checks its weights for NaN/Inf (nonfinite = fail: every rank stops; skip: left out);
  2. update space (when an option needs it): update = weights - anchor, per local step (normalize_steps),
     clipped, noised;
  3. the rule's own per-owner step (ties' trim), then its collective (unify_dist.collectives); with
     unify.compress the update, plus what earlier rounds could not send, travels compressed;
  4. the unified update times the owners' mean step count (normalize_steps, unify_dist.fednova), through
     the outer optimizer (unify_dist.outer), back to weights, new anchor;
  5. every rank's digest gathered and compared: equal bits, or DivergenceError.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from unify_dist.collectives import Collective, DivergenceError, NonFiniteError, tail_size, verify_identical
from unify_dist.config import UnifyConfig, outer_settings
from unify_dist.fednova import mean_steps
from unify_dist.flat import FlatState
from unify_dist.outer import OuterOptimizer
from unify_dist.lora import LORA_RULES, check_exact_roles, lora_pairs, prepare_lora, unify_exact
from unify_dist.narrow import unify_narrow
from unify_dist.roles import RoleError, check_same_roles, role_table
from unify_dist.rules import RULES, SPECS
from unify_dist.wire import WireError, broadcast_tensor, gather_bytes, gather_json
from unify_dist.wrappers import ClipUpdate, ErrorFeedback, GaussianNoise, UpdateSpace, int8_levels

__all__ = ["Unifier", "UnifyOutcome", "same_start", "structure"]


@dataclass(frozen=True)
class UnifyOutcome:
    """What one unify did. The same on every rank, except `seconds` (this rank's wall time)."""

    rule: str
    """The rule that ran."""
    skipped: list[int]
    """Ranks left out of this unify because their weights were not finite (nonfinite = skip)."""
    digest: str | None
    """16 hex digits of BLAKE2b over the unified state, equal on every rank (None: verify=False)."""
    seconds: float
    """Wall time of the unify on this rank, the digest check excluded."""
    dp_epsilon: float | None = None
    """With dp_noise_multiplier > 0: this owner's privacy spent so far (epsilon at UnifyConfig.dp_delta)."""
    bytes_sent: int = 0
    """Bytes this owner put on the wire for the unify, estimated for ring collectives (2 (W-1)/W of an
    all_reduce's buffer, W-1 times its own part of an all_gather); the digest check excluded."""
    digests: list[str] | None = None
    """Every rank's own digest, gathered by the identity check (rank order; None: verify=False)."""


class Unifier:
    """Unify one model's weights across the owners of a process group, with any registered rule.

    Args:
        model: any nn.Module on one device whose unified and frozen state is identical on every rank
            (call `same_start(model)` first). Built once; its unified tensors become views of its buffers.
        rule: a registered rule name (`unify_dist.rules.RULES`; add your own with `register_rule`).
        group: the process group of the owners; None means the default (WORLD).
        reducer: None for the group's own collectives; else an object with `all_reduce(tensor, op)` and
            `all_gather(out, tensor)` that every collective goes through, the checks at construction
            included: with trust on, a `unify_dist.trust.SealedRing` (sealed and authenticated), and
            `unify_dist.staging.HostStaged` for GPU models over gloo.
        **options: any UnifyConfig field (nonfinite="skip", space="delta", frozen=["vit.*"], local=["head.*"], ...).

    With a reducer, a unify that fails (IntegrityError from the sealed ring, a peer gone, diverging
    digests) leaves the model with exactly its weights from before the call, and its message says so.

    A collective to construct (it checks that every owner has the same structure and weights) and to
    call: every rank of the group must do both. `state_dict()` / `load_state_dict()` carry what lives
    across rounds (anchor, momentum, privacy spent) for checkpoints.
    """

    def __init__(self, model: nn.Module, rule: str = "avg", group: dist.ProcessGroup | None = None, *,
                 reducer: Any = None, **options: Any):  # fmt: skip
        cfg = unify_options(rule, options)
        world = dist.get_world_size(group)
        check_same_structure(model, group, reducer=reducer)  # collective; ValueError naming the layer
        prepare_lora(model, cfg.rule)  # ValueError: a LoRA rule without adapters; lora_ffa freezes every A
        roles = role_table(model, cfg.frozen, cfg.local)  # ValueError naming a pattern that matches nothing
        flat = FlatState(model, tail=tail_size(world, model), roles=roles)
        check_same_roles(roles, group, reducer)  # collective; ValueError naming a tensor whose role differs
        try:
            verify_identical(flat, group, reducer)  # collective
        except DivergenceError:
            raise ValueError(
                "owners start from different weights; call unify_dist.same_start(model) on every owner "
                "before building the Unifier"
            ) from None
        self._setup(flat, cfg, group, reducer)

    @classmethod
    def over(cls, flat: FlatState, cfg: UnifyConfig, group: dist.ProcessGroup | None = None, reducer: Any = None) -> "Unifier":
        """A Unifier over an existing FlatState whose ranks already hold the same weights (the program's
        round loop, tests, benchmarks): no structure or weight check, no collective."""
        self = cls.__new__(cls)
        self._setup(flat, cfg, group, reducer)
        return self

    def _setup(self, flat: FlatState, cfg: UnifyConfig, group: dist.ProcessGroup | None, reducer: Any) -> None:
        if cfg.overlap:
            raise ValueError("unify.overlap is the round loop's (unify_dist.overlap.OverlappedUnifier); a Unifier "
                             "unifies when called: build it with overlap=False")  # fmt: skip
        self.flat, self.cfg, self.group, self.rule = flat, cfg, group, cfg.rule
        self.rank = dist.get_rank(group)
        self.core = Collective(flat, group, cfg.absmax_impl, cfg.chunk_elements, cfg.int_rule)
        self.core.reducer = reducer  # wired once, here: every collective of every unify goes through it
        self._kept: _Kept | None = None  # with a reducer: the state before the current unify (made on first use)
        # The concerns, in the order they run (module docstring); None / [] when their option is off,
        # and then the core's paths run untouched (no anchor copy, not one extra pass).
        self.space = UpdateSpace(flat.values) if _needs_anchor(cfg) else None
        self.owner_steps: list[Any] = []
        if cfg.update_norm_bound > 0:
            self.owner_steps.append(ClipUpdate(cfg.update_norm_bound))
            if cfg.dp_noise_multiplier > 0:
                self.owner_steps.append(GaussianNoise(cfg.dp_noise_multiplier, cfg.update_norm_bound, cfg.dp_delta))
        self.unified_steps: list[Any] = []
        outer = outer_settings(cfg)  # unify.outer, or the server_* names of outer = sgd
        if outer is not None:
            self.unified_steps.append(OuterOptimizer(*outer, like=flat.values))
        self.compress = ErrorFeedback(cfg.compress, flat.values) if cfg.compress != "none" else None
        _check_compress_world(cfg.compress, self.core.world, reducer)
        if flat.narrow:
            for name in dict.fromkeys([cfg.rule, *cfg.compare]):
                _check_narrow(flat, cfg, name)
        self.lora = _lora_setup(flat, cfg)

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Anchor, momentum, privacy spent and the compression residual, when the options in use keep
        them ({} for plain rules). The residual is this owner's own: each owner checkpoints its state."""
        state: dict[str, Any] = {}
        for part in (self.space, *self.owner_steps, *self.unified_steps, self.compress):
            if part is not None and hasattr(part, "state_dict"):
                state.update(part.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict() in place; call after the model's weights are restored."""
        if self.space is not None:
            self.space.load_state_dict(state, self.flat.values)
        for part in (*self.owner_steps, *self.unified_steps, *([self.compress] if self.compress else [])):
            if hasattr(part, "load_state_dict"):
                part.load_state_dict(state)

    # ------------------------------------------------------------------------------------ unify
    def unify(self, weight: float = 1.0, *, rule: str | None = None, commit: bool = True, verify: bool = True,
              steps: int = 0) -> UnifyOutcome:  # fmt: skip
        """Replace this owner's weights with the unified weights of all owners. A collective.

        weight: this owner's weight for weighted rules (its local sample count, say); others ignore it.
        steps: this owner's local steps since the last unify; used (and needed, >= 1) with normalize_steps.
        rule: another registered rule for this call only (side-by-side comparisons).
        commit: False leaves anchor and momentum as they were (a candidate that will be thrown away).
        verify: False skips the digest check (benchmarks; the round loop always verifies).

        With a reducer, a failure leaves this owner's state as it was before the call (see the class).
        """
        if self.core.reducer is None:  # the group's own collectives: no copy, as it always ran
            return self._unify(weight, rule, commit, verify, steps)
        # a copy of what the call may change in place (the sealed ring writes as it goes), into buffers
        # kept across calls: a fresh state-sized allocation per unify costs page faults, not just a copy
        if self._kept is None:
            self._kept = _Kept(self)
        else:
            self._kept.take()
        try:
            return self._unify(weight, rule, commit, verify, steps)
        except Exception as e:
            self._kept.restore()
            raise _kept_note(e) from e

    def _unify(self, weight: float, rule: str | None, commit: bool, verify: bool, steps: int) -> UnifyOutcome:
        name = rule or self.rule
        if name not in RULES:
            raise ValueError(_unknown_rule(name))
        spec = SPECS[name]
        if spec.delta_only and self.space is None:
            raise ValueError(f"unify rule '{name}' works on updates: name it in the rule or in UnifyConfig.compare")
        if self.flat.narrow:
            _check_narrow(self.flat, self.cfg, name)
        if name in LORA_RULES and name != self.rule:
            raise ValueError(f"unify rule '{name}' needs the roles it sets up at construction: build the Unifier "
                             f"with rule='{name}'")  # fmt: skip
        if name == "lora_exact":
            return self._unify_lora_exact(weight, verify)
        self.flat.roles.check_frozen_unchanged()  # ValueError: a frozen tensor would drift apart
        if self.compress is not None and self.core.path(spec) not in ("sum", "weighted_sum"):
            raise ValueError(f"unify.compress = '{self.compress.mode}' serves sums only (avg, weighted_avg), not "
                             f"unify rule '{name}': unify it with a Unifier whose compress is 'none'")  # fmt: skip
        if self.cfg.normalize_steps and self.core.path(spec) not in ("sum", "weighted_sum"):
            raise ValueError(f"unify.normalize_steps rescales a mean of updates (avg, weighted_avg), not unify rule "
                             f"'{name}': unify it with a Unifier whose normalize_steps is false")  # fmt: skip
        delta = self.space is not None and (self.cfg.space == "delta" or spec.delta_only or self.compress is not None
                                            or self.cfg.normalize_steps)  # fmt: skip
        options = {k: getattr(self.cfg, k) for k in spec.options}
        values = self.flat.values
        t0 = time.perf_counter()
        self.core.bytes_sent = 0
        counts = self._agree_steps(weight, steps) if self.cfg.normalize_steps else None  # collective

        # 1. with nothing to do before the collective, the core checks (the sum paths in the pass that
        # scales the values: one trip through memory); else this owner checks first, here
        local_work = (self.space is not None and (delta or bool(self.owner_steps))) or spec.owner_step is not None
        self.flat.pull_ints()  # int32 (and other non-int64) buffers into the integer buffer
        narrow_sick = self.flat.find_nonfinite_narrow() if self.flat.narrow else None  # host sync
        checked = local_work or self.compress is not None or narrow_sick is not None
        sick_tensor = narrow_sick or (self.core.find_nonfinite() if checked else None)  # host sync
        if sick_tensor is None:
            self._owner_side(values, delta, commit, steps if counts is not None else 0)  # 2.
            if spec.owner_step is not None:
                values.copy_(spec.owner_step(values, **options))  # 3. needs this owner's whole vector
        combine = spec.combine or partial(spec.reference, **options)
        if self.compress is not None:
            flags = self.core.compressed_sum(spec, self.compress, weight, sick_tensor is not None, commit)  # 3. collective
        else:
            flags = self.core.reduce(spec, combine, weight, sick_tensor is not None if checked else None)  # 3. collective
            sick_tensor = sick_tensor if checked else self.core.sick_tensor
        sick = [r for r in range(self.core.world) if flags[r] > 0]
        if sick and self.cfg.nonfinite == "fail":
            mine = f"owner {self.rank} has non-finite weights in '{sick_tensor}'" if sick_tensor else None
            raise NonFiniteError(
                (mine or f"owner(s) {sick} have non-finite (NaN/Inf) weights")
                + " before unify; lower the learning rate, or set unify.nonfinite=skip to leave such owners out"
            )
        if len(sick) == self.core.world:
            raise NonFiniteError("every owner has non-finite weights: there is nothing left to unify")
        if counts is not None:  # FedNova: the mean of per-step updates, back to a mean round's length
            healthy = [r for r in range(self.core.world) if r not in sick]
            weights = counts[healthy, 0] if self.core.path(spec) == "weighted_sum" else torch.ones(len(healthy))
            values.mul_(mean_steps(counts[healthy, 1], weights))
        unify_narrow(self.core, combine, weight, flags)  # collective, when bf16 / fp16 tensors are unified
        self.flat.push_ints()
        if self.space is not None:
            self._unified_side(values, delta, commit)  # 4.
        seconds = time.perf_counter() - t0
        digests = verify_identical(self.flat, self.group, self.core.reducer) if verify else None  # 5. collective
        noise = next((s for s in self.owner_steps if isinstance(s, GaussianNoise)), None)
        epsilon = noise.epsilon() if noise else None
        return UnifyOutcome(name, sick, digests[0] if digests else None, seconds, epsilon, self.core.bytes_sent, digests)

    def _agree_steps(self, weight: float, steps: int) -> torch.Tensor:
        """Every owner's (weight, local steps), rank order, on every rank: one small all_gather of float64.

        A count below 1 raises the same ValueError on every rank (after the gather: nobody is left waiting).
        """
        mine = torch.tensor([weight, float(steps)], dtype=torch.float64, device=self.flat.values.device)
        out = [torch.empty_like(mine) for _ in range(self.core.world)]
        self.core._all_gather(out, mine)  # collective (the reducer's with trust on)
        counts = torch.stack(out).cpu()
        missing = [r for r in range(self.core.world) if not counts[r, 1] >= 1]
        if missing:
            raise ValueError(f"unify.normalize_steps needs every owner's local step count, and owner(s) {missing} "
                             "passed none: call unify(weight, steps=N) with N >= 1 local steps since the last unify")  # fmt: skip
        return counts

    def _unify_lora_exact(self, weight: float, verify: bool) -> UnifyOutcome:
        """lora_exact (unify_dist.lora): owners' factors gathered, averaged, each residual folded into its base."""
        self.flat.roles.check_frozen_unchanged()
        t0 = time.perf_counter()
        self.core.bytes_sent = 0
        self.flat.pull_ints()
        sick_tensor = self.core.find_nonfinite()  # host sync
        flags = unify_exact(self.core, self.lora, weight, sick_tensor is not None, self.flat.roles.tensors)  # collective
        sick = [r for r in range(self.core.world) if flags[r] > 0]
        if sick and self.cfg.nonfinite == "fail":
            mine = f"owner {self.rank} has non-finite weights in '{sick_tensor}'" if sick_tensor else None
            raise NonFiniteError((mine or f"owner(s) {sick} have non-finite (NaN/Inf) weights")
                                 + " before unify; lower the learning rate, or set unify.nonfinite=skip")  # fmt: skip
        if len(sick) == self.core.world:
            raise NonFiniteError("every owner has non-finite weights: there is nothing left to unify")
        self.flat.push_ints()
        seconds = time.perf_counter() - t0
        digests = verify_identical(self.flat, self.group, self.core.reducer) if verify else None  # collective
        return UnifyOutcome("lora_exact", sick, digests[0] if digests else None, seconds, None, self.core.bytes_sent,
                            digests)  # fmt: skip

    def _owner_side(self, values: torch.Tensor, delta: bool, commit: bool, steps: int = 0) -> None:
        """Local, before any collective: this owner's (per-step, clipped, noised) update, or weights = anchor + that."""
        if self.space is None or not (delta or self.owner_steps):
            return
        values.sub_(self.space.anchor)  # this owner's update since the last unified model
        if steps:
            values.div_(steps)  # FedNova: the update per local step
        for step in self.owner_steps:
            step(values, commit)
        if not delta:
            values.add_(self.space.anchor)

    def _unified_side(self, values: torch.Tensor, delta: bool, commit: bool) -> None:
        """Local, after the collective, the same arithmetic on identical tensors on every rank."""
        assert self.space is not None
        anchor = self.space.anchor
        if self.unified_steps:
            if not delta:
                values.sub_(anchor)  # the round's unified update
            for step in self.unified_steps:
                step(values, commit)
            values.add_(anchor)
        elif delta:
            values.add_(anchor)
        if commit:
            anchor.copy_(values)


class _Kept:
    """What a unify may change in place: the flat state, the anchor, the outer optimizer's momentum, the compression
    residual. The noise's privacy accounting is not rolled back: noised bytes may have left already."""

    def __init__(self, unifier: Unifier):
        self.unifier = unifier
        self.values, self.ints = unifier.flat.values.clone(), unifier.flat.ints.clone()
        self.narrow = {dtype: buffer.clone() for dtype, buffer in unifier.flat.narrow.items()}  # bf16 / fp16 tensors
        self.anchor = unifier.space.anchor.clone() if unifier.space is not None else None
        self.residual = unifier.compress.residual.clone() if unifier.compress is not None else None
        self._momentum()

    def take(self) -> None:
        """Copy the current state into the buffers kept from the first call."""
        u = self.unifier
        self.values.copy_(u.flat.values)
        self.ints.copy_(u.flat.ints)
        for dtype, buffer in self.narrow.items():
            buffer.copy_(u.flat.narrow[dtype])
        if self.anchor is not None:
            self.anchor.copy_(u.space.anchor)
        if self.residual is not None:
            self.residual.copy_(u.compress.residual)
        self._momentum()

    def _momentum(self) -> None:
        # OuterOptimizer replaces its momentum tensor on commit (never writes into it): keeping the reference is enough
        self.momentum = [(s, s.momentum) for s in self.unifier.unified_steps if isinstance(s, OuterOptimizer)]

    def restore(self) -> None:
        u = self.unifier
        u.flat.values.copy_(self.values)
        u.flat.ints.copy_(self.ints)
        u.flat.push_ints()  # int32 and other buffers that are copies of `ints`
        for dtype, buffer in self.narrow.items():
            u.flat.narrow[dtype].copy_(buffer)
        if self.anchor is not None:
            u.space.anchor.copy_(self.anchor)
        for step, momentum in self.momentum:
            step.momentum = momentum
        if self.residual is not None:
            u.compress.residual.copy_(self.residual)


def _kept_note(error: Exception) -> Exception:
    """`error` of the same type, saying that the model holds its weights from before the unify."""
    note = f"{error}; this owner's model holds exactly its weights from before this unify (nothing of it was applied)"
    try:
        return type(error)(note)
    except Exception:  # an exception type that takes other arguments
        return RuntimeError(note)


def _needs_anchor(cfg: UnifyConfig) -> bool:
    """Whether any option in use needs the previous unified state."""
    delta_rule = any(SPECS[r].delta_only for r in [cfg.rule, *cfg.compare] if r in SPECS)
    server = outer_settings(cfg) is not None
    return (cfg.space == "delta" or delta_rule or cfg.update_norm_bound > 0 or server or cfg.compress != "none"
            or cfg.normalize_steps)  # fmt: skip


def _check_narrow(flat: FlatState, cfg: UnifyConfig, name: str) -> None:
    """bf16 / fp16 unified tensors are unified in weight space by a rule's reference (unify_dist.narrow);
    ValueError for what that path does not serve (the options that work on updates, secure_avg, ties)."""
    spec = SPECS.get(name)
    dtypes = ", ".join(str(d).removeprefix("torch.") for d in flat.narrow)
    fix = "cast the unified tensors to one float dtype (model.float()), or freeze them (requires_grad / frozen=[...])"
    if _needs_anchor(cfg):
        raise RoleError(f"the model unifies {dtypes} tensors beside {str(flat.values.dtype).removeprefix('torch.')} "
                         f"ones, and the update-space options (space, clipping, server momentum, compress) serve one "
                         f"float dtype; {fix}")  # fmt: skip
    if spec is not None and (spec.collective == "masked_sum" or spec.owner_step is not None):
        raise RoleError(f"unify rule '{name}' serves one float dtype, and the model unifies {dtypes} tensors too; {fix}")


def _lora_setup(flat: FlatState, cfg: UnifyConfig) -> list:
    """The adapter pairs when a LoRA rule is in use (unify_dist.lora), checked against the roles; else []."""
    names = [n for n in dict.fromkeys([cfg.rule, *cfg.compare]) if n in LORA_RULES]
    if not names:
        return []
    model = flat.roles.model
    pairs = lora_pairs(model) if model is not None else []
    if not pairs:
        prepare_lora(model if model is not None else nn.Module(), names[0])  # raises: no adapters
    if "lora_exact" in names:
        if _needs_anchor(cfg) or flat.narrow:
            raise RoleError("unify rule 'lora_exact' runs in weight space on one float dtype: set space, clipping, "
                             "server momentum and compress off, and keep the unified tensors in one dtype")  # fmt: skip
        check_exact_roles(pairs, flat.roles)
    if cfg.rule == "lora_ffa":
        trained = [p.a for p in pairs if any(e.name == p.a and e.role != "frozen" for e in flat.roles.entries)]
        if trained:
            raise RoleError(f"unify rule 'lora_ffa' keeps every lora_A frozen, and '{trained[0]}' is not; build "
                             "the roles after unify_dist.lora.prepare_lora(model, 'lora_ffa')")  # fmt: skip
    return pairs


def _check_compress_world(mode: str, owners: int, reducer: Any) -> None:
    """int8 needs a level per sign per owner (ValueError past 127 owners); 16 bits past 3 owners through a
    reducer (trust's sealed ring: no all_to_all, so every owner's rows are gathered) works but sends no
    fewer bytes than plain avg (a warning). Without one it runs sharded: 3/4 of avg's bytes."""
    if mode == "int8" and int8_levels(owners) < 1:
        raise ValueError(f"unify.compress = 'int8' works with at most 127 owners, got {owners}; use bf16 or none")
    if mode in ("bf16", "fp16") and owners >= 4 and reducer is not None:
        warnings.warn(
            f"unify.compress = '{mode}' with {owners} owners through a reducer (trust's sealed ring) gathers "
            f"{(owners - 1) * 2} bytes per weight, no fewer than uncompressed avg's all_reduce; int8 sends under 2 "
            "at any owner count",
            stacklevel=3,
        )


def _unknown_rule(name: str) -> str:
    hint = difflib.get_close_matches(name, list(RULES), n=1) or difflib.get_close_matches(name.lower(), list(RULES), n=1)
    also = f" (did you mean '{hint[0]}'?)" if hint else ""
    return f"unknown unify rule '{name}'{also}; known: {', '.join(RULES)}; add one with unify_dist.register_rule"


def unify_options(rule: str, options: dict[str, Any]) -> UnifyConfig:
    """UnifyConfig from a rule name and keyword options; ValueError naming a wrong option or value."""
    known = {f.name for f in dataclasses.fields(UnifyConfig)} - {"rule"}
    for key in options:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            also = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ValueError(f"Unifier has no option '{key}'{also}; options: {', '.join(sorted(known))}")
    if rule not in RULES:
        raise ValueError(_unknown_rule(rule))
    cfg = UnifyConfig(rule=rule, **options)
    problems = cfg.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return cfg


# ------------------------------------------------------------------------------------ same start


def structure(model: nn.Module) -> list[str]:
    """'name:shape:dtype[ layout]' of every tensor in the model's state: what owners must share to unify.

    The layout counts because a unify combines the flat buffers element by element (unify_dist.flat), in
    memory order: a channels_last weight on one owner and a contiguous one on another would be mixed up.
    """
    return [f"{n}:{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}{_layout(t)}" for n, t in model.state_dict().items()]


def _layout(t: torch.Tensor) -> str:
    """'' for the default (contiguous) layout, else a word for the one the tensor has."""
    if t.is_contiguous():
        return ""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return " channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return " channels_last_3d"
    return f" strides {tuple(t.stride())}"


def check_same_structure(model: nn.Module, group: dist.ProcessGroup | None = None, *, reducer: Any = None) -> None:
    """Raise ValueError on every rank if any owner's model has other tensors, naming the first that differs.

    A collective: the structures cross as UTF-8 JSON (never a pickle), through `reducer` when given.
    """
    everyone = gather_json(structure(model), group, reducer, what="a model structure")  # collective
    odd = [r for r, e in enumerate(everyone) if not (isinstance(e, list) and all(isinstance(x, str) for x in e))]
    if odd:
        raise WireError(f"rank {odd[0]} sent no list of tensor names where its model structure belongs; a peer is broken "
                        "or the bytes were changed on the way")  # fmt: skip
    first = everyone[0]
    for rank, theirs in enumerate(everyone[1:], start=1):
        if theirs != first:
            raise ValueError("owners' models differ: " + structure_difference(first, theirs, rank)
                             + "; every owner must build the same architecture")  # fmt: skip


def structure_difference(first: list[str], other: list[str], rank: int) -> str:
    """The first tensor that differs between rank 0's structure and `rank`'s, in words."""
    mine = {e.split(":")[0]: e for e in first}
    theirs = {e.split(":")[0]: e for e in other}
    for name in mine:
        if name not in theirs:
            return f"rank 0 has '{name}' and rank {rank} does not"
        if mine[name] != theirs[name]:
            _, shape0, dtype0 = mine[name].split(":")
            _, shape1, dtype1 = theirs[name].split(":")
            return f"'{name}' is {shape0} {dtype0} on rank 0 but {shape1} {dtype1} on rank {rank}"
    extra = [n for n in theirs if n not in mine]
    if extra:
        return f"rank {rank} has '{extra[0]}' and rank 0 does not"
    return f"rank {rank} holds the same tensors in another order"


def same_start(model: nn.Module, group: dist.ProcessGroup | None = None, src: int = 0, *, reducer: Any = None) -> str:
    """Give every owner rank `src`'s weights (parameters and buffers), then prove it. A collective.

    Raises ValueError, naming the layer, when the owners' models differ in structure. Returns the
    digest of the common weights (equal on every rank). With `reducer` (trust on: a SealedRing) the
    structures, the weights and the digests all travel through it: sealed, so nobody on the path can
    read or change them; without it they cross in the clear, readable and changeable on the way.
    """
    check_same_structure(model, group, reducer=reducer)  # collective: a mismatch would make the broadcast itself fail
    state = [t for t in (*model.parameters(), *model.buffers())]
    with torch.no_grad():
        for dtype_group in _by_dtype_device(state):
            # one broadcast per dtype and device: flat copies, not one collective per tensor
            buffer = torch.cat([t.detach().reshape(-1) for t in dtype_group])
            broadcast_tensor(buffer, src, group, reducer)  # collective (sealed: the source's bytes plus zeros)
            offset = 0
            for t in dtype_group:
                t.copy_(buffer[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
    digest = _state_digest(model)
    everyone = [d.decode(errors="replace") for d in gather_bytes(digest.encode(), group, reducer, limit=64, what="a digest")]
    if len(set(everyone)) > 1:
        raise RuntimeError(f"same_start: owners still differ after the broadcast (digests {everyone})")
    return digest


def _by_dtype_device(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    seen: set[int] = set()
    for t in tensors:
        if id(t) in seen or t.numel() == 0:  # tied weights appear once
            continue
        seen.add(id(t))
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


def _state_digest(model: nn.Module) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
