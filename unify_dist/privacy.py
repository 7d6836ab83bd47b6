"""What each owner can learn about the others under a rule, said before any weight leaves a rank."""

from __future__ import annotations

import math

__all__ = ["privacy_statement", "secure_avg_reveals", "REVEALS_BY_COLLECTIVE", "dp_epsilon", "dp_statement", "RDP_ORDERS"]

def secure_avg_reveals(rule: str, owners: int) -> str:
    """secure_avg: masks hide single owners' weights, but with 2 owners the sum gives the peer away."""
    if owners == 2:
        return (
            f"{rule} with 2 owners hides nothing: the average minus your own weights is "
            "the peer's weights. Use 3 or more owners for masking to protect anyone."
        )
    return (
        f"{rule}: pairwise masks hide each owner's weights in transit; each owner learns "
        f"only the sum of all {owners} (so the sum of the other {owners - 1}), assuming no collusion."
    )


def _sums(rule: str, owners: int) -> str:
    peer = "the peer's weights exactly (2 x average - own)" if owners == 2 else "the sum of the others' weights"
    return (
        f"{rule} reveals {peer}; and a plain all_reduce carries single owners' values between "
        "neighbours in transit. Use unify.rule=secure_avg (3+ owners) to mask them."
    )


def _order(rule: str, owners: int) -> str:
    return (
        f"{rule} reveals, per weight, the winning owner's exact value: every weight where a peer "
        "wins is exposed. Masks cannot hide a maximum."
    )


def _gathers(rule: str, owners: int) -> str:
    return (
        f"{rule} gathers every owner's raw weights to every other owner (all_gather): "
        "each owner sees all the others' weights."
    )


REVEALS_BY_COLLECTIVE = {"sum": _sums, "weighted_sum": _sums, "max": _order, "absmax": _order,
                         "masked_sum": secure_avg_reveals, "gather": _gathers}  # fmt: skip
"""What a rule reveals when its spec says nothing itself: a property of the collective that runs it."""


def privacy_statement(rule: str, owners: int, absmax_impl: str = "reduce", candidates: tuple[str, ...] = ()) -> str:
    """One or two sentences on what `rule` with `owners` owners reveals to each owner."""
    from unify_dist.rules import SPECS  # late: rules import this module

    if owners == 1:
        return "privacy: one owner, nothing is shared."
    if rule == "auto":
        parts = [privacy_statement(c, owners, absmax_impl).removeprefix("privacy: ") for c in candidates]
        return f"privacy: auto unifies with every candidate each round, so it reveals all of: {' | '.join(parts)}"
    spec = SPECS[rule]
    collective = "gather" if spec.collective == "absmax" and absmax_impl == "gather" else spec.collective
    reveals = spec.reveals if spec.reveals is not None and collective == spec.collective else None
    return "privacy: " + (reveals or REVEALS_BY_COLLECTIVE[collective])(rule, owners)


# ---------------------------------------------------------------- differential privacy accounting

RDP_ORDERS = tuple([1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512])
"""Renyi orders the accountant minimises over (the usual grid of RDP accountants)."""


def dp_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon of `releases` Gaussian releases of one owner's clipped update, at the given delta.

    Each release is update + N(0, (z C)^2) with ||update|| <= C, so two datasets of that owner (any two:
    this protects the owner's whole data, not only one record) move it by at most 2C: a Gaussian
    mechanism with sensitivity 2C and noise z C, whose Renyi DP at order a is exactly a * 2 / z^2
    (Mironov 2017). No subsampling is involved, so this closed form is the whole curve (an accountant
    such as Opacus' RDP accountant, outside this project's stack, computes the same numbers here).
    Releases compose by adding RDP; the conversion to (epsilon, delta) is Balle et al. 2020, Thm 21.
    """
    if noise_multiplier <= 0:
        return math.inf
    if releases <= 0:
        return 0.0
    best = math.inf
    for a in RDP_ORDERS:
        rdp = releases * a * 2.0 / noise_multiplier**2
        eps = rdp + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return max(best, 0.0)


def dp_statement(noise_multiplier: float, bound: float, delta: float, releases_per_round: int, rounds: int) -> str:
    """What differential privacy the settings give, said at start-up."""
    eps = dp_epsilon(noise_multiplier, releases_per_round * rounds, delta)
    return (
        f"differential privacy: each owner clips its update to norm {bound:g} and adds Gaussian noise of std "
        f"{noise_multiplier * bound:g} before it leaves the rank ({releases_per_round} release(s) per round); "
        f"after {rounds} rounds each owner's data is ({eps:.3g}, {delta:g})-DP towards everyone else"
    )
