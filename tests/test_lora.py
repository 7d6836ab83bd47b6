"""LoRA rules: the pure maths (how far each is from mean(B_i @ A_i)) and the same rules through real gloo
groups of 3 owners, with the bytes each owner sends. Adapters here follow peft's naming by hand (a
base_layer, lora_A / lora_B ModuleDicts, a scaling dict), so these run without transformers; the real
peft model is tests/test_finetune_example.py's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unify_dist as ud
from tests.world import run_world
from unify_dist.lora import delta_w, exact, ffa, lora_pairs, relative_error, separate


class LoraLinear(nn.Module):
    """peft's LoRA Linear, by name: base_layer (frozen), lora_A / lora_B per adapter, scaling = alpha / r."""

    def __init__(self, fan_in: int, fan_out: int, rank: int = 4, alpha: float = 8.0):
        super().__init__()
        self.base_layer = nn.Linear(fan_in, fan_out)
        self.base_layer.requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(fan_in, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, fan_out, bias=False)})
        self.scaling = {"default": alpha / rank}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling["default"]


class Adapted(nn.Module):
    def __init__(self, rank: int = 4, second: bool = True):
        super().__init__()
        self.q = LoraLinear(12, 16, rank)
        self.v = LoraLinear(16, 16, rank) if second else nn.Linear(16, 16).requires_grad_(False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.v(torch.relu(self.q(x)))))


