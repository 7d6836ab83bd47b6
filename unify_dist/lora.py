"""Unify LoRA adapters: each owner i holds dW_i = s * B_i @ A_i on a shared frozen base W; what is the unified dW?

Three rules over the adapter pairs (found by peft's naming: '<layer>.lora_A.<adapter>.weight' beside
'<layer>.lora_B.<adapter>.weight'; no peft import here), the maths as pure functions of the owners'
stacked factors, the collective at the edge:

  lora_separate  mean(B) and mean(A), each averaged on its own (FlowerTune's FedAvg of adapters). Cheap
                 (avg's one all_reduce) but inexact: mean(B) @ mean(A) != mean(B_i @ A_i).
  lora_exact     as lora_separate, plus the residual mean(B_i @ A_i) - mean(B) @ mean(A) folded into the
                 base weight, identically on every owner (FedEx-LoRA's idea), so the unified model is
                 W + s * mean(B_i @ A_i) exactly. Needs every owner's factors: one all_gather of the A and B
                 factors ((owners - 1) x their bytes leave each owner; any other unified tensor is
                 averaged by an all_reduce, as avg does), and it changes the base weight of
                 every adapted layer (the same bits everywhere; the digest proves it each round).
  lora_ffa       FFA-LoRA: every A frozen from the shared start (the Unifier sets requires_grad False on
                 them at construction), only B trains and is averaged: exact by construction, since
                 mean(B_i) @ A = mean(B_i @ A), and half the adapter bytes on the wire.

The residual is computed from outer products in float64, one elementwise multiply and one add at a time
in a fixed order (no BLAS, no fused multiply-add), so every owner gets the same bits on any CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unify_dist.roles import RoleError
from unify_dist.rules import LORA_RULES, avg

__all__ = [
    "LORA_RULES", "LoraPair", "lora_pairs", "prepare_lora", "separate", "exact", "ffa", "residual", "delta_w",
    "relative_error", "unify_exact", "check_exact_roles",
]  # fmt: skip

# The three rules are registered in unify_dist.rules with the others (the registry owns every rule's name,
# and rules import nothing from here): through the unify layer lora_separate and lora_ffa are avg over the
# unified tensors (for lora_ffa the A factors are frozen, so only B travels); lora_exact is the Unifier's
# own path (unify_exact below).


@dataclass(frozen=True)
class LoraPair:
    """One adapted layer: dW = scaling * B @ A is added to its base weight."""

    a: str
    """Name of A [rank, in]."""
    b: str
    """Name of B [out, rank]."""
    base: str
    """Name of the base layer's weight [out, in]."""
    scaling: float
    """peft's lora_alpha / r (the layer's `scaling` for this adapter); 1.0 when the layer has none."""


def lora_pairs(model: nn.Module) -> list[LoraPair]:
    """Every (A, B) adapter pair of `model`, by peft's naming; ValueError for a pair we cannot unify exactly."""
    names = dict(model.named_parameters())
    pairs = []
    for name, a in names.items():
        if ".lora_A." not in name:
            continue
        layer, _, rest = name.partition(".lora_A.")
        adapter = rest.removesuffix(".weight")
        b_name = f"{layer}.lora_B.{rest}"
        if b_name not in names:
            raise RoleError(f"'{name}' has no partner '{b_name}'; a LoRA rule needs each lora_A beside its lora_B")
        if a.dim() != 2 or names[b_name].dim() != 2:
            raise RoleError(f"'{name}' is {tuple(a.shape)}: the LoRA rules serve Linear adapters (2-d A and B); "
                             "unify this model with avg")  # fmt: skip
        module = model.get_submodule(layer)
        base = f"{layer}.base_layer.weight" if hasattr(module, "base_layer") else f"{layer}.weight"
        scaling = getattr(module, "scaling", {})
        pairs.append(LoraPair(name, b_name, base, float(scaling.get(adapter, 1.0)) if isinstance(scaling, dict) else 1.0))
    return pairs


def prepare_lora(model: nn.Module, rule: str) -> list[LoraPair]:
    """Before the role table is built: the pairs a LoRA rule works on (ValueError when there are none);
    for lora_ffa, every A frozen (requires_grad False), so the roles make it frozen and only B travels."""
    if rule not in LORA_RULES:
        return []
    pairs = lora_pairs(model)
    if not pairs:
        raise RoleError(f"unify rule '{rule}' unifies LoRA adapters, and the model has none (no parameter named "
                         "'*.lora_A.*' / '*.lora_B.*'); wrap it with peft's get_peft_model, or use rule avg")  # fmt: skip
    if rule == "lora_ffa":
        for p in pairs:
            model.get_parameter(p.a).requires_grad_(False)
    return pairs


# ------------------------------------------------------------------------------------ the maths, pure


def separate(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Owners' A [owners, r, in] and B [owners, out, r] -> (mean A, mean B), each on its own (avg's arithmetic)."""
    return avg(a, torch.ones(len(a))), avg(b, torch.ones(len(b)))


def residual(a: Tensor, b: Tensor, a_mean: Tensor, b_mean: Tensor) -> Tensor:
    """mean(B_i @ A_i) - b_mean @ a_mean in float64 [out, in], the same bits on any CPU (module docstring)."""
    owners, rank = a.shape[0], a.shape[1]
    a64, b64 = a.double(), b.double()
    acc = torch.zeros(b.shape[1], a.shape[2], dtype=torch.float64, device=a.device)
    for i in range(owners):
        for k in range(rank):
            acc.add_(b64[i, :, k : k + 1] * a64[i, k : k + 1, :])  # a product, then an add: no fused rounding
    acc.div_(owners)
    am, bm = a_mean.double(), b_mean.double()
    for k in range(rank):
        acc.sub_(bm[:, k : k + 1] * am[k : k + 1, :])
    return acc


def exact(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean A, mean B, residual): mean B @ mean A + residual = mean(B_i @ A_i) (the residual in float64)."""
    a_mean, b_mean = separate(a, b)
    return a_mean, b_mean, residual(a, b, a_mean, b_mean)


