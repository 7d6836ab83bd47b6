"""The public API from a training loop written outside the package: only `unify_dist`'s public names.

Everything here is what a data owner writes: its own model (BatchNorm, tied weights, a frozen layer), its
own optimizer and data, then `ud.same_start`, `ud.Unifier`, `unifier.unify`. Real gloo groups of 2 and 3.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import unify_dist as ud
from tests.world import run_world


class OwnersNet(nn.Module):
    """An owner's own model: BatchNorm (float and integer buffers), a frozen layer, tied weights."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.norm = nn.BatchNorm1d(width)
        self.frozen = nn.Linear(width, width)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, 3)
        self.tied = nn.Linear(width, width, bias=False)
        self.tied.weight = self.head.weight  # one Parameter, two modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.embed(x)))
        return self.out(torch.relu(self.tied(self.head(self.frozen(h)))))


def _owner_data(rank: int, n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n, 8, generator=g) + rank  # owners' data differ
    return x, (x.sum(1) > rank * 8).long() + (x[:, 0] > 0).long()


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    for start in range(0, len(x), 32):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[start : start + 32]), y[start : start + 32]).backward()
        optimizer.step()


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _loop(rank: int, world: int, rule: str) -> dict:
    torch.manual_seed(rank)  # different initial weights on purpose: same_start must fix that
    model = OwnersNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)  # made before the Unifier: must keep working
    start_digest = ud.same_start(model)
    unifier = ud.Unifier(model, rule=rule, nonfinite="skip")
    x, y = _owner_data(rank)
    rounds = []
    for _ in range(3):
        _train_epoch(model, optimizer, x, y)
        local = _params(model)
        outcome = unifier.unify(weight=len(x))
        rounds.append({"outcome": outcome, "local": local, "unified": _params(model),
                       "counter": int(model.norm.num_batches_tracked)})  # fmt: skip
    return {"start": start_digest, "rounds": rounds, "tied": model.tied.weight is model.head.weight,
            "frozen_grad": model.frozen.weight.requires_grad, "state": unifier.state_dict()}  # fmt: skip


