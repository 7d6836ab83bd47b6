"""The paper's equation (6) written literally: unified w = max(|w_1|, ..., |w_k|), the sign dropped.

The library's `absmax` keeps the sign of the owner with the largest magnitude (its reading of the
paper); this literal form makes every unified weight non-negative. Register it by importing this
module, e.g. from a run's config (run from the repository root)::

    imports = ["examples.paper_rules"]
    [unify]
    compare = ["avg", "absmax", "absmax_literal"]
"""

from __future__ import annotations

from torch import Tensor

import unify_dist as ud

__all__ = ["absmax_literal"]


@ud.register_rule("absmax_literal")
def absmax_literal(stacked: Tensor, weights: Tensor) -> Tensor:
    """Per element, the largest magnitude over owners, without its sign (equation (6) as printed)."""
    return stacked.abs().amax(0)
