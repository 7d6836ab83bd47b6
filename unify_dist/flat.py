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

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unify_dist.roles import FROZEN, RoleTable, role_table

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
            if not torch.isfinite(buffer.float().sum()):
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
        """16 hex digits of BLAKE2b over the exact bytes of the unified and frozen state: equal digests mean
        equal bits. Local tensors (roles) are left out: each owner keeps its own."""
        h = hashlib.blake2b(digest_size=8)
        self.pull_ints()
        frozen = [t.detach().reshape(-1) for _, t in self.frozen]
        for t in (self.values, *self.narrow.values(), self.ints, *frozen):
            # host sync + copy on GPU; cheap next to a local epoch, and done once per round
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


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
