"""Unify rules as pure tensor functions: the maths, with no process group in sight.

A rule takes the owners' tensors stacked along dim 0 (shape [owners, ...]) and their weights (local
sample counts, shape [owners]) and returns the unified tensor. These functions are the reference: the
collective implementations in unify_dist.unify must agree with them (exactly for max and absmax,
allclose for the averages, whose summation order differs), and the tests prove it.

A rule registered here with no fast collective path still runs distributed: unify_dist.unify gathers
the owners' tensors chunk by chunk and calls the reference function on each chunk.

Rules with settings (trimmed_mean's trim_fraction, ties' density) declare them when registering:
`options` names UnifyConfig fields, which the unify layer passes as keywords of the same name
(functools.partial), so every reference keeps the plain (stacked, weights) call with defaults.
Cross-cutting steps (clipping an owner's update, the serverless momentum step) are small pure
functions here too, applied by the unify layer around any rule instead of living inside one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "COLLECTIVES",
    "RULES",
    "SPECS",
    "Rule",
    "RuleSpec",
    "register_rule",
    "LORA_RULES",
    "avg",
    "weighted_avg",
    "max_rule",
    "absmax",
    "absmax_keys_",
    "absmax_unkeys_",
    "KEY_DTYPES",
    "median",
    "trimmed_mean",
    "ties",
    "ties_trim",
    "ties_merge",
    "clip_factor",
    "clip_update",
    "server_step",
]

Rule = Callable[[Tensor, Tensor], Tensor]
"""(stacked [owners, ...], weights [owners]) -> unified [...]"""

RULES: dict[str, Rule] = {}
SPECS: dict[str, "RuleSpec"] = {}


COLLECTIVES = ("sum", "weighted_sum", "max", "absmax", "masked_sum", "gather")
"""How the collective core (unify_dist.collectives) can run a rule; `gather` runs any reference."""


@dataclass(frozen=True)
class RuleSpec:
    """How the unify layer runs a registered rule; `reference` is the whole maths, the rest says how to split it."""

    reference: Rule
    collective: str = "gather"
    """The collective that computes it (one of COLLECTIVES). Only the built-in fast paths name another
    than `gather`, and each must equal its reference (the tests prove it)."""
    reveals: Callable[[str, int], str] | None = None
    """(rule name, owners) -> what each owner learns of the others (said at start-up); None: the
    default statement of its collective (unify_dist.privacy, which imports this module, never the reverse)."""
    options: tuple[str, ...] = ()
    """UnifyConfig fields passed to `reference` (and `owner_step`) as keywords of the same name."""
    owner_step: Callable[..., Tensor] | None = None
    """A step each owner applies to its own whole update before anything is combined (ties' top-k trim):
    it needs the owner's whole vector, so it cannot run per gathered chunk."""
    combine: Rule | None = None
    """With owner_step: the coordinate-wise rest, so reference(s, w) == combine(owner_step of each row, w)."""
    delta_only: bool = False
    """The rule is defined on updates since the last unified model (unify.space is forced to delta)."""


def register_rule(
    name: str,
    *,
    collective: str = "gather",
    reveals: Callable[[str, int], str] | None = None,
    options: tuple[str, ...] = (),
    owner_step: Callable[..., Tensor] | None = None,
    combine: Rule | None = None,
    delta_only: bool = False,
) -> Callable[[Rule], Rule]:
    """Register a reference rule under `name` (a decorator); the rule then runs distributed everywhere.

    A rule is a pure function (stacked [owners, ...], weights [owners]) -> unified [...]; from user code
    it runs through the gather path. A second rule with the same name is a bug, so it raises ValueError.

    Example::

        >>> import unify_dist as ud
        >>> @ud.register_rule("absmax_unsigned")
        ... def absmax_unsigned(stacked, weights):
        ...     return stacked.abs().amax(0)
    """
    if (owner_step is None) != (combine is None):
        raise ValueError(f"unify rule '{name}': owner_step and combine go together")
    if collective not in COLLECTIVES:
        raise ValueError(f"unify rule '{name}': collective '{collective}' is not one of {', '.join(COLLECTIVES)}")
    if name == "auto":
        raise ValueError("'auto' is the program's choose-each-round mode, not a rule name; pick another name")

    def wrap(fn: Rule) -> Rule:
        if name in RULES:
            raise ValueError(f"unify rule '{name}' is registered twice; pick another name")
        RULES[name] = fn
        SPECS[name] = RuleSpec(fn, collective, reveals, options, owner_step, combine, delta_only)
        return fn

    return wrap


@register_rule("avg", collective="sum")
def avg(stacked: Tensor, weights: Tensor) -> Tensor:
    """Plain mean over owners (the paper's average); weights are ignored."""
    return stacked.sum(0) / stacked.shape[0]


@register_rule("weighted_avg", collective="weighted_sum")
def weighted_avg(stacked: Tensor, weights: Tensor) -> Tensor:
    """Mean weighted by each owner's local sample count (FedAvg's weighting)."""
    w = weights.to(stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    return (stacked * w).sum(0) / weights.sum().to(stacked.dtype)


@register_rule("max", collective="max")
def max_rule(stacked: Tensor, weights: Tensor) -> Tensor:
    """Per element, the largest value over owners (the paper's max)."""
    return stacked.amax(0)


@register_rule("absmax", collective="absmax")
def absmax(stacked: Tensor, weights: Tensor) -> Tensor:
    """Per element, the value of largest magnitude over owners, sign kept (the paper's absmax).

    Tie rule: when the largest magnitude is held by both a positive and a negative value (x and -x),
    the positive one wins; for zeros, +0.0 beats -0.0. The all_reduce implementation computes exactly
    this, bit for bit, as a MAX over `absmax_keys_`.
    """
    top = stacked.abs().amax(0)
    positive_top = ((stacked == top) & ~stacked.signbit()).any(0)
    return torch.where(positive_top, top, -top)


KEY_DTYPES = {torch.float32: torch.int32, torch.float64: torch.int64}
"""Float dtypes whose bit patterns absmax_keys_ maps into the integer type of the same width."""


def absmax_keys_(bits: Tensor, scratch: Tensor) -> None:
    """In place: float bit patterns (a float32/64 tensor viewed as int32/64) become absmax's order as integers.

    key = ((magnitude bits << 1) | positive) ^ sign bit: magnitude first, then positive over negative,
    shifted so that signed integer order is that order. So a MAX over owners' keys is absmax, ties
    included, and moves the same bytes as avg's SUM. `scratch`: an integer tensor of bits' shape.
    Every step is an integer op on the bit pattern: exact for every finite value, zeros and subnormals.
    """
    width = bits.element_size() * 8
    sign = -(1 << (width - 1))
    torch.bitwise_right_shift(bits, width - 1, out=scratch)  # -1 where negative, 0 elsewhere
    bits.bitwise_left_shift_(1)  # magnitude << 1; the sign bit falls off
    bits.bitwise_xor_(sign | 1)  # low bit 1 (positive), and signed order = unsigned order
    bits.add_(scratch)  # negatives: low bit back to 0 (no carry: it was 1)


def absmax_unkeys_(keys: Tensor, scratch: Tensor) -> None:
    """In place: the inverse of absmax_keys_, keys back to float bit patterns."""
    width = keys.element_size() * 8
    torch.bitwise_and(keys, 1, out=scratch)
    scratch.bitwise_left_shift_(width - 1)  # positive -> the sign bit; flipped below, so positive ends clear
    keys.bitwise_right_shift_(1)  # (magnitude - 2^(width-2)), as keys hold it shifted by the sign bit
    keys.sub_(1 << (width - 2))  # the magnitude bits with the sign bit set
    keys.bitwise_xor_(scratch)  # positives: clear the sign bit


# --- Robust rules: coordinate-wise, so the chunked gather path runs them with bounded memory. ---


@register_rule("secure_avg", collective="masked_sum")  # reveals: the masked sum's statement (unify_dist.privacy)
def secure_avg(stacked: Tensor, weights: Tensor) -> Tensor:
    """The plain mean; distributed, each owner's contribution travels under pairwise masks (unify_dist.secure)."""
    return stacked.sum(0) / stacked.shape[0]


@register_rule("median")
def median(stacked: Tensor, weights: Tensor) -> Tensor:
    """Per element, the median over owners; weights are ignored (one owner, one vote).

    With an even number of owners it is the mean of the two middle values (torch.median would take the
    lower one, which favours one side). With three or more owners no single owner, however wrong, can
    move it outside the range of the others' values.
    """
    s = stacked.sort(0).values
    n = s.shape[0]
    return (s[(n - 1) // 2] + s[n // 2]) / 2


@register_rule("trimmed_mean", options=("trim_fraction",))
def trimmed_mean(stacked: Tensor, weights: Tensor, trim_fraction: float = 0.25) -> Tensor:
    """Per element, drop the floor(trim_fraction * owners) largest and smallest values, average the rest.

    Weights are ignored. With trim_fraction * owners < 1 nothing is dropped and it is the plain mean.
    """
    n = stacked.shape[0]
    k = min(int(trim_fraction * n), (n - 1) // 2)  # always keep at least one value
    s = stacked.sort(0).values
    return s[k : n - k].sum(0) / (n - 2 * k)


# --- TIES merging (Yadav et al., 2023) over owners' updates: trim, elect sign, disjoint mean. ---


def ties_trim(update: Tensor, ties_density: float = 0.2) -> Tensor:
    """One owner's update with all but its top ties_density fraction of entries (by magnitude) zeroed.

    Entries tied with the threshold magnitude are all kept, so the result is deterministic.
    """
    flat = update.reshape(-1)
    keep = max(1, math.ceil(ties_density * flat.numel())) if flat.numel() else 0
    if keep >= flat.numel():
        return update.clone()
    mag = flat.abs()
    threshold = mag.kthvalue(flat.numel() - keep + 1).values
    return torch.where(mag >= threshold, flat, torch.zeros_like(flat)).view_as(update)


def ties_merge(stacked: Tensor, weights: Tensor) -> Tensor:
    """Per element, elect the sign with the larger summed magnitude, then average the owners that agree.

    Zeros (trimmed entries) never vote and never count in the mean; where no owner agrees the result is 0.
    """
    elected = torch.sign(stacked.sum(0))  # sum of + magnitudes vs. sum of - magnitudes
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    count = agree.sum(0).clamp(min=1).to(stacked.dtype)
    return torch.where(agree, stacked, torch.zeros_like(stacked)).sum(0) / count


@register_rule("ties", options=("ties_density",), owner_step=ties_trim, combine=ties_merge, delta_only=True)
def ties(stacked: Tensor, weights: Tensor, ties_density: float = 0.2) -> Tensor:
    """TIES over owners' updates [owners, ...]: each owner keeps its top ties_density entries, then ties_merge.

    Weights are ignored. The trim looks at each owner's whole update (the model, not a chunk).
    """
    trimmed = torch.stack([ties_trim(row, ties_density) for row in stacked])
    return ties_merge(trimmed, weights)


# --- Wrappers the unify layer applies around any rule. ---


def clip_factor(update: Tensor, bound: float) -> float:
    """The factor that scales `update` to L2 norm `bound` if it is longer: 1.0 when it is not (or bound <= 0)."""
    if bound <= 0:
        return 1.0
    norm = float(torch.linalg.vector_norm(update, dtype=torch.float64))  # host sync
    return bound / norm if norm > bound else 1.0


def clip_update(update: Tensor, bound: float) -> Tensor:
    """`update` scaled down to L2 norm `bound` if it is longer (bound <= 0: unchanged).

    Bounds how far one owner can pull the unified model in a round, whatever the rule.
    """
    factor = clip_factor(update, bound)
    return update * factor if factor != 1.0 else update


def server_step(delta: Tensor, momentum: Tensor | None, beta: float, lr: float) -> tuple[Tensor, Tensor | None]:
    """FedAvgM's server update, run identically by every owner: m = beta * m + delta; step = lr * m.

    `delta` is the round's unified update (unified - previous unified); returns (step, new momentum).
    With beta = 0 there is no momentum (None in, None out).
    """
    if momentum is None or beta == 0:
        return delta * lr, momentum
    m = momentum * beta + delta
    return m * lr, m

# ------------------------------------------------------------------ LoRA adapters (unify_dist.lora)

LORA_RULES = ("lora_separate", "lora_exact", "lora_ffa")
"""The registered rules that need adapter pairs in the model (ValueError on a model without them); their
maths and set-up live in unify_dist.lora, which imports this module (never the other way round)."""


@register_rule("lora_separate", collective="sum")
def lora_separate(stacked: Tensor, weights: Tensor) -> Tensor:
    """Every unified tensor averaged on its own, adapter factors included (FlowerTune): avg."""
    return avg(stacked, weights)


@register_rule("lora_ffa", collective="sum")
def lora_ffa(stacked: Tensor, weights: Tensor) -> Tensor:
    """avg over the unified tensors, which hold no lora_A: they are frozen (FFA-LoRA)."""
    return avg(stacked, weights)


@register_rule("lora_exact", collective="gather")
def lora_exact(stacked: Tensor, weights: Tensor) -> Tensor:
    """avg over the unified tensors; the Unifier then folds each pair's residual into its base (unify_exact)."""
    return avg(stacked, weights)
