"""What a unify does to each tensor of a model, said once: the role table.

Every tensor of the model's state (parameters and buffers, tied weights once) has one role:

  unified  combined by the rule every round (it lives in the flat buffer and crosses the wire);
  frozen   proven identical on every owner once, when the Unifier is built, then never touched by a
           unify, so it stays bit-exact after any number of rounds (a pretrained base, a causal mask);
  local    kept per owner: never sent, never compared (FedBN's BatchNorm statistics, FedPer's head).

Default: a parameter is unified when it requires grad and frozen when it does not; a floating-point or
integer buffer is unified (integers by the integer rule, UnifyConfig.int_rule); a bool buffer is frozen
(a mask is a constant, and no rule of a vote over bools means anything). Name patterns override it:
`frozen=[...]` and `local=[...]` (UnifyConfig fields, so `Unifier(model, frozen=["vit.*"])` or
`[unify] local = ["*.running_*"]`), fnmatch globs over full tensor names ('classifier.*', '*.running_*'),
matched against every name of a tied tensor. A pattern that matches nothing is a mistake, and so is a
tensor that two patterns give two roles.

The table is built once, at construction, and everything reads it: FlatState lays out its buffers by
it (the `slot` of each entry), the collective moves only unified tensors, the digest covers unified and
frozen tensors, the program's record names the local ones, the checkpoint stores the table's summary.
Roles do not follow later changes of `requires_grad`: a tensor frozen at construction that later
requires grad raises ValueError at the next unify (it would drift apart on each owner); a unified
tensor that is later frozen stays unified (harmless: owners hold the same bits). To change roles,
build a new Unifier.
"""

from __future__ import annotations

from typing import Any

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from unify_dist.errors import UserError

__all__ = ["UNIFIED", "FROZEN", "LOCAL", "ROLES", "Entry", "RoleTable", "RoleError", "role_table", "check_same_roles"]

UNIFIED, FROZEN, LOCAL = "unified", "frozen", "local"
ROLES = (UNIFIED, FROZEN, LOCAL)

MAIN_DTYPES = (torch.float32, torch.float64)
"""Float dtypes the main flat buffer may have: the fast collective paths' arithmetic runs in its dtype.
Narrower float tensors (bf16, fp16) go to a buffer of their own, unified with fp32 arithmetic."""


class RoleError(UserError, ValueError):
    """A role selection that cannot work: a ValueError for library users, one line and exit 2 in the program."""


@dataclass(frozen=True)
class Entry:
    """One tensor's row of the table."""

    name: str
    role: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    slot: str
    """Where a unify finds it: 'values' (the main float buffer), a dtype name such as 'bfloat16' (the
    buffer of that narrower float dtype), 'ints' (the integer buffer), '' (frozen or local: own storage)."""
    start: int = 0
    """First element in its slot's buffer (0 for frozen and local)."""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class RoleTable:
    """name -> role, dtype, slot, for every tensor of a model's state, in state order."""

    entries: list[Entry]
    main_dtype: torch.dtype = torch.float32
    """The main flat buffer's dtype (float32 unless the model's unified floats are mostly float64)."""
    tensors: dict[str, Tensor] = field(default_factory=dict, repr=False)
    """The model's tensors by name, as they were at construction (frozen and local ones are never rebound)."""
    model: nn.Module | None = field(default=None, repr=False)
    """The model the table describes (rules over module structure, such as unify_dist.lora's, read it)."""

    def names(self, role: str) -> list[str]:
        """The names of every tensor with `role`, in state order."""
        return [e.name for e in self.entries if e.role == role]

    def in_slot(self, slot: str) -> list[Entry]:
        return [e for e in self.entries if e.slot == slot]

    def narrow_dtypes(self) -> list[torch.dtype]:
        """Float dtypes of unified tensors that have a buffer of their own (not the main one)."""
        return list(dict.fromkeys(e.dtype for e in self.entries if e.slot not in ("", "values", "ints")))

    def bytes(self, role: str = UNIFIED) -> int:
        """Bytes of the tensors with `role` in their own dtypes (the size of what a unify combines)."""
        return sum(e.numel * e.dtype.itemsize for e in self.entries if e.role == role)

    def summary(self) -> dict[str, list[str]]:
        """{role: [names]} for the record and the checkpoint."""
        return {role: self.names(role) for role in ROLES}

    def codes(self) -> Tensor:
        """One small integer per entry (its role): what owners compare, as a fixed-layout tensor."""
        return torch.tensor([ROLES.index(e.role) for e in self.entries], dtype=torch.int64)

    def check_frozen_unchanged(self) -> None:
        """ValueError naming a parameter frozen at construction that now requires grad (it would drift)."""
        for e in self.entries:
            t = self.tensors.get(e.name)
            if e.role == FROZEN and isinstance(t, nn.Parameter) and t.requires_grad:
                raise RoleError(
                    f"'{e.name}' was frozen when the Unifier was built and now requires grad, so owners would "
                    "train it apart; build a new Unifier after choosing which layers train, or name it in local=[...]"
                )

    def describe(self) -> str:
        """One line: how many tensors and elements each role has (the program says it at start-up)."""
        parts = []
        for role in ROLES:
            chosen = [e for e in self.entries if e.role == role]
            if chosen:
                parts.append(f"{role} {len(chosen)} tensors ({sum(e.numel for e in chosen):,} elements)")
        return "tensor roles: " + ", ".join(parts)