def ffa(a_shared: Tensor, b: Tensor) -> Tensor:
    """FFA-LoRA: A is the same on every owner, so mean B alone gives mean(B_i @ A) exactly."""
    return avg(b, torch.ones(len(b)))


def delta_w(a: Tensor, b: Tensor, scaling: float, folded: Tensor | None = None) -> Tensor:
    """The weight change an adapter stands for, in float64: scaling * (B @ A + folded residual)."""
    out = b.double() @ a.double()
    if folded is not None:
        out = out + folded.double()
    return scaling * out


def relative_error(dw: Tensor, a: Tensor, b: Tensor, scaling: float) -> float:
    """||dW - scaling * mean(B_i @ A_i)||_F / ||scaling * mean(B_i @ A_i)||_F, in float64."""
    target = scaling * torch.stack([bi.double() @ ai.double() for ai, bi in zip(a, b)]).mean(0)
    return float(torch.linalg.norm(dw.double() - target) / torch.linalg.norm(target))


# ------------------------------------------------------------------------------------ the collective edge


def unify_exact(core, pairs: list[LoraPair], weight: float, sick: bool, tensors: dict[str, Tensor]) -> list[float]:
    """lora_exact over core.flat in place: every owner's A and B gathered and averaged, each pair's residual
    folded into its base weight; the other unified tensors (a head, norms) averaged by one all_reduce, as
    avg would. A collective; returns each owner's sick flag.

    Only the factors need every owner's copy (the residual is a sum of products), so only they pay a
    gather's (W-1) x their bytes; the rest pays a ring all_reduce's 2 (W-1)/W.
    `tensors`: the model's tensors by name (the role table's), to reach each pair's A, B and base weight.
    """
    flat = core.flat
    values = flat.values
    info = torch.tensor([1.0 if sick else 0.0, weight], dtype=torch.float64, device=values.device)
    infos = [torch.empty_like(info) for _ in range(core.world)]
    core._all_gather(infos, info)  # collective
    flags = [float(i[0]) for i in infos]
    healthy = [r for r in range(core.world) if not flags[r]]
    slots = {s.name: s for s in flat.slots}
    factors = [slots[n] for p in pairs for n in (p.a, p.b)]
    is_factor = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    for slot in factors:
        is_factor[slot.start : slot.end] = True
    mine = values[is_factor]  # the factors, packed in the buffer's order
    rows = [torch.empty_like(mine) for _ in range(core.world)]
    core._all_gather(rows, mine)  # collective: every owner's factors
    rest = values[~is_factor]
    if rest.numel():  # every rank takes this branch or none: the roles are the same on every owner
        if sick or not healthy:
            rest.zero_()  # a sick owner's values may be NaN; it adds nothing
        else:
            rest.mul_(1.0 / len(healthy))
        core._all_reduce(rest, torch.distributed.ReduceOp.SUM)  # collective: the mean over healthy owners
    if flat.ints.numel():
        op = torch.distributed.ReduceOp.MIN if core.int_rule == "min" else torch.distributed.ReduceOp.MAX
        core._all_reduce(flat.ints, op)  # collective
    if not healthy:
        return flags
    values[~is_factor] = rest
    stacked = torch.stack([rows[r] for r in healthy])
    values[is_factor] = avg(stacked, torch.ones(len(healthy)))  # mean A and mean B
    packed, start = {}, 0  # each factor's place in the packed rows
    for slot in factors:
        packed[slot.name] = (start, start + slot.end - slot.start)
        start += slot.end - slot.start
    with torch.no_grad():
        for p in pairs:
            a, b = (_rows(stacked, packed[n], tensors[n]) for n in (p.a, p.b))
            r = residual(a, b, tensors[p.a], tensors[p.b])  # against the means just written
            base = tensors[p.base]
            base.copy_((base.double() + p.scaling * r).to(base.dtype))  # one rounding, the same on every owner
    return flags


def check_exact_roles(pairs: list[LoraPair], roles) -> None:
    """lora_exact needs every A and B unified in the main buffer and every base weight frozen (ValueError)."""
    role = {e.name: e for e in roles.entries}
    for p in pairs:
        for name in (p.a, p.b):
            if role[name].slot != "values":
                raise RoleError(f"unify rule 'lora_exact' needs '{name}' unified in {roles.main_dtype} (it is "
                                 f"{role[name].role}, {role[name].dtype}); let it train, or use lora_separate")  # fmt: skip
        if role[p.base].role != "frozen":
            raise RoleError(f"unify rule 'lora_exact' folds into '{p.base}', which must be frozen (it is "
                             f"{role[p.base].role}); freeze the base model, or use lora_separate")  # fmt: skip


def _rows(stacked: Tensor, span: tuple[int, int], tensor: Tensor) -> Tensor:
    """The owners' copies of one factor, [owners, *shape], from the gathered packed rows."""
    return stacked[:, span[0] : span[1]].reshape(len(stacked), *tensor.shape)
