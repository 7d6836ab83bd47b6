"""SCAFFOLD control variates on a real gloo group: c is the same on every owner and is the mean of the
owners' mean gradients; with plain SGD the corrected path obeys SCAFFOLD's option II identity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.world import run_world
from unify_dist.scaffold import Scaffold


def _round(model: nn.Module, opt: torch.optim.Optimizer, scaffold: Scaffold, x: torch.Tensor, y: torch.Tensor) -> None:
    scaffold.begin_round()
    for i in range(0, len(x), 8):
        opt.zero_grad()
        F.cross_entropy(model(x[i : i + 8]), y[i : i + 8]).backward()
        scaffold.correct_grads()
        opt.step()


def _owner(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    lr, steps = 0.1, 4
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaffold = Scaffold(model)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(8 * steps, 6, generator=g), torch.randint(0, 3, (8 * steps,), generator=g) % (rank + 2)
    flat = lambda: torch.cat([p.detach().flatten() for p in model.parameters()])  # noqa: E731
    out = {}
    for r in range(2):
        start, old_mine = flat(), scaffold.mine.clone()
        correction = scaffold.shared - old_mine
        _round(model, opt, scaffold, x, y)
        path_mean = (start - flat()) / (steps * lr)  # SGD: the mean of the corrected gradients
        scaffold.end_round()
        out[r] = {"path_mean": path_mean, "mine": scaffold.mine.clone(), "shared": scaffold.shared.clone(),
                  "correction": correction}  # fmt: skip
    return out


def test_control_variates_are_shared_and_follow_option_two() -> None:
    out = run_world(_owner, 2)
    for r in range(2):
        assert torch.equal(out[0][r]["shared"], out[1][r]["shared"])  # every owner holds the same c
        torch.testing.assert_close(out[0][r]["shared"], (out[0][r]["mine"] + out[1][r]["mine"]) / 2)
        for rank in range(2):
            o = out[rank][r]
            # option II: (x - y) / (K lr) = mean raw gradient + (c - c_i), and c_i becomes the mean raw gradient
            torch.testing.assert_close(o["path_mean"], o["mine"] + o["correction"], rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(out[0][0]["correction"]) == 0  # round 1 is plain local training
    assert torch.count_nonzero(out[0][1]["correction"]) > 0
