"""SCAFFOLD-style control variates, serverless: correct each owner's local gradients for its drift.

Each owner keeps c_i, the mean gradient of its last local round, and every owner holds the same
c = mean over owners of c_i (one all_reduce per round: no server). During local training every gradient
becomes g + c - c_i: an owner whose data pulls one way (only classes 0-4, say) is pushed back by what
the others' gradients looked like. This is SCAFFOLD's option II: with plain SGD, (x - y_i) / (K lr) is
exactly the mean of the uncorrected gradients, which is what we accumulate (it stays right with Adam too).

Round 1 has c = c_i = 0, so it is plain local training. State: state_dict() / load_state_dict().
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Scaffold"]


class Scaffold:
    """Control variates of one owner, over the model's trainable parameters (flat, one collective).

    `reducer`: anything with `all_reduce(tensor, op)` (a SealedRing with trust on: c_i is data-derived, so
    it crosses the wire sealed like a unify); None: gloo's all_reduce on `group`.
    """

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None, reducer=None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.group, self.reducer = group, reducer
        n = sum(p.numel() for p in self.params)
        device = self.params[0].device if self.params else None
        self.mine = torch.zeros(n, device=device)  # c_i
        self.shared = torch.zeros(n, device=device)  # c, identical on every owner
        self._grad_sum = torch.zeros(n, device=device)
        self._correction = torch.zeros(n, device=device)
        self._steps = 0

    def _views(self, flat: Tensor) -> list[Tensor]:
        out, start = [], 0
        for p in self.params:
            out.append(flat[start : start + p.numel()].view_as(p))
            start += p.numel()
        return out

    def begin_round(self) -> None:
        """Before local training: this round's correction c - c_i, and a fresh gradient sum."""
        torch.sub(self.shared, self.mine, out=self._correction)
        self._grad_sum.zero_()
        self._steps = 0
        self._sum_views, self._correction_views = self._views(self._grad_sum), self._views(self._correction)

    def correct_grads(self) -> None:
        """After backward, before the optimizer step: record the raw gradients, then add c - c_i."""
        used = [i for i, p in enumerate(self.params) if p.grad is not None]  # unused layers have no grad
        grads = [self.params[i].grad for i in used]
        torch._foreach_add_([self._sum_views[i] for i in used], grads)
        torch._foreach_add_(grads, [self._correction_views[i] for i in used])
        self._steps += 1

    def end_round(self) -> None:
        """After local training: c_i = this round's mean raw gradient; c = mean of c_i over owners.

        A collective (all_reduce SUM): every owner calls it, every owner ends with the same c.
        """
        if self._steps:
            torch.div(self._grad_sum, self._steps, out=self.mine)
        self.shared.copy_(self.mine)
        if self.reducer is None:
            dist.all_reduce(self.shared, dist.ReduceOp.SUM, group=self.group)  # collective
        else:
            self.reducer.all_reduce(self.shared, dist.ReduceOp.SUM)  # collective, through the reducer (sealed)
        self.shared.div_(dist.get_world_size(self.group))

    def state_dict(self) -> dict[str, Any]:
        return {"mine": self.mine, "shared": self.shared}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mine.copy_(state["mine"])
        self.shared.copy_(state["shared"])
