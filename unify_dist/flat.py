"""A model's unified state as views into flat buffers, so a unify is one collective and copies nothing.

After `FlatState(model)`, every *unified* floating-point parameter and buffer of the model (its role,
unify_dist.roles) *is* a slice of `flat.values` (or, for float dtypes narrower than the main buffer's,
bf16 / fp16, of `flat.narrow[dtype]`): a collective on that buffer changes the model in place. Each keeps
its dtype and memory layout (a channels_last weight stays channels_last; its slice holds the elements in
memory order). Unified int64 buffers (BatchNorm's num_batches_tracked) are views of a small int64 buffer,
`flat.ints`; other integer buffers keep their own tensors and dtype, copied into it and back around a
unify (`pull_ints` / `push_ints`). Frozen and local tensors are not touched: they keep their own storage.
Build it after moving the model to its device and before creating the optimizer; in-place updates
(optimizer steps, load_state_dict) keep the views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unify_dist.digest import state_digest
from unify_dist.roles import FROZEN, LOCAL, RoleTable, role_table

__all__ = ["FlatState", "Slot"]


@dataclass(frozen=True)
class Slot:
    name: str
    start: int
    end: int


class FlatState:
    """The unified state of `model`, re-pointed into flat buffers laid out by its role table.

    `roles`: the table (unify_dist.roles.role_table); None builds the default one (trainable parameters
    and buffers unified, the rest frozen). `tail` extra float elements are allocated after the values:
    the unify layer uses them to ride per-owner flags and weights along in the same collective instead
    of paying for a second one.
    """

    def __init__(self, model: nn.Module, tail: int = 0, roles: RoleTable | None = None):
        self.roles = roles if roles is not None else role_table(model)
        tensors = self.roles.tensors
        main = [(e.name, tensors[e.name]) for e in self.roles.in_slot("values")]
        device = next((t.device for t in tensors.values()), torch.device("cpu"))
        self.numel = sum(t.numel() for _, t in main)
        self.buffer = torch.empty(self.numel + tail, dtype=self.roles.main_dtype, device=device)
        self.slots = _rebind(model, main, self.buffer)
        # bf16 / fp16 tensors: a buffer per dtype, so they keep their dtype (unify_dist.narrow unifies them)
        self.narrow: dict[torch.dtype, Tensor] = {}
        self.narrow_slots: dict[torch.dtype, list[Slot]] = {}
        for dtype in self.roles.narrow_dtypes():
            named = [(e.name, tensors[e.name]) for e in self.roles.in_slot(str(dtype).removeprefix("torch."))]
            self.narrow[dtype] = torch.empty(sum(t.numel() for _, t in named), dtype=dtype, device=device)
            self.narrow_slots[dtype] = _rebind(model, named, self.narrow[dtype])
        ints = [(e.name, tensors[e.name]) for e in sorted(self.roles.in_slot("ints"), key=lambda e: e.start)]
        self.ints = torch.empty(sum(t.numel() for _, t in ints), dtype=torch.int64, device=device)
        wide = [(n, t) for n, t in ints if t.dtype == torch.int64]  # laid out first (roles._lay_out)
        self.int_slots = _rebind(model, wide, self.ints)
        # other integer dtypes (int32, uint8, ...) keep their tensors: copied in and out of self.ints, exactly
        self._int_copies: list[tuple[Tensor, Slot]] = []
        offset = self.int_slots[-1].end if self.int_slots else 0
        for name, t in ints[len(wide) :]:
            slot = Slot(name, offset, offset + t.numel())
            self.int_slots.append(slot)
            self._int_copies.append((t, slot))
            offset += t.numel()
        self.pull_ints()
        self.frozen = [(n, tensors[n]) for n in self.roles.names(FROZEN)]
        # what the digest covers: every name of every unified and frozen tensor, as the model's state dict has
        # them (tied weights under each name), taken after the rebinding above; local tensors are left out
        local = set(self.roles.names(LOCAL))
        everything = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        self.named = [(n, t) for n, t in everything if n not in local]

    def pull_ints(self) -> None:
        """Copy the integer buffers that are not views (int32, ...) into `ints`, before a collective reads it."""
        for t, s in self._int_copies:
            self.ints[s.start : s.end].copy_(t.detach().reshape(-1))

    def push_ints(self) -> None:
        """Copy `ints` back into the integer buffers that are not views, after a collective wrote it."""
        for t, s in self._int_copies:
            t.copy_(self.ints[s.start : s.end].view(t.shape))

    def find_nonfinite_narrow(self) -> str | None:
        """The name of a bf16 / fp16 tensor holding NaN/Inf, else None (host sync, only when there are some)."""
        for dtype, buffer in self.narrow.items():
            # its least and greatest value: a NaN or an Inf shows in one of them, exactly, in the buffer's own
            # dtype (no widened copy; a sum could overflow fp16). 8.4M bf16 elements: 1 ms against 19 ms for
            # buffer.float().sum(), which took 0.04-0.15 s a unify under load (docs/finetune.md)
            if buffer.numel() and not all(torch.isfinite(v) for v in torch.aminmax(buffer)):  # host sync
                bad = (~torch.isfinite(buffer)).nonzero()
                if bad.numel():
                    index = int(bad[0])
                    return next(s.name for s in self.narrow_slots[dtype] if s.start <= index < s.end)
        return None

    @property
    def values(self) -> Tensor:
        """All float state, flat (the tail excluded)."""
        return self.buffer[: self.numel]

    @property
    def tail(self) -> Tensor:
        return self.buffer[self.numel :]

    def slot_of(self, index: int) -> str:
        """Name of the tensor that holds flat element `index` (for error messages)."""
        for s in self.slots:
            if s.start <= index < s.end:
                return s.name
        return "?"

    def digest(self) -> str:
        """16 hex digits of BLAKE2b over every named tensor (unify_dist.digest): equal digests mean equal
        bits, and the same digest is computed offline from a state dict with these tensors. Unified and
        frozen tensors only: each owner keeps its own local ones (roles)."""
        return state_digest(self.named)  # host sync + copies on GPU; once per round


def _rebind(model: nn.Module, named: list[tuple[str, Tensor]], buffer: Tensor) -> list[Slot]:
    slots, offset = [], 0
    for name, tensor in named:
        # the tensor's own memory layout when it is dense (channels_last convolutions stay channels_last)
        strides = torch.empty_like(tensor, device="meta").stride()
        view = buffer[offset : offset + tensor.numel()].as_strided(tensor.shape, strides)
        view.copy_(tensor.detach().to(buffer.dtype))
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(tensor, nn.Parameter):
            tensor.data = view  # same Parameter object, so optimizers and hooks still see it
        else:
            module._buffers[leaf] = view
        slots.append(Slot(name, offset, offset + tensor.numel()))
        offset += tensor.numel()
    return slots
