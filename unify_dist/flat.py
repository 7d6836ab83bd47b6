"""A model's state as views into one contiguous buffer, so a unify is one collective and copies nothing.

After `FlatState(model)`, every floating-point parameter and buffer of the model *is* a slice of
`flat.values`: a collective on that buffer changes the model in place. Each keeps its memory layout (a
channels_last weight stays channels_last; its slice holds the elements in memory order). Integer buffers
(BatchNorm's num_batches_tracked) live in a second, small int64 buffer. Build it after moving the model to
its device and before creating the optimizer; in-place updates (optimizer steps, load_state_dict) keep the
views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unify_dist.digest import state_digest

__all__ = ["FlatState", "Slot"]


@dataclass(frozen=True)
class Slot:
    name: str
    start: int
    end: int


class FlatState:
    """Float and integer state of `model`, re-pointed into two flat buffers.

    `tail` extra float elements are allocated after the values: the unify layer uses them to ride
    per-owner flags and weights along in the same collective instead of paying for a second one.
    """

    def __init__(self, model: nn.Module, tail: int = 0):
        floats = [(n, t) for n, t in _named_state(model) if t.is_floating_point()]
        ints = [(n, t) for n, t in _named_state(model) if not t.is_floating_point()]
        dtypes = {t.dtype for _, t in floats}
        if len(dtypes) > 1:
            raise ValueError(f"FlatState needs one float dtype across the model, found {sorted(map(str, dtypes))}")
        dtype = dtypes.pop() if dtypes else torch.float32
        device = floats[0][1].device if floats else torch.device("cpu")
        self.numel = sum(t.numel() for _, t in floats)
        self.buffer = torch.empty(self.numel + tail, dtype=dtype, device=device)
        self.slots = _rebind(model, floats, self.buffer)
        self.ints = torch.empty(sum(t.numel() for _, t in ints), dtype=torch.int64, device=device)
        self.int_slots = _rebind(model, ints, self.ints)
        # every name of every tensor, as the model's state dict has them (tied weights under each name)
        self.named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]

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
        bits, and the same digest is computed offline from a state dict with these tensors."""
        return state_digest(self.named)  # host sync + copies on GPU; once per round


def _named_state(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


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
