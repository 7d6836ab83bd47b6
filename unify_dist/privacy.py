"""What each owner can learn about the others under a rule, said before any weight leaves a rank."""

from __future__ import annotations

__all__ = ["privacy_statement"]

_SUMS = {"avg", "weighted_avg"}
_ORDER = {"max", "absmax"}


def privacy_statement(rule: str, owners: int, absmax_impl: str = "reduce", candidates: tuple[str, ...] = ()) -> str:
    """One or two sentences on what `rule` with `owners` owners reveals to each owner."""
    if owners == 1:
        return "privacy: one owner, nothing is shared."
    if rule == "auto":
        parts = [privacy_statement(c, owners, absmax_impl).removeprefix("privacy: ") for c in candidates]
        return f"privacy: auto unifies with every candidate each round, so it reveals all of: {' | '.join(parts)}"
    if rule == "secure_avg":
        if owners == 2:
            return (
                "privacy: secure_avg with 2 owners hides nothing: the average minus your own weights is "
                "the peer's weights. Use 3 or more owners for masking to protect anyone."
            )
        return (
            f"privacy: secure_avg: pairwise masks hide each owner's weights in transit; each owner learns "
            f"only the sum of all {owners} (so the sum of the other {owners - 1}), assuming no collusion."
        )
    if rule in _SUMS:
        peer = "the peer's weights exactly (2 x average - own)" if owners == 2 else "the sum of the others' weights"
        return (
            f"privacy: {rule} reveals {peer}; and a plain all_reduce carries single owners' values between "
            "neighbours in transit. Use unify.rule=secure_avg (3+ owners) to mask them."
        )
    if rule in _ORDER and not (rule == "absmax" and absmax_impl == "gather"):
        return (
            f"privacy: {rule} reveals, per weight, the winning owner's exact value: every weight where a peer "
            "wins is exposed. Masks cannot hide a maximum."
        )
    return (
        f"privacy: {rule} gathers every owner's raw weights to every other owner (all_gather): "
        "each owner sees all the others' weights."
    )