def _factors(owners: int = 4, out: int = 24, rank: int = 4, fan_in: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(owners, rank, fan_in, generator=g), torch.randn(owners, out, rank, generator=g)


def test_pure_rules_against_the_mean_of_products():
    a, b = _factors()
    a_mean, b_mean = separate(a, b)
    assert relative_error(delta_w(a_mean, b_mean, 2.0), a, b, 2.0) > 0.1  # FlowerTune's averaging is not it
    a_mean, b_mean, r = exact(a, b)
    assert relative_error(delta_w(a_mean, b_mean, 2.0, r), a, b, 2.0) <= 1e-6
    shared = a[:1].expand_as(a)  # FFA-LoRA: one A on every owner
    assert relative_error(delta_w(shared[0], ffa(shared[0], b), 2.0), shared, b, 2.0) <= 1e-6


def test_pairs_follow_peft_naming():
    pairs = lora_pairs(Adapted())
    assert [(p.a, p.b, p.base, p.scaling) for p in pairs][0] == (
        "q.lora_A.default.weight", "q.lora_B.default.weight", "q.base_layer.weight", 2.0)
    assert len(pairs) == 2


def _owner(rank: int, world: int, rule: str, raws: list[bytes] | None = None) -> dict:
    """One owner's unify of its own adapter; with `raws` (identity keys), through trust's sealed ring."""
    ring = None
    if raws is not None:
        from tests.trust_keys import key, roster_of
        from unify_dist.trust import SealedRing, admit

        ring = SealedRing(admit(key(raws[rank]), f"owner{rank}", roster_of(raws), run_id="test"))
    torch.manual_seed(0)
    model = Adapted()
    ud.same_start(model, reducer=ring)
    unifier = ud.Unifier(model, rule=rule, reducer=ring)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(10 + rank)
    with torch.no_grad():  # each owner's own adapter, as local training would leave it
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    local = {k: v.clone() for k, v in model.state_dict().items()}
    outcome = unifier.unify()
    return {"start": start, "local": local, "end": {k: v.clone() for k, v in model.state_dict().items()},
            "digest": outcome.digest, "bytes": outcome.bytes_sent, "numel": unifier.flat.numel}  # fmt: skip


@pytest.fixture(scope="module")
def unified() -> dict[str, list[dict]]:
    return {rule: run_world(_owner, 3, rule) for rule in ("lora_separate", "lora_exact", "lora_ffa")}


def _error(results: list[dict], layer: str) -> float:
    """End to end: (unified base - start base) + s * B' @ A' against s * mean(B_i @ A_i) of the local factors."""
    s, end = 2.0, results[0]["end"]
    a = torch.stack([r["local"][f"{layer}.lora_A.default.weight"] for r in results])
    b = torch.stack([r["local"][f"{layer}.lora_B.default.weight"] for r in results])
    folded = (end[f"{layer}.base_layer.weight"].double() - results[0]["start"][f"{layer}.base_layer.weight"].double()) / s
    dw = delta_w(end[f"{layer}.lora_A.default.weight"], end[f"{layer}.lora_B.default.weight"], s, folded)
    return relative_error(dw, a, b, s)


def test_distributed_rules_match_the_maths_and_their_bytes(unified):
    world = 3
    for rule, results in unified.items():
        assert len({r["digest"] for r in results}) == 1, rule
        for name, value in results[0]["end"].items():
            assert all(torch.equal(r["end"][name], value) for r in results), (rule, name)
    sep, ex, ffa_ = unified["lora_separate"], unified["lora_exact"], unified["lora_ffa"]
    for layer in ("q", "v"):
        assert _error(sep, layer) > 1e-2
        assert _error(ex, layer) <= 1e-6, _error(ex, layer)
        assert _error(ffa_, layer) <= 1e-6, _error(ffa_, layer)
        for results in (sep, ffa_):  # the base is never touched but by lora_exact's fold
            name = f"{layer}.base_layer.weight"
            assert torch.equal(results[0]["end"][name], results[0]["start"][name])
        name = f"{layer}.lora_A.default.weight"
        assert torch.equal(ffa_[0]["end"][name], ffa_[0]["start"][name])
    for name in ("head.weight", "head.bias"):  # lora_exact averages what is not a factor as avg does
        mean = torch.stack([r["local"][name] for r in ex]).mean(0)
        torch.testing.assert_close(ex[0]["end"][name], mean, rtol=1e-6, atol=1e-7)
        assert not torch.equal(ex[0]["end"][name], ex[0]["local"][name])  # A frozen from the shared start
    adapters = (4 * 12 + 16 * 4) + (4 * 16 + 16 * 4)  # q and v: lora_A + lora_B elements
    head = 16 * 3 + 3
    assert sep[0]["numel"] == adapters + head and ffa_[0]["numel"] == 16 * 4 * 2 + head  # FFA: only B and the head
    ring = 2 * (world - 1) / world
    assert sep[0]["bytes"] == int(ring * 4 * (adapters + head + world + 1))
    # lora_exact: a gather of the factors only, the head by all_reduce (2 (W-1)/W x 4 bytes, no flags tail)
    assert ex[0]["bytes"] == (world - 1) * (16 + 4 * adapters) + 2 * (world - 1) * 4 * head // world
    assert ffa_[0]["bytes"] == int(ring * 4 * (16 * 4 * 2 + head + world + 1))  # B only: no A on the wire


def test_sealed_rules_equal_the_plain_ones(unified):
    """Trust on: the adapters cross the sealed ring; the same result (bits for the gather, float tolerance for
    sums added in another order), one digest on every owner."""
    from tests.trust_keys import fresh_keys

    raws = fresh_keys(3)
    for rule, plain in unified.items():
        sealed = run_world(_owner, 3, rule, raws)
        assert len({r["digest"] for r in sealed}) == 1, rule
        for name, value in plain[0]["end"].items():
            if rule == "lora_exact" and "head" not in name:  # factors and folds from the gather: same bits
                assert torch.equal(sealed[0]["end"][name], value), (rule, name)
            else:
                torch.testing.assert_close(sealed[0]["end"][name], value, rtol=1e-6, atol=1e-7)


def _misuse(rank: int, world: int, case: str) -> str:
    torch.manual_seed(0)
    model = {"no adapters": nn.Linear(4, 2), "rank": Adapted(rank=4 + 4 * rank),
             "targets": Adapted(second=rank == 0)}[case]  # fmt: skip
    try:
        if case != "no adapters":
            ud.same_start(model)
        ud.Unifier(model, rule="lora_exact")
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize(("case", "phrase"), [
    ("no adapters", "unify rule 'lora_exact' unifies LoRA adapters, and the model has none"),
    ("rank", "'q.lora_A.default.weight' is (4, 12) float32 on rank 0 but (8, 12) float32 on rank 1"),
    ("targets", "rank 0 has 'v.base_layer.weight' and rank 1 does not"),  # v adapted on rank 0 only
])  # fmt: skip
def test_adapter_mistakes_are_one_line_naming_the_tensor(case, phrase):
    for message in run_world(_misuse, 2, case):
        assert phrase in message and "\n" not in message, message


def _sick_owner(rank: int, world: int) -> dict:
    """lora_exact with nonfinite=skip: owner 1's head holds a NaN, so it is left out of every mean."""
    torch.manual_seed(0)
    model = Adapted()
    ud.same_start(model)
    unifier = ud.Unifier(model, rule="lora_exact", nonfinite="skip")
    g = torch.Generator().manual_seed(10 + rank)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        if rank == 1:
            model.head.bias[0] = float("nan")
    local = {k: v.clone() for k, v in model.state_dict().items()}
    outcome = unifier.unify()
    return {"local": local, "end": model.state_dict(), "digest": outcome.digest, "skipped": outcome.skipped}


def test_exact_leaves_a_sick_owner_out_of_factors_and_head():
    results = run_world(_sick_owner, 3)
    assert len({r["digest"] for r in results}) == 1 and all(r["skipped"] == [1] for r in results)
    end = results[0]["end"]
    assert all(torch.isfinite(v).all() for v in end.values() if v.is_floating_point())
    for name in ("head.weight", "head.bias", "q.lora_A.default.weight", "v.lora_B.default.weight"):
        mean = (results[0]["local"][name] + results[2]["local"][name]) / 2  # owners 0 and 2 only
        torch.testing.assert_close(end[name], mean, rtol=1e-6, atol=1e-7)