def role_table(
    model: nn.Module, frozen: list[str] | tuple[str, ...] = (), local: list[str] | tuple[str, ...] = (), *, source: str = ""
) -> RoleTable:
    """The role of every tensor of `model` (module docstring), with slots laid out for FlatState.

    `source` prefixes pattern errors with where the patterns came from ('unify.' in the program).
    Raises RoleError (a ValueError) for a pattern that matches nothing or a tensor given two roles.
    """
    named = _named_state(model)
    aliases = _aliases(model)
    roles: dict[str, str] = {}
    used: set[tuple[str, str]] = set()
    for name, t in named:
        all_names = aliases.get(id(t), [name])
        hits = {kind: [p for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in all_names)]
                for kind, patterns in ((FROZEN, frozen), (LOCAL, local))}  # fmt: skip
        if hits[FROZEN] and hits[LOCAL]:
            raise RoleError(f"'{name}' matches {source}frozen pattern '{hits[FROZEN][0]}' and {source}local pattern "
                            f"'{hits[LOCAL][0]}'; give each tensor one role")  # fmt: skip
        used.update((kind, p) for kind, ps in hits.items() for p in ps)
        roles[name] = LOCAL if hits[LOCAL] else FROZEN if hits[FROZEN] else _default_role(t)
    for kind, patterns in ((FROZEN, frozen), (LOCAL, local)):
        for p in patterns:
            if (kind, p) not in used:
                examples = ", ".join(f"'{n}'" for n, _ in named[:3])
                raise RoleError(f"{source}{kind} pattern '{p}' matches no tensor of the model; patterns are globs "
                                f"over full names such as {examples} (unify_dist.structure(model) lists them all)")  # fmt: skip
    table = _lay_out(named, roles)
    table.model = model
    return table


def _default_role(t: Tensor) -> str:
    if isinstance(t, nn.Parameter):
        return UNIFIED if t.requires_grad else FROZEN
    return FROZEN if t.dtype == torch.bool else UNIFIED


def _lay_out(named: list[tuple[str, Tensor]], roles: dict[str, str]) -> RoleTable:
    """Slots and offsets: main floats, each narrower float dtype, then int64 integers before other integers
    (the int64 ones are views of FlatState's integer buffer; the others are copied in and out of it)."""
    unified = [(n, t) for n, t in named if roles[n] == UNIFIED]
    floats = [(n, t) for n, t in unified if t.is_floating_point()]
    sizes = {d: sum(t.numel() for _, t in floats if t.dtype == d) for d in MAIN_DTYPES}
    main = max(MAIN_DTYPES, key=lambda d: sizes[d]) if any(sizes.values()) else torch.float32
    offsets: dict[str, int] = {}
    slot_of: dict[str, tuple[str, int]] = {}

    def place(name: str, t: Tensor, slot: str) -> None:
        slot_of[name] = (slot, offsets.get(slot, 0))
        offsets[slot] = offsets.get(slot, 0) + t.numel()

    for n, t in floats:
        place(n, t, "values" if t.dtype == main else str(t.dtype).removeprefix("torch."))
    ints = [(n, t) for n, t in unified if not t.is_floating_point()]
    for n, t in sorted(ints, key=lambda nt: nt[1].dtype != torch.int64):  # stable: state order within each
        place(n, t, "ints")
    entries = []
    for n, t in named:
        slot, start = slot_of.get(n, ("", 0))
        entries.append(Entry(n, roles[n], t.dtype, tuple(t.shape), slot, start))
    return RoleTable(entries, main, dict(named))


def _named_state(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Parameters, then buffers, each tensor once (a tied weight under its first name)."""
    return [*model.named_parameters(), *model.named_buffers()]


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every tensor, tied weights included, keyed by the tensor's id."""
    out: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        out.setdefault(id(t), []).append(name)
    return out


def check_same_roles(table: RoleTable, group: dist.ProcessGroup | None = None, reducer: Any = None) -> None:
    """RoleError on every rank, naming the first tensor whose role differs between owners. A collective.

    Call it once the owners' structures are known to match (unify_dist.unifier.check_same_structure), so
    the tables have the same entries in the same order; one all_gather of a role code per tensor, through
    `reducer` when given (trust on: sealed).
    """
    mine = table.codes()
    world = dist.get_world_size(group)
    backend = dist.get_backend(group)
    nccl = reducer is None and backend == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    mine = mine.to(device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    if reducer is None:
        dist.all_gather(everyone, mine, group=group)  # collective
    else:
        reducer.all_gather(everyone, mine)  # collective, sealed
    for rank, theirs in enumerate(everyone[1:], start=1):
        differ = (theirs != everyone[0]).nonzero()
        if differ.numel():
            e = table.entries[int(differ[0])]
            role0, role_r = ROLES[int(everyone[0][int(differ[0])])], ROLES[int(theirs[int(differ[0])])]
            raise RoleError(f"'{e.name}' is {role0} on rank 0 but {role_r} on rank {rank}; every owner must freeze "
                            "the same layers (requires_grad) and name the same frozen/local patterns")  # fmt: skip