@pytest.mark.parametrize("world", [2, 3])
def test_own_loop_every_rank_identical_every_round(world: int) -> None:
    results = run_world(_loop, world, "avg")
    assert len({r["start"] for r in results}) == 1  # same start, proven
    for i in range(3):
        outcomes = [r["rounds"][i]["outcome"] for r in results]
        assert len({o.digest for o in outcomes}) == 1 and outcomes[0].digest is not None
        assert all(o.rule == "avg" and o.skipped == [] and o.seconds > 0 for o in outcomes)
        for r in results[1:]:  # bit-identical weights, not only equal digests
            assert all(torch.equal(a, b) for a, b in zip(r["rounds"][i]["unified"], results[0]["rounds"][i]["unified"]))
        # the unified parameters are the owners' mean (the local models differ: the unify did something)
        locals_ = [r["rounds"][i]["local"] for r in results]
        for j, unified in enumerate(results[0]["rounds"][i]["unified"]):
            expected = torch.stack([loc[j] for loc in locals_]).mean(0)
            torch.testing.assert_close(unified, expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(locals_[0][0], locals_[1][0])
    assert all(r["tied"] and not r["frozen_grad"] for r in results)  # ties and frozen layers untouched
    assert all(r["rounds"][-1]["counter"] == 3 * 3 for r in results)  # BatchNorm's counter: 3 rounds x 3 batches
    assert results[0]["state"] == {}  # plain avg keeps no state across rounds


def _against_average_parameters(rank: int, world: int) -> dict:
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    torch.manual_seed(0)
    ours, theirs = OwnersNet(), OwnersNet()
    ud.same_start(ours)
    unifier = ud.Unifier(ours, rule="avg")
    with torch.no_grad():
        for a, b in zip(ours.parameters(), theirs.parameters()):
            if a.requires_grad:  # a frozen layer is never unified (unify_dist.roles): owners keep it equal
                a.add_(0.1 * (rank + 1) * torch.randn_like(a))
            b.copy_(a)
    unifier.unify()
    average_parameters(iter(theirs.parameters()), dist.group.WORLD)
    return {"ours": _params(ours), "theirs": _params(theirs)}


@pytest.mark.parametrize("world", [2, 3])
def test_avg_equals_torch_average_parameters(world: int) -> None:
    for r in run_world(_against_average_parameters, world):
        for a, b in zip(r["ours"], r["theirs"]):
            if world == 2:  # halving is exact, so both orders give the same bits
                assert torch.equal(a, b)
            else:  # both scale before the sum, torch by x / 3, we by x * (1 / 3): one rounding apart
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _misuse(rank: int, world: int) -> dict[str, str]:
    errors = {}
    torch.manual_seed(rank)
    try:
        ud.Unifier(OwnersNet())  # different weights on each owner: same_start was not called
    except ValueError as e:
        errors["no_same_start"] = str(e)
    try:
        ud.same_start(OwnersNet(width=16 if rank == 0 else 12))
    except ValueError as e:
        errors["structure"] = str(e)
    model = OwnersNet()
    ud.same_start(model)
    for key, kwargs in (("option", {"nonfinit": "skip"}), ("rule", {"rule": "AVG"}), ("value", {"space": "sideways"})):
        try:
            ud.Unifier(model, **kwargs)
        except ValueError as e:
            errors[key] = str(e)
    return errors


def test_misuse_raises_value_error_with_the_fix() -> None:
    for errors in run_world(_misuse, 2):
        assert "same_start" in errors["no_same_start"]
        assert "'embed.weight'" in errors["structure"] and "(16, 8)" in errors["structure"]
        assert "(12, 8)" in errors["structure"] and "rank 1" in errors["structure"]
        assert "did you mean 'nonfinite'" in errors["option"]
        assert "did you mean 'avg'" in errors["rule"]
        assert "unify.space" in errors["value"]


@ud.register_rule("test_api_midrange")
def midrange(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A user's own rule: halfway between the owners' smallest and largest value."""
    return (stacked.amax(0) + stacked.amin(0)) / 2


def _user_rule_and_state(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    ud.same_start(model)
    unifier = ud.Unifier(model, rule="test_api_midrange", space="delta", server_momentum=0.5)
    with torch.no_grad():
        model[0].weight.add_(rank)
    before = model[0].weight.detach().clone()
    outcome = unifier.unify()
    state = unifier.state_dict()
    restored = ud.Unifier(model, rule="test_api_midrange", space="delta", server_momentum=0.5)
    restored.load_state_dict(state)
    return {"before": before, "after": model[0].weight.detach().clone(), "digest": outcome.digest,
            "state_keys": sorted(state), "same": all(torch.equal(state[k], restored.state_dict()[k]) for k in state)}  # fmt: skip


def test_register_rule_from_user_code_and_state_dict() -> None:
    results = run_world(_user_rule_and_state, 3)
    assert len({r["digest"] for r in results}) == 1
    # owners moved by 0, 1, 2: the midrange update is 1, through server momentum (first step: lr * 1)
    start = results[0]["before"]  # rank 0 did not move
    torch.testing.assert_close(results[0]["after"], start + 1.0)
    assert results[0]["state_keys"] == ["anchor", "momentum"] and all(r["same"] for r in results)
    with pytest.raises(ValueError, match="registered twice"):
        ud.register_rule("test_api_midrange")(midrange)


def test_public_surface_is_documented() -> None:
    for name in ud.__all__:
        obj = getattr(ud, name)
        assert name == "__version__" or (obj.__doc__ or "").strip() or isinstance(obj, dict), name
    assert ">>>" in (ud.register_rule.__doc__ or "") and "same_start" in (ud.__doc__ or "")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


def _layouts(rank: int, world: int, channels_last: list[bool]) -> dict:
    """One round of the same owners' training in the layout each rank is given; the unified weights."""
    torch.manual_seed(0)
    model = ConvNet()
    if channels_last[rank]:
        model = model.to(memory_format=torch.channels_last)
    try:
        ud.same_start(model)
        unifier = ud.Unifier(model, rule="avg")
    except ValueError as e:
        return {"error": str(e)}
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(32, 3, 6, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    unifier.unify()
    return {"kept": model.conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last[rank],
            "unified": {k: v.clone() for k, v in model.state_dict().items()}}  # fmt: skip


def test_channels_last_model_keeps_its_layout_and_unifies_like_a_contiguous_one() -> None:
    plain = run_world(_layouts, 2, [False, False])
    fast = run_world(_layouts, 2, [True, True])
    for p, f in zip(plain, fast):
        assert f["kept"] and p["kept"]  # the Unifier's flat buffer did not undo the layout
        for name, value in p["unified"].items():  # same values, element by element (float rounding aside)
            torch.testing.assert_close(f["unified"][name], value, rtol=1e-5, atol=1e-6)
    mixed = run_world(_layouts, 2, [True, False])  # would average mismatched elements: refused
    for r in mixed:
        assert "'conv.weight' is (8, 3, 3, 3) float32 channels_last on rank 0 but (8, 3, 3, 3) float32 on rank 1" in r[
            "error"], r  # fmt: skip
